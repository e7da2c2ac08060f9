"""Type stub for the optional C extension: the native strict CBOR decoder and schema checker (``_cbor_native.c``)."""

from typing import Any, Final

#: Nesting beyond this many levels is left to the reference decoder.
HARD_MAX_DEPTH: Final[int]

class Invalid(Exception):
    """The native decoder refused the input: the reference decoder names the rule."""

def configure(tag: type, undefined: object, /) -> None: ...
def loads(data: bytes, max_depth: int, max_items: int, allow_indefinite: bool, /) -> Any: ...
def schema(tree: tuple[Any, ...], /) -> object:
    """Compiles a rule tree of ``ism.formats.cbor_schema`` (an opaque schema for :func:`check` and :func:`build`)."""

def check(value: Any, schema: object, /) -> int | None:
    """None if ``value`` conforms to ``schema``, else the index of the rule it breaks."""

def build(value: Any, schema: object, /) -> Any:
    """The object the schema's root record makes from ``value``, or None if it does not conform."""

"""Strict CBOR (RFC 8949) codec for untrusted input.

Owns: decoding bytes into plain Python values and deterministic encoding.
Must not import: anything above ``ism.errors``.

Threat: every signed artifact iSM reads (SUIT envelopes, COSE objects,
attestation tokens, device state) arrives as CBOR from a party that may be
hostile. A general-purpose decoder lets such a party trigger unbounded
allocation (a length of 2**64), deep recursion, ambiguous maps (duplicate
keys, where two parsers disagree on which value wins) or trailing data
smuggled after a signed item. This decoder:

* checks every declared length against the bytes actually remaining, so a
  huge length costs nothing;
* bounds nesting depth and the number of items in any container;
* rejects duplicate map keys, trailing bytes, reserved additional-info values,
  and (unless allowed) indefinite-length items;
* decodes arrays used as map keys to tuples so every key is hashable.

Values map to: int, bytes, str, list, dict, bool, None, float, :class:`Tag`,
and :data:`UNDEFINED`.

Two decoders, one behaviour (docs/adr/0005-native-cbor-decoder.md): the
pure-Python decoder here is the reference; the optional C extension
``ism.formats._cbor_native`` decodes the same inputs into the same values and
refuses everything else without deciding how it is malformed, so
:func:`loads` then runs the reference decoder, which raises the
:class:`FormatError` with its rule. The native decoder can therefore only
accept what the reference accepts. Without the extension (no C compiler at
install) :func:`loads` uses the reference decoder alone.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

from ism.errors import FormatError

try:
    from ism.formats import _cbor_native as _native
except ImportError:  # no C compiler at install: the reference decoder alone
    _native = None  # type: ignore[assignment]

__all__ = ["UNDEFINED", "Limits", "Raw", "Tag", "dumps", "loads"]


@dataclass(frozen=True, slots=True)
class Tag:
    """A CBOR tag: ``number`` applied to ``value``."""

    number: int
    value: Any


@dataclass(frozen=True, slots=True)
class Raw:
    """An item that is already CBOR-encoded: :func:`dumps` inserts ``encoded`` verbatim.

    For encoders that reuse parts which do not change (the caller vouches that
    ``encoded`` is one well-formed, deterministically encoded item).
    """

    encoded: bytes


class _Undefined:
    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"


UNDEFINED: Final = _Undefined()

if _native is not None:
    _native.configure(Tag, UNDEFINED)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while decoding. Every limit is named, none is implicit."""

    max_depth: int = 32
    max_items: int = 100_000
    allow_indefinite: bool = False


_DEFAULT_LIMITS: Final = Limits()
_BREAK: Final = object()


def _fail(rule: str, message: str, offset: int) -> FormatError:
    return FormatError(f"cbor.{rule}", f"{message} at byte {offset}")


class _Decoder:
    __slots__ = ("data", "items", "limits", "pos")

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.pos = 0
        self.limits = limits
        self.items = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _fail(
                "truncated",
                f"needs {n} bytes but only {len(self.data) - self.pos} remain",
                self.pos,
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def _argument(self, info: int, start: int) -> int | None:
        """Returns the argument, or None for indefinite length (info 31)."""
        if info < 24:
            return info
        if info == 24:
            return self._take(1)[0]
        if info == 25:
            return int.from_bytes(self._take(2), "big")
        if info == 26:
            return int.from_bytes(self._take(4), "big")
        if info == 27:
            return int.from_bytes(self._take(8), "big")
        if info == 31:
            return None
        raise _fail("reserved-info", f"reserved additional information {info}", start)

    def _count(self, n: int, start: int) -> None:
        self.items += n
        if n > self.limits.max_items or self.items > self.limits.max_items:
            raise _fail("too-many-items", f"more than {self.limits.max_items} items", start)
        # Every item takes at least one byte: a count larger than what is left is a lie.
        if n > len(self.data) - self.pos:
            raise _fail("truncated", f"declares {n} items but fewer bytes remain", start)

    def _indefinite_allowed(self, start: int) -> None:
        if not self.limits.allow_indefinite:
            raise _fail("indefinite", "indefinite-length item not allowed", start)

    def decode(self, depth: int) -> Any:
        if depth > self.limits.max_depth:
            raise _fail("too-deep", f"nesting deeper than {self.limits.max_depth}", self.pos)
        start = self.pos
        data = self.data
        if start >= len(data):
            raise _fail("truncated", "needs 1 byte but none remain", start)
        initial = data[start]
        self.pos = start + 1
        major, info = initial >> 5, initial & 0x1F
        # Fast paths for the most common items: small integers and short strings.
        if info < 24:
            if major == 0:
                return info
            if major == 2:
                end = start + 1 + info
                if end > len(data):
                    raise _fail("truncated", f"needs {info} bytes", start)
                self.pos = end
                return data[start + 1 : end]
            if major == 1:
                return -1 - info
            if major == 3:
                end = start + 1 + info
                if end > len(data):
                    raise _fail("truncated", f"needs {info} bytes", start)
                self.pos = end
                try:
                    return data[start + 1 : end].decode("utf-8")
                except UnicodeDecodeError:
                    raise _fail("utf8", "text string is not valid UTF-8", start) from None
        if major == 7:
            return self._simple(info, start)
        arg = self._argument(info, start)
        if major == 0:
            if arg is None:
                raise _fail("reserved-info", "indefinite unsigned integer", start)
            return arg
        if major == 1:
            if arg is None:
                raise _fail("reserved-info", "indefinite negative integer", start)
            return -1 - arg
        if major in (2, 3):
            raw = self._string_chunks(major, start) if arg is None else self._take(arg)
            if major == 2:
                return bytes(raw)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("utf8", "text string is not valid UTF-8", start) from None
        if major == 4:
            return self._array(arg, depth, start)
        if major == 5:
            return self._map(arg, depth, start)
        # major == 6: tag
        if arg is None:
            raise _fail("reserved-info", "indefinite tag", start)
        value = self.decode(depth + 1)
        if value is _BREAK:
            raise _fail("unexpected-break", "break code as tag content", start)
        return Tag(arg, value)

    def _string_chunks(self, major: int, start: int) -> bytes:
        self._indefinite_allowed(start)
        chunks: list[bytes] = []
        while True:
            if self.pos >= len(self.data):
                raise _fail("truncated", "unterminated indefinite string", start)
            b = self.data[self.pos]
            if b == 0xFF:
                self.pos += 1
                return b"".join(chunks)
            self.pos += 1
            if b >> 5 != major or (b & 0x1F) == 31:
                raise _fail("bad-chunk", "indefinite string chunk of wrong type", self.pos - 1)
            n = self._argument(b & 0x1F, self.pos - 1)
            assert n is not None
            chunk = self._take(n)
            if major == 3:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    raise _fail("utf8", "text chunk is not valid UTF-8", self.pos - n) from None
            chunks.append(chunk)

    def _array(self, n: int | None, depth: int, start: int) -> list[Any]:
        out: list[Any] = []
        if n is None:
            self._indefinite_allowed(start)
            while True:
                item = self.decode(depth + 1)
                if item is _BREAK:
                    return out
                self._count(1, start)
                out.append(item)
        self._count(n, start)
        for _ in range(n):
            item = self.decode(depth + 1)
            if item is _BREAK:
                raise _fail("unexpected-break", "break code inside definite array", start)
            out.append(item)
        return out

    def _map(self, n: int | None, depth: int, start: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        indefinite = n is None
        if indefinite:
            self._indefinite_allowed(start)
        else:
            assert n is not None
            self._count(2 * n, start)
        i = 0
        while indefinite or i < (n or 0):
            key_pos = self.pos
            key = self.decode(depth + 1)
            if key is _BREAK:
                if indefinite:
                    return out
                raise _fail("unexpected-break", "break code inside definite map", start)
            if indefinite:
                self._count(2, start)
            if type(key) is not int and type(key) is not str and type(key) is not bytes:
                key = _hashable(key, key_pos)
            value = self.decode(depth + 1)
            if value is _BREAK:
                raise _fail("unexpected-break", "map key without value", key_pos)
            if key in out:
                raise _fail("duplicate-key", f"duplicate map key {key!r}", key_pos)
            out[key] = value
            i += 1
        return out

    def _simple(self, info: int, start: int) -> Any:
        if info < 20:
            raise _fail("simple", f"unassigned simple value {info}", start)
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 23:
            return UNDEFINED
        if info == 24:
            value = self._take(1)[0]
            raise _fail("simple", f"unassigned simple value {value}", start)
        if info == 25:
            return struct.unpack(">e", self._take(2))[0]
        if info == 26:
            return struct.unpack(">f", self._take(4))[0]
        if info == 27:
            return struct.unpack(">d", self._take(8))[0]
        if info == 31:
            if not self.limits.allow_indefinite:
                raise _fail("unexpected-break", "break code outside indefinite item", start)
            return _BREAK
        raise _fail("reserved-info", f"reserved additional information {info}", start)


def _hashable(key: Any, offset: int) -> Any:
    """Map keys: int, text, bytes, arrays of those (as tuples) and tags.

    Booleans, floats, null and undefined are refused: in Python ``True == 1 ==
    1.0``, so accepting them would let ``true`` pose as label 1, and NaN keys
    would escape the duplicate check.
    """
    if isinstance(key, list):
        return tuple(_hashable(k, offset) for k in key)
    if isinstance(key, Tag):
        return Tag(key.number, _hashable(key.value, offset))
    if isinstance(key, bool) or not isinstance(key, int | str | bytes):
        raise _fail("map-key", f"map key of type {type(key).__name__} not allowed", offset)
    return key


def loads(data: bytes | bytearray | memoryview, limits: Limits = _DEFAULT_LIMITS) -> Any:
    """Decodes exactly one CBOR data item.

    Uses the native decoder when it is built; whatever it refuses goes to the
    reference decoder, which names the broken rule (see the module docstring).

    Args:
        data: the encoded item; nothing may follow it.
        limits: decoding bounds.

    Returns:
        The decoded value.

    Raises:
        FormatError: ``cbor.*`` naming the broken rule and the byte offset.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if _native is not None:
        try:
            return _native.loads(data, limits.max_depth, limits.max_items, limits.allow_indefinite)
        except _native.Invalid:
            pass  # refused: the reference decoder below raises the FormatError with its rule
    return _loads_python(data, limits)


def _loads_python(data: bytes, limits: Limits = _DEFAULT_LIMITS) -> Any:
    """The reference decoder behind :func:`loads` (also what the native decoder is tested against)."""
    if not data:
        raise FormatError("cbor.truncated", "empty input")
    dec = _Decoder(data, limits)
    try:
        value = dec.decode(0)
    except RecursionError:
        raise FormatError("cbor.too-deep", "nesting too deep") from None
    if value is _BREAK:
        raise FormatError("cbor.unexpected-break", "input is a lone break code")
    if dec.pos != len(data):
        raise FormatError("cbor.trailing", f"{len(data) - dec.pos} bytes after the item")
    return value


_SMALL_HEADS: Final = tuple(tuple(bytes([(major << 5) | n]) for n in range(24)) for major in range(8))


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return _SMALL_HEADS[major][n]
    if n < 0x100:
        return bytes([(major << 5) | 24, n])
    if n < 0x10000:
        return bytes([(major << 5) | 25]) + n.to_bytes(2, "big")
    if n < 0x1_0000_0000:
        return bytes([(major << 5) | 26]) + n.to_bytes(4, "big")
    if n < 0x1_0000_0000_0000_0000:
        return bytes([(major << 5) | 27]) + n.to_bytes(8, "big")
    raise FormatError("cbor.int-range", f"integer {n} does not fit in 64 bits")


def _encode(value: Any, out: list[bytes]) -> None:
    if value is True:
        out.append(b"\xf5")
    elif value is False:
        out.append(b"\xf4")
    elif value is None:
        out.append(b"\xf6")
    elif value is UNDEFINED:
        out.append(b"\xf7")
    elif isinstance(value, int):
        out.append(_head(0, value) if value >= 0 else _head(1, -1 - value))
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out.append(_head(2, len(raw)))
        out.append(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif isinstance(value, list | tuple):
        out.append(_head(4, len(value)))
        for item in value:
            _encode(item, out)
    elif isinstance(value, dict):
        pairs = sorted((_key_bytes(k), v) for k, v in value.items())
        out.append(_head(5, len(pairs)))
        for key, item in pairs:
            out.append(key)
            _encode(item, out)
    elif isinstance(value, Tag):
        out.append(_head(6, value.number))
        _encode(value.value, out)
    elif isinstance(value, Raw):
        out.append(value.encoded)
    elif isinstance(value, float):
        out.append(_float(value))
    else:
        raise FormatError("cbor.unencodable", f"cannot encode {type(value).__name__}")


@functools.lru_cache(maxsize=4096)
def _cached_key(key: int | str) -> bytes:
    out: list[bytes] = []
    _encode(key, out)
    return b"".join(out)


def _key_bytes(key: Any) -> bytes:
    """The encoded form of a map key (small int and text keys, the common case, are cached)."""
    if type(key) is int or type(key) is str:
        return _cached_key(key)
    return dumps(key)


def _float(value: float) -> bytes:
    if math.isnan(value):
        return b"\xf9\x7e\x00"
    for fmt, head in ((">e", 0xF9), (">f", 0xFA)):
        try:
            packed = struct.pack(fmt, value)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == value:
            return bytes([head]) + packed
    return b"\xfb" + struct.pack(">d", value)


def dumps(value: Any) -> bytes:
    """Encodes ``value`` deterministically (RFC 8949 section 4.2.1).

    Integers and lengths use their shortest form, maps are sorted by the bytes
    of their encoded keys, and only definite lengths are produced.

    Raises:
        FormatError: ``cbor.unencodable`` or ``cbor.int-range``.
    """
    if type(value) is bytes:  # the common single byte string (COSE payloads and signatures)
        return _head(2, len(value)) + value
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)

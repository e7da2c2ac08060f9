"""The protected access policy's payload: board file + policy for one device, at one version.

Owns: the plaintext a vendor seals into a policy artifact (``ism/policy/v1``)
and its strict decoding. The sealing itself (signature, encryption to the
device) is :mod:`ism.crypto.policy_seal`; keeping the payload format here
keeps it pure and testable without keys.
Must not import: crypto, device or anything above.

Payload (deterministic CBOR map, integer keys)::

    {
      1: "ism/policy/v1",      / type: nothing else is a policy payload /
      2: uint,                 / version: equals the policy TOML's ``version`` /
      3: bstr,                 / instance ID (UEID) of the one device it is for /
      4: tstr,                 / the board file (TOML text) /
      5: tstr,                 / the access policy (TOML text) /
    }

Threat: an artifact for another device, a version field that says one thing
while the policy inside says another, an ambiguous or padded encoding that
two parsers read differently. Decoding refuses unknown or missing keys,
wrong types, out-of-range sizes and any encoding that is not the
deterministic one (``policy.artifact``); :meth:`PolicyPayload.compile`
parses both TOML texts and refuses a version mismatch
(``policy.artifact-version``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import FormatError
from ism.formats import cbor
from ism.formats.board import Board, parse_board
from ism.formats.policy import Policy, parse_policy

__all__ = ["MAX_TEXT", "POLICY_TYPE", "PolicyPayload", "decode_payload", "make_payload"]

POLICY_TYPE: Final = "ism/policy/v1"
#: largest board file or policy text an artifact may carry (each)
MAX_TEXT: Final = 1024 * 1024
#: a UEID is 7 to 33 bytes (RFC 9711 §4.2.1)
_UEID_MIN, _UEID_MAX = 7, 33
_K_TYPE, _K_VERSION, _K_INSTANCE, _K_BOARD, _K_POLICY = 1, 2, 3, 4, 5
_KEYS: Final = frozenset({_K_TYPE, _K_VERSION, _K_INSTANCE, _K_BOARD, _K_POLICY})
_MAX_VERSION: Final = (1 << 63) - 1


def _bad(message: str, got: Any = None) -> FormatError:
    return FormatError("policy.artifact", message, got=got)


@dataclass(frozen=True, slots=True)
class PolicyPayload:
    """What a policy artifact carries, once verified and decrypted.

    The constructor checks the field types and sizes; :meth:`compile` checks
    the texts themselves.
    """

    version: int
    instance_id: bytes
    board_text: str = field(repr=False)
    policy_text: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or not 0 <= self.version <= _MAX_VERSION:
            raise _bad("version must be an unsigned 63-bit integer", self.version)
        if not isinstance(self.instance_id, bytes) or not _UEID_MIN <= len(self.instance_id) <= _UEID_MAX:
            raise _bad(f"instance ID must be a UEID of {_UEID_MIN}..{_UEID_MAX} bytes", self.instance_id)
        for name, text in (("board", self.board_text), ("policy", self.policy_text)):
            if not isinstance(text, str) or len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT:
                raise _bad(f"the {name} text must be a string of at most {MAX_TEXT} bytes")

    def encode(self) -> bytes:
        """The deterministic CBOR encoding (what gets encrypted and signed)."""
        return cbor.dumps(
            {
                _K_TYPE: POLICY_TYPE,
                _K_VERSION: self.version,
                _K_INSTANCE: self.instance_id,
                _K_BOARD: self.board_text,
                _K_POLICY: self.policy_text,
            }
        )

    def compile(self) -> tuple[Board, Policy]:
        """Parses the board file and the policy against it.

        Raises:
            FormatError: ``board.*`` / ``policy.*`` from the texts;
                ``policy.artifact-version`` if the policy's ``version`` is not the artifact's.
        """
        board = parse_board(self.board_text, "board.toml (policy artifact)")
        policy = parse_policy(self.policy_text, board, "policy.toml (policy artifact)")
        if policy.version != self.version:
            raise FormatError(
                "policy.artifact-version",
                "the artifact's version is not the version of the policy it carries",
                got=self.version,
                expected=policy.version,
            )
        return board, policy


def make_payload(board_text: str, policy_text: str, instance_id: bytes) -> PolicyPayload:
    """The payload for ``instance_id``: both texts are validated, the version is the policy's own.

    Raises:
        FormatError: ``board.*`` / ``policy.*`` for the texts, ``policy.artifact`` for the fields.
    """
    board = parse_board(board_text, "board.toml")
    policy = parse_policy(policy_text, board, "policy.toml")
    return PolicyPayload(policy.version, instance_id, board_text, policy_text)


def decode_payload(data: bytes) -> PolicyPayload:
    """Strictly decodes a payload (the plaintext inside a policy artifact).

    Raises:
        FormatError: ``cbor.*`` if it is not CBOR; ``policy.artifact`` for a wrong
            type, missing or unknown keys, wrong field types or sizes, or an encoding
            that is not the deterministic one.
    """
    raw: Any = cbor.loads(data)
    if not isinstance(raw, dict) or set(raw) != _KEYS:
        raise _bad("a policy payload is a map with keys 1..5", sorted(map(str, raw)) if isinstance(raw, dict) else None)
    if raw[_K_TYPE] != POLICY_TYPE:
        raise _bad(f"not a {POLICY_TYPE} payload", raw[_K_TYPE])
    for key in (_K_BOARD, _K_POLICY):
        if not isinstance(raw[key], str):
            raise _bad("board and policy must be text")
    payload = PolicyPayload(raw[_K_VERSION], raw[_K_INSTANCE], raw[_K_BOARD], raw[_K_POLICY])
    if payload.encode() != bytes(data):
        raise _bad("the payload is not deterministically encoded")
    return payload

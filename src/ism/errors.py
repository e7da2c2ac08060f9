"""The iSM error tree: every rejection is typed, coded and names the rule it broke.

Owns: :class:`ErrorCode` (stable numbers, never reused) and the exception
families. Imports nothing from ``ism``.

::

    IsmError
     +-- FormatError        malformed input (CBOR, COSE, SUIT, Wasm, TOML)
     +-- TrustError         well-formed but refused
     |    +-- SignatureError     signature/MAC does not verify (one code, no oracle)
     |    +-- DigestError        a digest does not match its content
     |    +-- RollbackError      sequence number below the anti-rollback counter
     |    +-- UntrustedSignerError  no trust anchor for the signer
     |    +-- ConditionError     a SUIT condition (vendor, class, size...) failed
     +-- PlatformError      the device's own state or I/O failed
     |    +-- StateCorruptError  persisted state fails its integrity check
     +-- UsageError         the caller (CLI user, API user) asked for something invalid
     +-- Violation          a microservice broke its policy (charged to it)

Each error carries ``rule`` (a stable dotted id such as ``boot.rollback``),
an optional ``subject`` (which microservice or file) and optional evidence
(``got`` and ``expected``). Remote parties should receive only ``code`` and
``rule`` (see :meth:`IsmError.public`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar

__all__ = [
    "ConditionError",
    "DigestError",
    "ErrorCode",
    "FormatError",
    "IsmError",
    "PlatformError",
    "RollbackError",
    "SignatureError",
    "StateCorruptError",
    "TrustError",
    "UntrustedSignerError",
    "UsageError",
    "Violation",
]


class ErrorCode(IntEnum):
    """Stable numeric error codes. Never renumber; never reuse a retired value."""

    FORMAT = 100
    TRUST = 200
    SIGNATURE = 201
    DIGEST = 202
    ROLLBACK = 203
    UNTRUSTED_SIGNER = 204
    CONDITION = 205
    PLATFORM = 300
    STATE_CORRUPT = 301
    USAGE = 400
    VIOLATION = 500


class IsmError(Exception):
    """Base of every error iSM raises on purpose.

    Args:
        rule: stable dotted id of the rule that was broken, e.g. ``suit.digest``.
        message: one human sentence.
        subject: what the error is about (microservice UUID, file name), if known.
        got: the offending value (evidence), if useful.
        expected: what the rule required, if useful.
    """

    code: ClassVar[ErrorCode] = ErrorCode.FORMAT

    def __init__(
        self,
        rule: str,
        message: str,
        *,
        subject: str | None = None,
        got: Any = None,
        expected: Any = None,
    ) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.subject = subject
        self.got = got
        self.expected = expected

    def __str__(self) -> str:
        text = f"[{int(self.code)} {self.rule}] {self.message}"
        if self.subject:
            text += f" ({self.subject})"
        return text

    def diagnostics(self) -> str:
        """A longer, human explanation including the evidence."""
        lines = [str(self)]
        if self.expected is not None:
            lines.append(f"  expected: {_short(self.expected)}")
        if self.got is not None:
            lines.append(f"  got:      {_short(self.got)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Full local report (evidence included) as JSON-friendly data."""
        out: dict[str, Any] = {
            "code": int(self.code),
            "error": type(self).__name__,
            "rule": self.rule,
            "message": self.message,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        if self.got is not None:
            out["got"] = _short(self.got)
        if self.expected is not None:
            out["expected"] = _short(self.expected)
        return out

    def public(self) -> dict[str, Any]:
        """What a remote party may learn: code and rule only."""
        return {"code": int(self.code), "rule": self.rule}


def _short(value: Any) -> str:
    text = bytes(value).hex() if isinstance(value, bytes | bytearray) else str(value)
    return text if len(text) <= 160 else text[:157] + "..."


class FormatError(IsmError):
    """Input is malformed: it does not parse, or breaks a structural rule."""

    code = ErrorCode.FORMAT


class TrustError(IsmError):
    """Input is well-formed but refused by a trust decision."""

    code = ErrorCode.TRUST


class SignatureError(TrustError):
    """A signature or MAC does not verify. All such failures share one code."""

    code = ErrorCode.SIGNATURE


class DigestError(TrustError):
    """A digest does not match the content it covers."""

    code = ErrorCode.DIGEST


class RollbackError(TrustError):
    """A sequence number is below the anti-rollback counter."""

    code = ErrorCode.ROLLBACK


class UntrustedSignerError(TrustError):
    """The signer does not chain to any provisioned trust anchor."""

    code = ErrorCode.UNTRUSTED_SIGNER


class ConditionError(TrustError):
    """A manifest condition (vendor, class, component, size) does not hold."""

    code = ErrorCode.CONDITION


class PlatformError(IsmError):
    """The device's own state, storage or peripherals failed."""

    code = ErrorCode.PLATFORM


class StateCorruptError(PlatformError):
    """Persisted device state fails its integrity check."""

    code = ErrorCode.STATE_CORRUPT


class UsageError(IsmError):
    """The caller asked for something invalid (bad argument, missing file)."""

    code = ErrorCode.USAGE


class Violation(IsmError):
    """A microservice broke its access policy or trapped; it is charged for it."""

    code = ErrorCode.VIOLATION

"""Downgrade authorisations: the only way past an anti-rollback counter.

Owns: the payload of a downgrade authorisation (a COSE_Sign1 signed by a
trust anchor) and its strict decoding.
Must not import: crypto, device or anything above.

Threat: an attacker replays an old, validly signed package to bring back a
known vulnerability. A downgrade is allowed only when a trust anchor signed
an authorisation naming this microservice, this device (instance ID), the
exact target sequence number and the counter value it downgrades from, so
the authorisation cannot be reused on another device, for another version,
or after the counter has moved on.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Final

from ism.errors import FormatError
from ism.formats import cbor

__all__ = ["DOWNGRADE_TYPE", "Downgrade"]

DOWNGRADE_TYPE: Final = "ism/downgrade/v1"
_K_TYPE, _K_UUID, _K_TARGET, _K_FROM, _K_INSTANCE = 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class Downgrade:
    """Permission to install ``target`` over counter value ``from_counter``."""

    uuid: uuidlib.UUID
    target: int
    from_counter: int
    instance_id: bytes

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                _K_TYPE: DOWNGRADE_TYPE,
                _K_UUID: self.uuid.bytes,
                _K_TARGET: self.target,
                _K_FROM: self.from_counter,
                _K_INSTANCE: self.instance_id,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Downgrade:
        raw: Any = cbor.loads(payload)
        if not isinstance(raw, dict) or set(raw) != {_K_TYPE, _K_UUID, _K_TARGET, _K_FROM, _K_INSTANCE}:
            raise FormatError("downgrade.format", "downgrade authorisation has the wrong fields")
        if raw[_K_TYPE] != DOWNGRADE_TYPE:
            raise FormatError("downgrade.format", "not a downgrade authorisation", got=raw[_K_TYPE])
        uid, target, frm, inst = raw[_K_UUID], raw[_K_TARGET], raw[_K_FROM], raw[_K_INSTANCE]
        if not isinstance(uid, bytes) or len(uid) != 16:
            raise FormatError("downgrade.format", "uuid must be 16 bytes")
        for value in (target, frm):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError("downgrade.format", "sequence numbers must be unsigned integers")
        if not isinstance(inst, bytes) or not 1 <= len(inst) <= 64:
            raise FormatError("downgrade.format", "instance id must be 1..64 bytes")
        return cls(uuidlib.UUID(bytes=uid), target, frm, inst)

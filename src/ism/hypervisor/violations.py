"""Violation records: what a microservice did wrong, for the developer and the vendor.

Owns: the :class:`ViolationRecord` data and its JSON form.
Must not import: services, agent, store, cli.

A record names the microservice (UUID, name, version, measurement), the rule
broken, the resource or gateway involved, trap details and a short guest
backtrace (innermost frame first, at most ``MAX_BACKTRACE``: where the guest
trapped, or the host call that broke the rule), the time, how many faults it
has had in the restart window, and what the supervisor did about it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ViolationRecord"]


@dataclass(frozen=True, slots=True)
class ViolationRecord:
    """One violation, as kept in the device's outbox until the store acknowledges it."""

    ms_uuid: str
    name: str
    version: str
    measurement: str
    rule: str
    details: str
    time: float
    count: int
    action: str
    target: str | None = None
    backtrace: tuple[str, ...] = field(default_factory=tuple)
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["backtrace"] = list(self.backtrace)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ViolationRecord:
        return cls(**{**raw, "backtrace": tuple(raw.get("backtrace", ()))})

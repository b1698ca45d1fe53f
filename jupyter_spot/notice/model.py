"""The one shape every interruption notice takes, whatever cloud or signal it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

Kind = Literal["interruption", "rebalance", "maintenance"]
Action = Literal["terminate", "stop", "hibernate", "preempt"]
KINDS: tuple[str, ...] = ("interruption", "rebalance", "maintenance")
ACTIONS: tuple[str, ...] = ("terminate", "stop", "hibernate", "preempt")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def deadline_in(seconds: float) -> datetime:
    """Now + ``seconds`` as an aware UTC time (clouds that give a lead time, not a time)."""
    return utcnow() + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Notice:
    """What is about to happen to this machine, and by when.

    ``event_id`` identifies the cloud's event (Azure acknowledges by it; for AWS
    it is derived from the notice's content) so a watcher reports each notice
    once however often it is polled.
    """

    kind: Kind
    action: Action
    deadline: datetime | None
    source: str
    event_id: str = ""
    detail: str = field(default="", compare=False)
    seen_at: datetime = field(default_factory=utcnow, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"notice kind must be one of {KINDS}, not {self.kind!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"notice action must be one of {ACTIONS}, not {self.action!r}")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("a notice deadline must be timezone-aware (UTC)")

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity for de-duplication: the same event polled twice has the same key."""
        return (self.source, self.kind, self.event_id or f"{self.action}@{self.deadline}")

    def seconds_left(self, now: datetime | None = None) -> float | None:
        """Seconds until the deadline (never negative), or None when the cloud gave no time."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - (now or utcnow())).total_seconds())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["deadline"] = self.deadline.isoformat() if self.deadline else None
        data["seen_at"] = self.seen_at.isoformat()
        data["seconds_left"] = self.seconds_left()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notice:
        """Inverse of :meth:`to_dict` (the server → kernel hand-off carries notices as JSON)."""
        deadline = data.get("deadline")
        seen_at = data.get("seen_at")
        return cls(
            kind=data["kind"],
            action=data["action"],
            deadline=datetime.fromisoformat(deadline) if deadline else None,
            source=data["source"],
            event_id=data.get("event_id", ""),
            detail=data.get("detail", ""),
            seen_at=datetime.fromisoformat(seen_at) if seen_at else utcnow(),
        )

    def describe(self) -> str:
        """One line for a human: what, from where, how long is left."""
        left = self.seconds_left()
        when = f"{left:.0f} s left" if left is not None else "no deadline given"
        what = {"rebalance": "rebalance recommendation (interruption likely soon)"}.get(
            self.kind, f"{self.kind}: {self.action}"
        )
        return f"{self.source} {what}, {when}"

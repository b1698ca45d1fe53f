"""What every notice source offers the watcher."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .model import Notice


class NoticeSource(ABC):
    """One place a notice can come from; ``poll`` is cheap, blocking and short.

    ``poll`` returns the most urgent notice standing right now (or None) and
    raises ``OSError`` when the endpoint cannot be reached — the watcher backs
    off then. ``interval`` is the pause between polls; a source whose ``poll``
    itself waits for a change (GCP's ``wait_for_change``, a signal) uses 0.
    """

    name: str = "source"
    interval: float = 5.0

    @abstractmethod
    def poll(self) -> Notice | None:
        """The notice standing now, or None."""

    def acknowledge(self, notice: Notice) -> None:
        """Tell the source the notice was handled (Azure: start the event now). Default: nothing."""

    def close(self) -> None:
        """Release what the source holds (signal handlers, pending waits)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(interval={self.interval:g})"

"""SIGTERM (systemd stop, Kubernetes eviction, node drain) as a notice.

The handler only records the signal and wakes the watcher; the previous
handler (the server's own shutdown, or the default "terminate") runs after the
callbacks are done, when the watcher acknowledges the notice — so the flush
happens before the process goes away, not after.  A second SIGTERM while that
is in progress is passed on at once: whoever sends two means it.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from .model import Notice, deadline_in
from .source import NoticeSource

DEFAULT_GRACE = 30.0  # Kubernetes' default terminationGracePeriodSeconds


class SignalSource(NoticeSource):
    """Turns a signal into an interruption notice; call from the main thread (signal's rule)."""

    name = "signal"
    interval = 0.0

    def __init__(self, signum: int = signal.SIGTERM, grace: float = DEFAULT_GRACE, wait: float = 1.0) -> None:
        self.signum = signum
        self.grace = grace
        self.wait = wait
        self._event = threading.Event()
        self._notice: Notice | None = None
        self._closed = False
        self._previous: Any = signal.signal(signum, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._notice is not None or self._closed:  # a second signal, or our work is done
            self._chain(frame)
            return
        self._notice = Notice(
            kind="interruption",
            action="terminate",
            deadline=deadline_in(self.grace),
            source=self.name,
            event_id=f"{signal.Signals(signum).name}-{os.getpid()}",
        )
        self._event.set()

    def poll(self) -> Notice | None:
        if self._event.wait(self.wait):
            self._event.clear()
        return self._notice

    def acknowledge(self, notice: Notice) -> None:
        """Our work is done: let the previous handler (or the default action) run now."""
        self._closed = True
        # Re-deliver on the main thread, where signal handlers belong; ours passes it on.
        signal.pthread_kill(threading.main_thread().ident or 0, self.signum)

    def _chain(self, frame: FrameType | None) -> None:
        previous = self._previous
        self._closed = True
        self._restore()
        if callable(previous):
            previous(self.signum, frame)
        elif previous in (signal.SIG_DFL, None):
            os.kill(os.getpid(), self.signum)  # the default action, now that ours is gone

    def _restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def close(self) -> None:
        """Stop turning signals into notices (off the main thread: ours only passes them on)."""
        self._closed = True
        self._restore()
        self._event.set()

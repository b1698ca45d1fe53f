"""Notices inside the kernel: flush on the main thread, even while a cell runs.

Why a signal: the snapshot must see the namespace as the running cell leaves
it, and only the main thread may safely walk it while that cell runs. CPython
runs a Python signal handler on the main thread between two bytecodes, so
SIGUSR1 interrupts a long pure-Python loop at once; ``time.sleep`` and
``select`` are interrupted too (PEP 475 runs the handler, then resumes the
call), so an idle kernel waiting in its event loop reacts just as quickly. A
thread that merely set a flag would wait for the cell to end — which, for a
60-minute training loop, is after the machine is gone. The limit: a single
long C call that does not check for signals (one huge BLAS call) delays the
handler until it returns.

Two ways a notice reaches the handler:

* this kernel watches by itself (nbclient, papermill, ``jupyter console``: no
  server extension) — a :class:`NoticeWatcher` thread polls the cloud, puts
  the notice in memory and sends SIGUSR1 to its own main thread;
* the server watches (it sets ``JUPYTER_SPOT_SERVER_WATCHES=1`` and
  ``JUPYTER_SPOT_NOTICE_FILE`` for each kernel) — it writes the notice as
  JSON to that file and sends SIGUSR1 with :func:`deliver_notice_to_kernel`.
  The kernel writes its pid to ``<notice file>.ready`` once the handler is
  installed; without that file the server must not signal (SIGUSR1's default
  action kills the process).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .model import Notice, deadline_in
from .watcher import NoticeWatcher

log = logging.getLogger("jupyter_spot.notice")

SERVER_WATCHES_ENV = "JUPYTER_SPOT_SERVER_WATCHES"
NOTICE_FILE_ENV = "JUPYTER_SPOT_NOTICE_FILE"
HANDOFF_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows: no hand-off there
HIBERNATE_BUDGET = 5.0  # seconds: RAM survives hibernation, so only what is cheap is flushed

Flush = Callable[[str, "datetime | None"], Any]
Snapshot = Callable[[str], Any]


class KernelNotReady(OSError):
    """The kernel has not installed jupyter-spot's notice handler; signalling it would kill it."""


def ready_file(notice_file: Path) -> Path:
    return Path(str(notice_file) + ".ready")


def _parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def deliver_notice_to_kernel(pid: int, notice: Notice, notice_file: Path) -> None:
    """Server side: hand ``notice`` to the kernel process ``pid`` (raises OSError if it cannot take it).

    Writes the notice JSON atomically to ``notice_file`` (the kernel's
    ``$JUPYTER_SPOT_NOTICE_FILE``), then sends SIGUSR1 to the pid the kernel
    wrote in ``<notice_file>.ready`` — which must be ``pid`` or its child
    (a launcher wrapping the kernel), so a stale file never gets a stranger signalled.
    """
    if HANDOFF_SIGNAL is None:
        raise KernelNotReady("notice hand-off needs SIGUSR1, which this platform lacks")
    notice_file = Path(notice_file)
    try:
        kernel_pid = int(ready_file(notice_file).read_text().strip())
    except (OSError, ValueError) as e:
        raise KernelNotReady(
            f"kernel {pid} has not installed jupyter-spot's notice handler ({ready_file(notice_file)}: {e})"
        ) from e
    if kernel_pid != pid and _parent_pid(kernel_pid) != pid:
        raise KernelNotReady(f"{ready_file(notice_file)} names pid {kernel_pid}, not kernel {pid} or its child")
    tmp = notice_file.with_name(f".{notice_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(notice.to_dict()))
    os.replace(tmp, notice_file)
    os.kill(kernel_pid, HANDOFF_SIGNAL)


class KernelNoticeHandler:
    """Receives notices on the kernel's main thread and flushes the session."""

    def __init__(
        self,
        flush: Flush,
        snapshot: Snapshot | None = None,
        notice_file: Path | None = None,
        stream: Any = None,
    ) -> None:
        self.flush = flush
        # A rebalance is one ordinary snapshot, durable but with no deadline.
        self.snapshot = snapshot or (lambda reason: flush(reason, None))
        self.notice_file = notice_file
        self.stream = stream
        self.watcher: NoticeWatcher | None = None
        self._pending: collections.deque[Notice] = collections.deque()  # from our watcher, oldest first
        self._done: dict[tuple[str, str, str], threading.Event] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self._previous: Any = None

    # -- installation (main thread) ------------------------------------------------------
    def install(self) -> None:
        """Install the SIGUSR1 handler and announce it through the ready file."""
        if HANDOFF_SIGNAL is None:
            return
        self._previous = signal.signal(HANDOFF_SIGNAL, self._on_signal)
        if self.notice_file is not None:
            ready = ready_file(self.notice_file)
            ready.parent.mkdir(parents=True, exist_ok=True)
            ready.write_text(str(os.getpid()))
            atexit.register(self._remove_ready)

    def _remove_ready(self) -> None:
        if self.notice_file is not None:
            ready_file(self.notice_file).unlink(missing_ok=True)

    def watch(self, watcher: NoticeWatcher) -> None:
        """Watch by ourselves: notices from ``watcher`` are delivered to the main thread."""
        watcher.add_callback(self._from_watcher)
        self.watcher = watcher.start()

    def close(self) -> None:
        """``%unload_ext``: stop watching, give SIGUSR1 back, withdraw the ready file."""
        if self.watcher is not None:
            self.watcher.stop()
        if HANDOFF_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            signal.signal(HANDOFF_SIGNAL, self._previous or signal.SIG_DFL)
        self._remove_ready()

    # -- delivery --------------------------------------------------------------------------
    def _from_watcher(self, notice: Notice) -> None:
        """Watcher thread: wake the main thread, then wait until it has handled the notice (Azure acks after).

        The watcher goes on polling meanwhile, for the interruption that may follow a rebalance.
        """
        done = self._done.setdefault(notice.key, threading.Event())
        self._pending.append(notice)
        signal.pthread_kill(threading.main_thread().ident or 0, HANDOFF_SIGNAL)  # type: ignore[arg-type]
        left = notice.seconds_left()
        done.wait(left if left is not None else 60.0)

    def _take(self) -> list[Notice]:
        """Notices waiting for the main thread: ours first, then the server's file."""
        taken = []
        while self._pending:
            taken.append(self._pending.popleft())
        if self.notice_file is not None:
            try:
                taken.append(Notice.from_dict(json.loads(self.notice_file.read_text())))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("jupyter-spot: ignoring an unreadable notice in %s: %s", self.notice_file, e)
        return taken

    def _on_signal(self, signum: int, frame: Any) -> None:
        for notice in self._take():
            self.handle(notice)

    # -- what a notice does ----------------------------------------------------------------
    def _say(self, text: str) -> None:
        print(f"\n\u26a0 jupyter-spot: {text}", file=self.stream or sys.stderr, flush=True)

    def handle(self, notice: Notice) -> Any:
        """Main thread: warn, then snapshot (rebalance) or flush before the deadline (interruption)."""
        if notice.key in self._seen:
            return None
        self._seen.add(notice.key)
        try:
            if notice.kind == "rebalance":
                self._say(f"{notice.describe()}. Taking a snapshot now; save your work.")
                result = self.snapshot("rebalance recommendation")
            else:
                deadline = notice.deadline
                if notice.action == "hibernate":  # memory survives: write only what is cheap
                    cheap = deadline_in(HIBERNATE_BUDGET)
                    deadline = min(deadline, cheap) if deadline else cheap
                self._say(f"{notice.describe()}. Saving this session now.")
                result = self.flush(f"{notice.source} {notice.kind}: {notice.action}", deadline)
            self._say(f"{result}")
            return result
        except Exception as e:  # a failed flush must not kill the user's running cell
            log.exception("jupyter-spot: flushing for %s failed", notice.describe())
            self._say(f"could not save the session for {notice.describe()}: {e}")
            return None
        finally:
            done = self._done.pop(notice.key, None)
            if done is not None:
                done.set()


def start_kernel_watch(
    flush: Flush,
    snapshot: Snapshot | None = None,
    watch: bool = True,
    poll_interval: float | None = None,
) -> KernelNoticeHandler | None:
    """Called by the kernel extension's load: install the hand-off and, without a server, watch.

    Returns None off the main thread or where SIGUSR1 does not exist — the
    kernel then relies on its after-cell snapshots alone.
    """
    if HANDOFF_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        log.info("jupyter-spot: interruption notices are not handled in this kernel (no SIGUSR1 on the main thread)")
        return None
    notice_file = os.environ.get(NOTICE_FILE_ENV)
    handler = KernelNoticeHandler(flush, snapshot, Path(notice_file) if notice_file else None)
    handler.install()
    if watch and os.environ.get(SERVER_WATCHES_ENV) != "1":
        threading.Thread(
            target=_watch_in_background, args=(handler, poll_interval), name="jupyter-spot-detect", daemon=True
        ).start()
    return handler


def _watch_in_background(handler: KernelNoticeHandler, poll_interval: float | None) -> None:
    """Detection may probe the network for a fraction of a second: never on the kernel's start path."""
    from .detect import cloud_sources, detect_cloud

    cloud = detect_cloud()
    sources = cloud_sources(cloud, poll_interval)
    if sources:
        log.info("jupyter-spot: watching %s for interruption notices", cloud)
        handler.watch(NoticeWatcher(sources))

"""Poll notice sources in the background and report each distinct notice once.

One daemon thread per source, so a source that waits for a change (GCP's
hanging GET, a signal) never delays another; and one per notice while its
callbacks run, so handling a notice never delays the next one from the same
source (AWS often recommends a rebalance shortly before it interrupts, and the
rebalance's snapshot has no deadline). A dead endpoint (a laptop has no
metadata service) is logged once and polled ever less often, up to
``max_backoff``; a callback that raises is logged and the others still run.
Two polls of one source start at least ``min_gap`` seconds apart, so an
endpoint that answers a long poll at once (ignoring GCP's ``wait_for_change``)
is not asked again in a tight loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from .model import Notice
from .source import NoticeSource

log = logging.getLogger("jupyter_spot.notice")

Callback = Callable[[Notice], object]
#: The least time between the starts of two polls of one source, in seconds.
MIN_POLL_GAP = 0.5


class NoticeWatcher:
    """Runs ``callbacks`` for every new notice from ``sources``.

    Callbacks run on a thread of their own for each notice and should return when
    their work for the notice is done (the flush is durable): only then is the
    source told (Azure approves the event, a SIGTERM goes on to the previous
    handler). The source is polled meanwhile.
    """

    def __init__(
        self,
        sources: Iterable[NoticeSource],
        callbacks: Iterable[Callback] = (),
        max_backoff: float = 30.0,
        min_gap: float = MIN_POLL_GAP,
    ) -> None:
        self.sources = list(sources)
        self.callbacks = list(callbacks)
        self.max_backoff = max_backoff
        self.min_gap = min_gap
        self.notices: list[Notice] = []  # every distinct notice seen, oldest first
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add_callback(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def start(self) -> NoticeWatcher:
        for source in self.sources:
            thread = threading.Thread(
                target=self._run, args=(source,), name=f"jupyter-spot-notice-{source.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        for source in self.sources:
            try:
                source.close()
            except Exception:  # closing must not mask the shutdown that called it
                log.debug("closing %r failed", source, exc_info=True)
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> NoticeWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, source: NoticeSource) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                notice = source.poll()
            except Exception as e:  # OSError for a dead endpoint; anything else is a bug, logged the same way
                failures += 1
                if failures == 1:
                    log.warning(
                        "jupyter-spot: no interruption notices from %s (%s); retrying quietly",
                        source.name,
                        e,
                    )
                delay = min(max(source.interval, 1.0) * 2 ** min(failures, 16), self.max_backoff)
            else:
                if failures:
                    log.info("jupyter-spot: %s answers again", source.name)
                failures = 0
                delay = source.interval
                if notice is not None:
                    self._dispatch(source, notice)
            self._stop.wait(max(delay, self.min_gap - (time.monotonic() - started)))

    def _dispatch(self, source: NoticeSource, notice: Notice) -> None:
        with self._lock:
            if notice.key in self._seen:
                return
            self._seen.add(notice.key)
            self.notices.append(notice)
        log.warning("jupyter-spot: %s", notice.describe())
        threading.Thread(
            target=self._handle, args=(source, notice), name=f"jupyter-spot-{notice.kind}-{source.name}", daemon=True
        ).start()

    def _handle(self, source: NoticeSource, notice: Notice) -> None:
        for callback in list(self.callbacks):
            try:
                callback(notice)
            except Exception:
                log.exception("jupyter-spot: notice callback %r failed", callback)
        try:
            source.acknowledge(notice)
        except Exception as e:
            log.warning("jupyter-spot: could not acknowledge %s to %s: %s", notice.event_id, source.name, e)

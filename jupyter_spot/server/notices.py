"""One notice watcher per server, and what the server does when a notice comes.

On a notice: emit the ``notice`` event; for an interruption, refuse new
kernels ("cancel new work"); hand the notice to every kernel (busy ones too:
the kernel's SIGUSR1 handler flushes between bytecodes, docs/notices.md);
wait — up to the deadline — until each kernel's session has a snapshot
committed after the notice, emitting ``flush`` events as they land; then
write a server record naming each notebook's kernel and its snapshot.

A flush is "done" when the store has it: a manifest of the kernel's session
that is newer than the newest one at the moment of the notice. That is the
durable fact the next machine depends on, so the server checks the store itself
rather than trusting a message from a kernel that is about to die.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..jobs.record import active_on_host
from ..store import StoreError
from ..store.holders import NOTICE_RECORD_PREFIX
from .catalog import isoformat

if TYPE_CHECKING:
    from ..notice import Notice, NoticeWatcher
    from .app import SpotApp

NOTICE_SCHEMA = "https://events.jupyter.org/jupyter_spot/notice/v1"
FLUSH_SCHEMA = "https://events.jupyter.org/jupyter_spot/flush/v1"
#: Actions after which this machine will not run new work.
ENDING_KINDS = ("interruption",)


def notice_event(notice: Notice) -> dict[str, Any]:
    """The notice as the contract's Notice object."""
    return {
        "kind": notice.kind,
        "action": notice.action,
        "deadline": isoformat(notice.deadline) if notice.deadline else None,
        "source": notice.source,
        "seconds_left": notice.seconds_left(),
    }


def build_sources(names: list[str], poll_interval: float | None) -> tuple[list[Any], str | None]:
    """Notice sources from ``SpotApp.notice_sources``: "auto" = this cloud (if any) + SIGTERM."""
    from ..notice import SignalSource, cloud_sources, detect_cloud

    sources: list[Any] = []
    provider = None
    for name in names:
        if name == "auto":
            provider = detect_cloud()
            sources += cloud_sources(provider, poll_interval)
            sources.append(SignalSource())
        elif name == "signal":
            sources.append(SignalSource())
        else:
            provider = name
            sources += cloud_sources(name, poll_interval)
    unique = {type(s): s for s in sources}  # "auto" plus "signal" must not install two handlers
    return list(unique.values()), provider


class NoticeCoordinator:
    """Turns notices from the watcher's threads into flushes on the server's event loop."""

    def __init__(self, app: SpotApp, watcher: NoticeWatcher | None, provider: str | None) -> None:
        self.app = app
        self.watcher = watcher
        self.provider = provider
        self.last_notice: Notice | None = None
        self.last_kernels: int | None = None
        self.loop = app.serverapp.io_loop.asyncio_loop
        if watcher is not None:
            watcher.add_callback(self.on_notice)

    def status(self) -> dict[str, Any]:
        sources = [s.name for s in self.watcher.sources] if self.watcher else []
        return {
            "watcher": {"running": self.watcher is not None, "provider": self.provider, "sources": sources},
            "last_notice": (
                {**notice_event(self.last_notice), "kernels": self.last_kernels} if self.last_notice else None
            ),
        }

    def on_notice(self, notice: Notice) -> None:
        """Watcher callback (the watcher's thread for this notice): returns once the flushes are durable or late."""
        future = asyncio.run_coroutine_threadsafe(self.handle(notice), self.loop)
        left = notice.seconds_left()
        future.result(timeout=(left if left is not None else self.app.flush_timeout) + 10)

    async def handle(self, notice: Notice) -> dict[str, Any]:
        """Everything the server does for one notice; returns the record it wrote."""
        kernels = self.app.kernels
        if notice.kind in ENDING_KINDS:
            kernels.refuse_reason = f"this machine is being reclaimed ({notice.describe()}); not starting new kernels"
        live = kernels.live_kernels()
        # How many flushes follow: with none, a front end must not wait for "kernel state saved".
        self.last_notice, self.last_kernels = notice, len(live)
        self.app.serverapp.event_logger.emit(
            schema_id=NOTICE_SCHEMA, data={**notice_event(notice), "kernels": len(live)}
        )
        before = await asyncio.gather(*(self._newest(k.session) for k in live))
        entries = [kernels.kernel_info(k.kernel_id) for k in live]
        for entry, newest in zip(entries, before, strict=True):
            entry["snapshot_before"] = newest
        await asyncio.gather(*(self._flush(notice, entry) for entry in entries))
        try:  # they die with the machine; a restore elsewhere re-runs them from their checkpoints
            jobs = await asyncio.to_thread(active_on_host, self.app.snapshot_store, kernels.host)
        except StoreError:
            jobs = []
        record = {
            "at": isoformat(notice.seen_at),
            "host": kernels.host,
            "server": self.app.serverapp.connection_url,
            "notice": notice_event(notice),
            "kernels": [{k: v for k, v in e.items() if k != "snapshot_before"} for e in entries],
            "jobs": jobs,
        }
        name = f"{NOTICE_RECORD_PREFIX}{notice.seen_at.strftime('%Y%m%dT%H%M%S.%f')}-{kernels.host}"[:128]
        try:
            await asyncio.to_thread(self.app.snapshot_store.put_record, name, record)
        except StoreError as error:
            self.app.log.error("jupyter-spot: could not write the notice record: %s", error)
        return record

    async def _newest(self, session: str) -> str | None:
        try:
            ids = await asyncio.to_thread(self.app.snapshot_store.list_snapshots, session)
        except StoreError:
            return None
        return ids[-1] if ids else None

    def _emit_flush(self, entry: dict[str, Any], status: str, **fields: Any) -> None:
        data = {"kernel_id": entry["kernel_id"], "session": entry["session"], "status": status}
        data.update({"snapshot_id": None, "seconds": None, "message": None, **fields})
        self.app.serverapp.event_logger.emit(schema_id=FLUSH_SCHEMA, data=data)

    async def _flush(self, notice: Notice, entry: dict[str, Any]) -> None:
        """Tell one kernel, then wait for its snapshot to be in the store."""
        from ..notice import deliver_notice_to_kernel

        started = time.monotonic()
        entry.update(status="failed", snapshot_id=None, seconds=None)
        notice_file = self.app.kernels.notice_files.get(entry["kernel_id"])
        try:
            if entry.get("pid") is None or notice_file is None:
                raise OSError("the server does not know this kernel's process")
            await asyncio.to_thread(deliver_notice_to_kernel, entry["pid"], notice, notice_file)
        except OSError as error:
            entry["message"] = f"could not reach the kernel: {error}"
            self._emit_flush(entry, "failed", message=entry["message"])
            return
        self._emit_flush(entry, "started")
        deadline = self._wait_until(notice)
        while True:
            newest = await self._newest(entry["session"])
            if newest is not None and newest != entry["snapshot_before"]:
                seconds = round(time.monotonic() - started, 3)
                entry.update(status="done", snapshot_id=newest, seconds=seconds)
                self._emit_flush(entry, "done", snapshot_id=newest, seconds=seconds)
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.app.flush_poll_interval)
        entry["message"] = "no new snapshot before the deadline"
        self._emit_flush(entry, "failed", message=entry["message"])

    def _wait_until(self, notice: Notice) -> float:
        """A monotonic time: the notice's deadline (less a margin for the record), else flush_timeout."""
        left = notice.seconds_left()
        budget = self.app.flush_timeout if left is None else max(1.0, left - 2.0)
        return time.monotonic() + budget

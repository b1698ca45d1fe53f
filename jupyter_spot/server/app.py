"""``SpotApp``: jupyter-spot as a jupyter_server extension.

Configured like any Jupyter app (``c.SpotApp.store = "s3://bucket/prefix"`` in
jupyter_server_config.py, or ``--SpotApp.auto_restore=True``). The store URL is
resolved the same way as in kernels: ``$JUPYTER_SPOT_STORE`` first.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, List, Unicode

from .._version import __version__
from ..config import resolve_keep_interrupted_days, resolve_store_url
from ..store import GCReport, Store, StoreError, collect_garbage, open_store
from ..store.lines import KEEP_INTERRUPTED_DAYS, LineIndex
from ..store.keys import KMS_ENV
from . import catalog
from .handlers import handlers
from .kernels import CONTENTS_SCHEMA, KERNEL_ACTIONS_SCHEMA, SpotKernels
from .losses import server_stop_cause, under_jupyterhub
from .notices import ENDING_KINDS, NoticeCoordinator, build_sources

EVENTS_DIR = Path(__file__).parent / "events"
#: How long a store health check stays fresh: GET status is polled by every browser tab.
WRITABLE_CHECK_TTL = 30.0


class SpotApp(ExtensionApp):
    """Snapshots every kernel, watches for interruption notices, restores on a fresh server."""

    name = "jupyter_spot"
    description = __doc__
    load_other_extensions = True

    store = Unicode(
        "",
        help="Store URL: a directory (local disk, EFS mount) or s3://bucket/prefix. "
        "$JUPYTER_SPOT_STORE wins; default: jupyter_spot/store in the Jupyter data dir.",
    ).tag(config=True)
    kms_key_id = Unicode(
        "",
        help="KMS key (id, alias or ARN) that wraps the signing keys kept in the store, so snapshots verify on "
        "any machine allowed to use it (docs/s3.md). $JUPYTER_SPOT_KMS_KEY wins; the server's kernels get it too.",
    ).tag(config=True)
    auto_load_kernel_extension = Bool(
        True, help="Load the kernel extension into every IPython kernel this server starts (no %load_ext needed)."
    ).tag(config=True)
    auto_restore = Bool(
        False,
        help="When a notebook whose session was interrupted starts a kernel, restore its latest snapshot "
        "into it without asking. Off: JupyterLab shows a restore banner instead.",
    ).tag(config=True)
    keep = Int(
        20, help="Snapshots kept per session by the server's periodic garbage collection (0: never collect)."
    ).tag(config=True)
    keep_interrupted_days = Float(
        KEEP_INTERRUPTED_DAYS,
        help="Garbage collection (the server's, its kernels' and `jupyter spot gc`) spares the newest snapshot "
        "of every line nobody restored or discarded for at least this many days. "
        "$JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS wins; the server passes it to its kernels.",
    ).tag(config=True)
    gc_interval = Float(3600.0, help="Seconds between garbage collections of the store.").tag(config=True)
    notice_sources = List(
        Unicode(),
        default_value=["auto"],
        help='Where notices come from: "auto" (the detected cloud + SIGTERM), "aws", "gcp", "azure", "signal". '
        "Empty: no watcher.",
    ).tag(config=True)
    notice_poll_interval = Float(
        None, allow_none=True, help="Seconds between metadata polls (default: the cloud's: AWS 5, Azure 1)."
    ).tag(config=True)
    flush_timeout = Float(30.0, help="Seconds to wait for kernel flushes when a notice gives no deadline.").tag(
        config=True
    )
    flush_poll_interval = Float(
        0.05, help="Seconds between store checks while waiting for a kernel's flush (a listing, cheap even on S3)."
    ).tag(config=True)
    restore_timeout = Float(300.0, help="Seconds a restore into a kernel may take.").tag(config=True)
    heartbeat_interval = Float(
        30.0,
        help="Seconds between this server's 'still running' marks on its sessions' records, so servers "
        "sharing a store (EFS, S3) do not offer each other's live notebooks for restore. 0: no marks.",
    ).tag(config=True)

    store_url = Unicode("")
    server_id = Unicode("", help="This server process's id in session records (set at start).")

    def initialize_settings(self) -> None:
        self.store_url = resolve_store_url(self.store)
        if self.kms_key_id:  # as the variable, so this server's kernels and their jobs use it too
            os.environ.setdefault(KMS_ENV, self.kms_key_id)
        self.server_id = uuid.uuid4().hex
        self.snapshot_store: Store = open_store(self.store_url)
        self.keep_interrupted_days = resolve_keep_interrupted_days(self.keep_interrupted_days)
        #: Each snapshot's line, read once per process (manifests never change).
        self.line_index = LineIndex(self.snapshot_store)
        self._writable: tuple[float, bool, str | None] = (0.0, False, None)
        logger = self.serverapp.event_logger
        for schema in sorted(EVENTS_DIR.glob("*.yaml")):
            logger.register_event_schema(schema)
        self.kernels = SpotKernels(self)
        logger.add_listener(schema_id=KERNEL_ACTIONS_SCHEMA, listener=self.kernels.on_kernel_action)
        logger.add_listener(schema_id=CONTENTS_SCHEMA, listener=self.kernels.on_contents_action)
        watcher, provider = self._make_watcher()
        self.notices = NoticeCoordinator(self, watcher, provider)
        self._gc_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.log.info(
            "jupyter-spot: store %s (%s); watcher: %s",
            self.store_url,
            self.snapshot_store.kind,
            ", ".join(s.name for s in watcher.sources) if watcher else "off",
        )

    def _make_watcher(self) -> tuple[Any, str | None]:
        if not self.notice_sources:
            return None, None
        from ..notice import NoticeWatcher

        sources, provider = build_sources(list(self.notice_sources), self.notice_poll_interval)
        return NoticeWatcher(sources).start(), provider

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers(self))

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.keep > 0 and self.gc_interval > 0:
            self._gc_task = asyncio.ensure_future(self._collect_garbage_periodically())
        if self.heartbeat_interval > 0:
            self._heartbeat_task = asyncio.ensure_future(self._beat_periodically())

    async def stop_extension(self) -> None:
        self.kernels.stopping = True  # the shutdowns that follow are the server's, not the user's
        for task in (self._gc_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
        cause = self._stop_cause()
        if cause is not None:  # offered back on the next server, saying why (records drop our heartbeat)
            await self.kernels.record_server_stop(cause)
        if self.heartbeat_interval > 0:  # other servers may offer these sessions for restore at once
            await self.kernels.heartbeat(beating=False)
        if self.notices.watcher is not None:
            await asyncio.to_thread(self.notices.watcher.stop)

    def _stop_cause(self) -> dict[str, Any] | None:
        """Why this server is stopping, for its kernels' sessions; None after a cloud's notice, which names itself."""
        notice = self.notices.last_notice
        if notice is not None and notice.source != "signal" and notice.kind in ENDING_KINDS:
            return None
        try:
            idle = (catalog.utcnow() - self.serverapp.web_app.last_activity()).total_seconds()
        except (AttributeError, KeyError, TypeError):  # no web app (a server stopped before it started)
            idle = 0.0
        signalled = notice is not None and notice.source == "signal"
        return server_stop_cause(hub=under_jupyterhub(os.environ), idle_seconds=max(0.0, idle), signalled=signalled)

    async def _collect_garbage_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            try:
                report = await self.collect_garbage()
                self.log.info("jupyter-spot: garbage collection %s", report)
            except StoreError as error:
                self.log.warning("jupyter-spot: garbage collection failed: %s", error)
            except Exception:  # noqa: BLE001 - one bad round must not end collection for the server's life
                self.log.exception("jupyter-spot: garbage collection failed; trying again in %g s", self.gc_interval)

    async def collect_garbage(self) -> GCReport:
        """One collection: ``keep`` snapshots per session, every undecided line's newest, referenced blobs."""
        return await asyncio.to_thread(
            collect_garbage, self.snapshot_store, self.keep, keep_interrupted_days=self.keep_interrupted_days
        )

    async def _beat_periodically(self) -> None:
        """Every few seconds, forever: one failed beat is logged, and the next one still comes."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.kernels.heartbeat()
            except Exception:  # noqa: BLE001 - a dead heartbeat makes other servers offer live kernels for restore
                self.log.exception("jupyter-spot: heartbeat failed; beating again in %g s", self.heartbeat_interval)

    async def session_is_interrupted(self, session: str) -> bool:
        try:
            described = await asyncio.to_thread(
                catalog.describe_session,
                self.snapshot_store,
                session,
                self.kernels.live_kernels(),
                server_id=self.server_id,
                index=self.line_index,
            )
        except StoreError as error:
            self.log.warning("jupyter-spot: cannot read session %r: %s", session, error)
            return False
        return bool(described and described["interrupted"])

    async def status(self) -> dict[str, Any]:
        checked, writable, error = self._writable
        if time.monotonic() - checked > WRITABLE_CHECK_TTL:
            try:
                await asyncio.to_thread(self.snapshot_store.check_writable)
                writable, error = True, None
            except StoreError as exc:
                writable, error = False, str(exc)
            self._writable = (time.monotonic(), writable, error)
        return {
            "version": __version__,
            "store": {"url": self.store_url, "kind": self.snapshot_store.kind, "writable": writable, "error": error},
            **self.notices.status(),
        }

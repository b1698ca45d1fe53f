"""The server's kernels as jupyter-spot sees them: launch settings, sessions, restore.

jupyter_server has no hook to add launch arguments to every kernel, so the
mapping kernel manager's ``start_kernel`` is wrapped on the instance (the
sessions API, the kernels API and other extensions all start kernels through
it). The wrapper gives each kernel:

* ``JUPYTER_SPOT_SESSION`` — the notebook path relative to the server root
  (the sessions API passes it as ``JPY_SESSION_NAME``, absolute when it knows
  the file name), else the kernel id;
* ``JUPYTER_SPOT_STORE`` — the server's store, so kernel and server agree;
* ``JUPYTER_SPOT_SERVER_WATCHES=1`` and ``JUPYTER_SPOT_NOTICE_FILE`` — the
  server watches for notices and hands them over (docs/notices.md);
* ``--ext=jupyter_spot`` for IPython kernels, so no ``%load_ext`` is needed.

Clean shutdowns and user restarts are learned from jupyter_server's own
``kernel_actions`` events, not by wrapping ``shutdown_kernel``. Kernels lost
without the user asking are learned from jupyter_client's restarter callbacks
(death, auto-restart) and a wrapped ``cull_kernel_if_idle`` (server/losses.py):
their lines stay offered for restore, with the cause.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_core.utils import ensure_async
from tornado import web

from ..config import KEEP_INTERRUPTED_DAYS_ENV, NOTEBOOK_PATH_ENV, SESSION_ENV, STORE_ENV
from ..faults import fault_point
from ..store import StoreError
from ..store.holders import fresh_holders, holder_key, read_session_record, session_record_name
from ..store.keys import KMS_ENV
from .catalog import (
    LiveKernel,
    close_kernel_lines,
    isoformat,
    renamed_session,
    skipped_list,
    snapshot_summary,
    utcnow,
)
from .kernel_calls import KernelRestoreError, evaluate_in_kernel, rename_expression, restore_expression
from .losses import cull_cause, exit_cause

if TYPE_CHECKING:
    from .app import SpotApp

SERVER_WATCHES_ENV = "JUPYTER_SPOT_SERVER_WATCHES"
NOTICE_FILE_ENV = "JUPYTER_SPOT_NOTICE_FILE"
KERNEL_ACTIONS_SCHEMA = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"
CONTENTS_SCHEMA = "https://events.jupyter.org/jupyter_server/contents_service/v1"
#: Losses kept per session record (the newest), enough to name the cause of every line still offered.
LOSSES_KEPT = 10
#: A busy kernel takes the rename when its running cell ends; one busier than this keeps the old name.
RENAME_TIMEOUT = 3600.0


#: The notebook path of the sessions-API request starting a kernel, while it starts it.
_notebook_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("jupyter_spot_notebook", default=None)


class SpotKernels:
    """Tracks which kernel holds which session, starts kernels for restores, restores."""

    def __init__(self, app: SpotApp) -> None:
        self.app = app
        self.km = app.serverapp.kernel_manager
        self.live: dict[str, LiveKernel] = {}
        self.notice_files: dict[str, Path] = {}
        self.refuse_reason: str | None = None
        self.stopping = False
        self.host = socket.gethostname()
        self.notice_dir = Path(jupyter_runtime_dir()) / "jupyter_spot"
        # One writer at a time: a heartbeat must not land after a kernel's "closed" record.
        self._record_lock = asyncio.Lock()
        self._start = self.km.start_kernel
        self.km.start_kernel = self.start_kernel
        #: Kernels the restarter found dead, until the restart event that follows: the cause of the loss.
        self.pending_losses: dict[str, dict[str, Any]] = {}
        #: Kernels the idle culler is shutting down: their shutdown is a loss, not the user's clean end.
        self.culling: dict[str, float] = {}
        self._cull = getattr(self.km, "cull_kernel_if_idle", None)
        if self._cull is not None:
            self.km.cull_kernel_if_idle = self.cull_kernel_if_idle
        sessions = getattr(app.serverapp, "session_manager", None)
        if sessions is not None:
            self._start_for_session = sessions.start_kernel_for_session
            sessions.start_kernel_for_session = self.start_kernel_for_session

    async def start_kernel_for_session(self, session_id: str, path: str | None, *args: Any, **kwargs: Any) -> str:
        """``SessionManager.start_kernel_for_session``, noting the notebook's path for :meth:`session_for`.

        The path is the notebook's identity. ``JPY_SESSION_NAME`` is built from
        the client's session *name* instead, which a client may leave empty (then
        it names the folder, and every notebook in it would share one session)
        or set to anything.
        """
        token = _notebook_path.set(path.strip("/") if isinstance(path, str) and path.strip("/") else None)
        try:
            return await self._start_for_session(session_id, path, *args, **kwargs)
        finally:
            _notebook_path.reset(token)

    def live_kernels(self) -> list[LiveKernel]:
        """Live kernels, oldest first; kernels that died on their own drop out once their loss is recorded."""
        recording = self.pending_losses.keys() | self.culling.keys()
        for kernel_id in [k for k in self.live if k not in self.km and k not in recording]:
            del self.live[kernel_id]
        return sorted(self.live.values(), key=lambda k: k.started)

    def session_for(self, env: dict[str, str], kernel_id: str) -> str:
        """An explicit ``JUPYTER_SPOT_SESSION``, else the notebook path relative to the root dir (the
        sessions API's path when it names a notebook, else ``JPY_SESSION_NAME``), else the kernel id."""
        if env.get(SESSION_ENV):
            return env[SESSION_ENV]
        api_path = _notebook_path.get()
        if api_path and api_path.endswith(".ipynb"):
            return api_path
        # JupyterLab starts a notebook's session at a placeholder path (`work/<uuid>`) and names
        # it after the notebook: then the name (JPY_SESSION_NAME) is the notebook.
        path = env.get(NOTEBOOK_PATH_ENV, "")
        if not path or path.endswith(("/", os.sep)):
            return api_path or kernel_id  # a folder or nothing, not a notebook: an empty session name
        root = os.path.realpath(self.app.serverapp.root_dir)
        if os.path.isabs(path):
            real = os.path.realpath(path)
            if real == root or not real.startswith(root + os.sep):
                return path
            path = os.path.relpath(real, root)
        return path.replace(os.sep, "/").lstrip("/")

    def is_ipython(self, kernel_name: str | None) -> bool:
        try:
            spec = self.km.kernel_spec_manager.get_kernel_spec(kernel_name or self.km.default_kernel_name)
        except Exception:  # noqa: BLE001 - an unknown spec fails in start_kernel with a better message
            return False
        return spec.language.lower() == "python" and any("ipykernel" in arg for arg in spec.argv)

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any) -> str:
        """``MappingKernelManager.start_kernel`` plus jupyter-spot's launch settings."""
        if kernel_id is not None and kernel_id in self.km:
            return await self._start(kernel_id=kernel_id, path=path, **kwargs)
        if self.refuse_reason:
            raise web.HTTPError(503, self.refuse_reason)
        kernel_id = kernel_id or str(uuid.uuid4())
        env = dict(kwargs.get("env") or os.environ)
        session = self.session_for(env, kernel_id)
        notice_file = self.notice_dir / f"notice-{kernel_id}.json"
        self.notice_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                SESSION_ENV: session,
                STORE_ENV: self.app.store_url,
                SERVER_WATCHES_ENV: "1",
                NOTICE_FILE_ENV: str(notice_file),
                KEEP_INTERRUPTED_DAYS_ENV: repr(self.app.keep_interrupted_days),
            }
        )
        if os.environ.get(KMS_ENV):  # the server's KMS key (c.SpotApp.kms_key_id too): one key for both
            env.setdefault(KMS_ENV, os.environ[KMS_ENV])
        kwargs["env"] = env
        ipython = self.is_ipython(kwargs.get("kernel_name"))
        if self.app.auto_load_kernel_extension and ipython:
            kwargs["extra_arguments"] = [*kwargs.get("extra_arguments", []), "--ext=jupyter_spot"]
        interrupted = False
        if self.app.auto_restore and ipython:
            interrupted = await self.app.session_is_interrupted(session)
        started = utcnow()
        kernel_id = await self._start(kernel_id=kernel_id, path=path, **kwargs)
        try:
            fault_point("kernel-started")
            cwd = self.km.cwd_for_path(path, env=env) if path is not None else os.getcwd()
            self.live[kernel_id] = LiveKernel(kernel_id, session, started, cwd=cwd)
            self.notice_files[kernel_id] = notice_file
            manager = self.km.get_kernel(kernel_id)
            for event in ("restart", "dead"):  # fired only for kernels that died on their own
                self.km.add_restart_callback(
                    kernel_id, lambda event=event: self._on_kernel_lost(kernel_id, manager, event), event
                )
            await self._write_session_record(kernel_id, "live")
        except BaseException:
            await self._discard_kernel(kernel_id)
            raise
        if interrupted:
            self.app.log.info("jupyter-spot: restoring interrupted session %r into kernel %s", session, kernel_id)
            task = asyncio.ensure_future(self.restore(session, "latest", kernel_id))
            task.add_done_callback(self._log_auto_restore)
        return kernel_id

    async def _discard_kernel(self, kernel_id: str) -> None:
        """Shut down a kernel whose start failed after its process began: the caller gets an error, not a kernel,
        so nobody else would ever stop it."""
        self.live.pop(kernel_id, None)
        notice_file = self.notice_files.pop(kernel_id, None)
        if notice_file is not None:
            notice_file.unlink(missing_ok=True)
        try:
            await self.km.shutdown_kernel(kernel_id, now=True)
        except Exception as error:  # noqa: BLE001 - the start's own error is the one to raise
            self.app.log.error("jupyter-spot: could not shut down half-started kernel %s: %s", kernel_id, error)

    def _on_kernel_lost(self, kernel_id: str, manager: Any, event: str) -> None:
        """Restarter callback: the kernel process died; keep why (its exit status) for the restart event."""
        process = getattr(getattr(manager, "provisioner", None), "process", None)
        cause = exit_cause(process.poll() if process is not None else None)
        cause.update(kernel_id=kernel_id, at=isoformat(utcnow()))
        self.app.log.warning("jupyter-spot: kernel %s lost: %s", kernel_id, cause["text"])
        self.pending_losses[kernel_id] = cause  # until recorded: the restart event that follows, or now
        if event == "dead":  # restarts failed: jupyter_server drops the kernel; its lines stay offered
            asyncio.ensure_future(self._record_loss(kernel_id, cause, ended=True))

    async def _record_loss(self, kernel_id: str, cause: dict[str, Any], *, ended: bool) -> None:
        """Keep the cause in the session record; an ended kernel leaves the live set with it."""
        live = self.live.get(kernel_id)
        if live is None:
            return
        live.losses = [*live.losses, cause][-LOSSES_KEPT:]
        await self._write_session_record(kernel_id, "lost" if ended else "live")
        if ended:
            self._forget(kernel_id)

    async def record_server_stop(self, cause: dict[str, Any]) -> None:
        """The server is stopping: every live kernel is lost with ``cause``, so its session is offered back."""
        for kernel in self.live_kernels():
            loss = {**cause, "kernel_id": kernel.kernel_id, "at": isoformat(utcnow())}
            await self._record_loss(kernel.kernel_id, loss, ended=True)

    async def cull_kernel_if_idle(self, kernel_id: str) -> Any:
        """``MappingKernelManager.cull_kernel_if_idle``, remembering the idle time of a kernel it shuts down."""
        kernel = self.km.get_kernel(kernel_id) if kernel_id in self.km else None
        last = getattr(kernel, "last_activity", None)
        self.culling[kernel_id] = (utcnow() - last).total_seconds() if last is not None else 0.0
        try:
            return await ensure_async(self._cull(kernel_id))
        finally:
            if kernel_id in self.km:  # not idle enough: not culled
                self.culling.pop(kernel_id, None)

    def _log_auto_restore(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.app.log.warning("jupyter-spot: automatic restore failed: %s", getattr(error, "log_message", error))

    def kernel_info(self, kernel_id: str) -> dict[str, Any]:
        """What the server record keeps about a kernel so another machine can recreate it."""
        kernel = self.km.get_kernel(kernel_id)
        spec = kernel.kernel_spec
        live = self.live.get(kernel_id)
        return {
            "kernel_id": kernel_id,
            "session": live.session if live else None,
            "kernel_spec": {
                "name": kernel.kernel_name,
                "display_name": getattr(spec, "display_name", None),
                "language": getattr(spec, "language", None),
            },
            "cwd": live.cwd if live else None,
            "pid": getattr(getattr(kernel, "provisioner", None), "pid", None),
        }

    async def _write_session_record(
        self, kernel_id: str, state: str, *, beating: bool = True, renamed_to: str | None = None
    ) -> None:
        """The session's record; ``beating=False`` (server stopping) drops the heartbeat at once."""
        async with self._record_lock:
            await self._put_session_record(kernel_id, state, beating, renamed_to)

    async def _put_session_record(
        self, kernel_id: str, state: str, beating: bool, renamed_to: str | None = None
    ) -> None:
        live = self.live.get(kernel_id)
        if live is None:
            return
        store, name = self.app.snapshot_store, session_record_name(live.session)
        try:
            previous = await asyncio.to_thread(read_session_record, store, live.session)
        except StoreError:
            previous = {}
        # Every other live kernel of this session keeps its entry (ours under other servers too);
        # this kernel's is replaced, and an entry an older version of this server keyed by its id goes.
        mine = holder_key(self.app.server_id, kernel_id)
        holders = {k: v for k, v in fresh_holders(previous).items() if k not in (mine, self.app.server_id)}
        if state == "live" and beating and self.app.heartbeat_interval > 0:
            holders[mine] = {
                "server_id": self.app.server_id,
                "kernel_id": kernel_id,
                "host": self.host,
                "server": self.app.serverapp.connection_url,
                "server_pid": os.getpid(),
                "heartbeat": isoformat(utcnow()),
                "heartbeat_interval": self.app.heartbeat_interval,
            }
        record = {
            "session": live.session,
            "state": state,
            "kernel_id": kernel_id,
            "host": self.host,
            "server": self.app.serverapp.connection_url,
            "started": isoformat(live.started),
            "kernel": self.kernel_info(kernel_id) if kernel_id in self.km else None,
            "holders": holders,
        }
        if state == "closed":
            record["closed_at"] = isoformat(utcnow())
        # Losses of earlier kernels of the session stay: their lines may still be offered.
        earlier = previous.get("lost") if isinstance(previous.get("lost"), list) else []
        losses = [loss for loss in earlier if isinstance(loss, dict) and loss not in live.losses] + live.losses
        if losses:
            record["lost"] = losses[-LOSSES_KEPT:]
        if renamed_to is not None:
            record["renamed_to"] = renamed_to
        try:
            await asyncio.to_thread(store.put_record, name, record)
        except StoreError as error:
            self.app.log.warning("jupyter-spot: could not record session %r: %s", live.session, error)

    async def heartbeat(self, *, beating: bool = True) -> None:
        """Mark every live kernel's session as still running here (servers sharing the store read it)."""
        fault_point("heartbeat")
        for kernel in self.live_kernels():
            async with self._record_lock:
                if kernel.kernel_id not in self.live:  # shut down while we waited
                    continue
                try:
                    await self._put_session_record(kernel.kernel_id, "live", beating)
                except Exception:  # noqa: BLE001 - one session's trouble must not stop the others' beats
                    self.app.log.exception("jupyter-spot: heartbeat for session %r failed", kernel.session)

    async def on_kernel_action(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        """Listener for jupyter_server's kernel_actions events: restarts and clean shutdowns."""
        kernel_id = data.get("kernel_id")
        if data.get("status") != "success" or kernel_id not in self.live:
            return
        if data.get("action") == "restart":
            loss = self.pending_losses.pop(kernel_id, None)
            # Both before the old process's lines stop counting as this kernel's (``started`` below),
            # so the sessions API never offers them without their cause, nor after a user restart.
            if loss is None:  # the user asked: a clean end of the old process's lines
                await self._close_lines(kernel_id)
            else:  # died and restarted on its own: its lines stay offered, with the cause
                await self._record_loss(kernel_id, loss, ended=False)
            if kernel_id in self.live:
                self.live[kernel_id].started = utcnow()
                self.live[kernel_id].restored = None
        elif data.get("action") == "shutdown":
            culled = self.culling.get(kernel_id)  # dropped by _forget, once the loss is recorded
            if culled is not None:
                cause = {**cull_cause(culled), "kernel_id": kernel_id, "at": isoformat(utcnow())}
                await self._record_loss(kernel_id, cause, ended=True)
            elif not self.stopping:  # a server going down is not the user closing the notebook
                await self._close_lines(kernel_id)
                await self._write_session_record(kernel_id, "closed")
            self._forget(kernel_id)

    def _forget(self, kernel_id: str) -> None:
        self.live.pop(kernel_id, None)
        self.pending_losses.pop(kernel_id, None)
        self.culling.pop(kernel_id, None)
        notice_file = self.notice_files.pop(kernel_id, None)
        if notice_file is not None:
            notice_file.unlink(missing_ok=True)

    async def _close_lines(self, kernel_id: str) -> None:
        """The user shut the kernel down: its lines are closed, so no restore is offered for them."""
        live = self.live.get(kernel_id)
        if live is None:
            return
        try:
            await asyncio.to_thread(
                close_kernel_lines, self.app.snapshot_store, live.session, kernel_id, self.app.line_index
            )
        except StoreError as error:
            self.app.log.warning("jupyter-spot: could not close the lines of kernel %s: %s", kernel_id, error)

    async def on_contents_action(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        """Listener for contents events: a renamed or moved notebook's kernel snapshots under its new path."""
        old, new = (str(data.get(key) or "").strip("/") for key in ("source_path", "path"))
        if data.get("action") != "rename" or not old or not new:
            return
        for kernel in self.live_kernels():
            session = renamed_session(kernel.session, old, new)
            if session is not None:
                await self._move_session(kernel.kernel_id, session)

    async def _move_session(self, kernel_id: str, session: str) -> None:
        """Switch the kernel first; then close the old name's record (no restore offered) and open the new."""
        if not await self._tell_kernel_its_session(kernel_id, session) or kernel_id not in self.live:
            return
        old = self.live[kernel_id].session
        # A restart launches the kernel again with the arguments it was started with.
        launch = getattr(self.km.get_kernel(kernel_id), "_launch_args", None)
        if isinstance(launch, dict) and isinstance(launch.get("env"), dict):
            launch["env"][SESSION_ENV] = session
        await self._close_lines(kernel_id)
        await self._write_session_record(kernel_id, "closed", renamed_to=session)
        self.live[kernel_id].session = session
        await self._write_session_record(kernel_id, "live")
        self.app.log.info("jupyter-spot: kernel %s now snapshots as %r (was %r)", kernel_id, session, old)

    async def _tell_kernel_its_session(self, kernel_id: str, session: str) -> bool:
        try:
            await evaluate_in_kernel(self.km.get_kernel(kernel_id), rename_expression(session), RENAME_TIMEOUT)
        except (KeyError, KernelRestoreError, TimeoutError, RuntimeError) as error:
            self.app.log.warning(
                "jupyter-spot: kernel %s could not switch its snapshots to %r: %s", kernel_id, session, error
            )
            return False
        return True

    async def restore(self, session: str, snapshot: str, kernel_id: str | None) -> dict[str, Any]:
        """Load a snapshot into ``kernel_id``, the session's live kernel, or a new kernel."""
        if kernel_id is not None:
            if kernel_id not in self.km:
                raise web.HTTPError(404, f"no kernel {kernel_id} on this server")
        else:
            mine = [k for k in self.live_kernels() if k.session == session]
            kernel_id = mine[-1].kernel_id if mine else await self._start_for(session)
        kernel = self.km.get_kernel(kernel_id)
        try:
            report = json.loads(
                await evaluate_in_kernel(kernel, restore_expression(snapshot, session), self.app.restore_timeout)
            )
        except (KernelRestoreError, TimeoutError, RuntimeError) as error:
            raise web.HTTPError(500, f"restore into kernel {kernel_id} failed: {error}") from None
        if report.get("error") or not report.get("snapshot_id"):
            # The kernel worked; the store had nothing it may load (every snapshot refused, with the reasons).
            notes = "; ".join(report.get("fallbacks") or [])
            raise web.HTTPError(
                409, f"restore into kernel {kernel_id} failed: {report.get('error')}" + (f" ({notes})" if notes else "")
            )
        snapshot_id = report["snapshot_id"]
        if kernel_id in self.live:
            self.live[kernel_id].restored = snapshot_id
        return {"kernel_id": kernel_id, "report": await self._report(session, snapshot_id, report)}

    async def _start_for(self, session: str) -> str:
        """A kernel like the one the session last had (spec and directory), if we can tell."""
        try:
            record = await asyncio.to_thread(read_session_record, self.app.snapshot_store, session)
        except StoreError:
            record = {}
        spec = (record.get("kernel") or {}).get("kernel_spec")
        spec_name = spec.get("name") if isinstance(spec, dict) else None
        if spec_name not in self.km.kernel_spec_manager.find_kernel_specs():
            spec_name = None
        directory = session.rsplit("/", 1)[0] if "/" in session else ""
        path = directory if await self._is_dir(directory) else ""
        env = {**os.environ, SESSION_ENV: session}
        return await self.km.start_kernel(path=path, kernel_name=spec_name, env=env)

    async def _is_dir(self, api_path: str) -> bool:
        try:
            return bool(await ensure_async(self.app.serverapp.contents_manager.dir_exists(api_path)))
        except Exception:  # noqa: BLE001 - a contents manager that cannot tell: start in the root
            return False

    async def _report(self, session: str, snapshot_id: str, report: dict[str, Any]) -> dict[str, Any]:
        """The kernel's RestoreReport in the API's shape, with the snapshot summarized by the server."""
        try:
            manifest = await asyncio.to_thread(self.app.snapshot_store.load_manifest, session, snapshot_id)
            summary = snapshot_summary(manifest)
        except (StoreError, ValueError):
            summary = {"id": snapshot_id, "session": session}
        return {
            "snapshot": summary,
            "restored": list(report.get("restored") or []),
            "not_restored": skipped_list(report.get("not_restored")),
            "notes": [f"fallback: {n}" for n in report.get("fallbacks") or []]
            + [str(n) for n in report.get("notes") or []],
        }

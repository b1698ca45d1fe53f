"""REST API under ``{base_url}jupyter-spot/api/`` (contract: docs/server.md).

Every route is authenticated (``@web.authenticated``) and authorized on the
``spot`` resource; writes also pass tornado's XSRF check, which APIHandler
applies to POST and DELETE. Store calls block (S3 is a network call), so they
run in a worker thread and never stall the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..store import ManifestError, StoreError
from ..store.base import check_snapshot_id
from . import catalog
from .catalog import BadId, check_session_name

if TYPE_CHECKING:
    from .app import SpotApp

AUTH_RESOURCE = "spot"


class SpotHandler(ExtensionHandlerMixin, APIHandler):
    """Shared plumbing: the app, JSON errors with ``{"message"}``, id checks."""

    auth_resource = AUTH_RESOURCE

    @property
    def spot(self) -> SpotApp:
        return self.extensionapp  # type: ignore[return-value]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"message": ...}`` as the contract says (APIHandler adds a traceback only in dev mode)."""
        self.set_header("Content-Type", "application/json")
        message = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info:
            error = exc_info[1]
            if isinstance(error, web.HTTPError) and error.log_message:
                message = error.log_message % error.args if error.args else error.log_message
        self.finish(json.dumps({"message": message}))

    def object_body(self, example: str) -> dict[str, Any]:
        """The request's JSON object (empty body: {}); 400 for anything else."""
        try:
            body = self.get_json_body() or {}
        except web.HTTPError:
            raise web.HTTPError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, f"the body must be a JSON object like {example}")
        return body

    def session_arg(self, raw: str) -> str:
        try:
            return check_session_name(raw)
        except BadId as error:
            raise web.HTTPError(400, str(error)) from None

    @staticmethod
    def snapshot_arg(raw: str) -> str:
        try:
            return check_snapshot_id(raw)
        except StoreError as error:
            raise web.HTTPError(400, str(error)) from None

    async def in_thread(self, func: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except StoreError as error:
            raise web.HTTPError(503, f"store {self.spot.store_url}: {error}") from None

    async def require_session(self, session: str) -> None:
        if not await self.in_thread(self.spot.snapshot_store.list_snapshots, session):
            raise web.HTTPError(404, f"no snapshots for session {session!r}")


class PolledHandler(SpotHandler):
    """Reads the front ends poll (the status item every few seconds, even in a background tab): not user
    activity, or no server with a page open would ever look idle to JupyterHub's idle culler."""

    _track_activity = False


class StatusHandler(PolledHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(await self.spot.status())


class SessionsHandler(PolledHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        path = self.get_query_argument("path", None)
        only = self.session_arg(path.lstrip("/")) if path is not None else None
        live = self.spot.kernels.live_kernels()
        sessions = await self.in_thread(
            catalog.describe_sessions, self.spot.snapshot_store, live, only, self.spot.server_id, self.spot.line_index
        )
        unverifiable = await self.in_thread(
            catalog.unverifiable_sessions, self.spot.snapshot_store, only, {s["id"] for s in sessions}
        )
        self.finish({"sessions": sessions, "unverifiable": unverifiable})


class SnapshotsHandler(PolledHandler):
    @web.authenticated
    @authorized
    async def get(self, session: str) -> None:
        session = self.session_arg(session)
        await self.require_session(session)
        snapshots = await self.in_thread(catalog.list_snapshot_summaries, self.spot.snapshot_store, session)
        self.finish({"snapshots": snapshots})


class SnapshotHandler(SpotHandler):
    @web.authenticated
    @authorized
    async def delete(self, session: str, snapshot_id: str) -> None:
        session = self.session_arg(session)
        snapshot_id = self.snapshot_arg(snapshot_id)
        try:
            await asyncio.to_thread(self.spot.snapshot_store.delete_snapshot, session, snapshot_id)
        except ManifestError:
            raise web.HTTPError(404, f"no snapshot {snapshot_id} in session {session!r}") from None
        except StoreError as error:
            raise web.HTTPError(503, f"store {self.spot.store_url}: {error}") from None
        self.set_status(204)
        self.finish()


class RestoreHandler(SpotHandler):
    @web.authenticated
    @authorized
    async def post(self, session: str) -> None:
        session = self.session_arg(session)
        body = self.object_body('{"snapshot": "latest"}')
        snapshot = body.get("snapshot", "latest")
        if snapshot != "latest":
            snapshot = self.snapshot_arg(snapshot)
        kernel_id = body.get("kernel_id")
        if kernel_id is not None and (not isinstance(kernel_id, str) or not kernel_id):
            raise web.HTTPError(400, "kernel_id must be a kernel id string")
        await self.require_session(session)
        if snapshot == "latest":  # a fresh machine without the key: say what to set, start no kernel
            store = self.spot.snapshot_store
            unverifiable = await self.in_thread(catalog.unverifiable_sessions, store, session, set())
            if unverifiable and (await self.in_thread(store.latest_manifest, session))[0] is None:
                raise web.HTTPError(409, unverifiable[0]["message"])
        if snapshot != "latest":
            try:
                await asyncio.to_thread(self.spot.snapshot_store.load_manifest, session, snapshot)
            except ManifestError as error:
                status = 404 if snapshot not in self.spot.snapshot_store.list_snapshots(session) else 409
                raise web.HTTPError(status, str(error)) from None
        result = await self.spot.kernels.restore(session, snapshot, kernel_id)
        self.finish(result)


class DiscardHandler(SpotHandler):
    """Stop offering an interrupted line: ``latest`` then means the newest snapshot (docs/server.md)."""

    @web.authenticated
    @authorized
    async def post(self, session: str) -> None:
        session = self.session_arg(session)
        body = self.object_body('{"snapshot": "<id>"} or {}')
        snapshot = body.get("snapshot")
        if snapshot is not None:
            snapshot = self.snapshot_arg(snapshot)
        await self.require_session(session)
        by = f"server {self.spot.serverapp.connection_url} ({getattr(self.current_user, 'username', '?')})"
        result = await self.in_thread(
            catalog.discard_line,
            self.spot.snapshot_store,
            session,
            self.spot.kernels.live_kernels(),
            snapshot,
            by,
            self.spot.server_id,
            self.spot.line_index,
        )
        if result is None:
            what = f"no usable snapshot {snapshot}" if snapshot else "no interrupted line"
            raise web.HTTPError(404, f"session {session!r} has {what} to discard")
        self.finish(result)


def handlers(app: SpotApp) -> list[tuple[str, type[SpotHandler]]]:
    """The routes, relative to the server's base_url (ExtensionApp prefixes it)."""
    api = r"/jupyter-spot/api"
    # ``[^/]*``: an empty id reaches the handler and gets its 400, not the server's fallback.
    return [
        (rf"{api}/status", StatusHandler),
        (rf"{api}/sessions", SessionsHandler),
        (rf"{api}/sessions/([^/]*)/snapshots", SnapshotsHandler),
        (rf"{api}/sessions/([^/]*)/snapshots/([^/]*)", SnapshotHandler),
        (rf"{api}/sessions/([^/]*)/restore", RestoreHandler),
        (rf"{api}/sessions/([^/]*)/discard", DiscardHandler),
    ]

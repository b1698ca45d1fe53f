"""The REST API over a real store, through a real jupyter_server (pytest-jupyter)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from harness.store import commit_snapshot
from tornado.httpclient import HTTPClientError

from jupyter_spot.store import open_store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def spot_app() -> dict[str, Any]:
    return {}


@pytest.fixture
def jp_server_config(spot_env: Path, spot_app: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_spot": True}},
        "SpotApp": {"notice_sources": [], **spot_app},
    }


@pytest.fixture
def store(spot_env: Path) -> Any:
    return open_store(str(spot_env))


@pytest.fixture
def api(jp_serverapp: Any, http_server_client: Any, jp_auth_header: dict[str, str], jp_base_url: str) -> Any:
    """Fetch ``jupyter-spot/api/<path>`` with the path sent exactly as given (ids stay %-encoded)."""

    def fetch(
        path: str, method: str = "GET", body: Any = None, auth: bool = True, headers: Any = None, **kwargs: Any
    ) -> Any:
        headers = {**(jp_auth_header if auth else {}), **(headers or {})}
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        return http_server_client.fetch(
            f"{jp_base_url}jupyter-spot/api/{path}", method=method, body=body, headers=headers, **kwargs
        )

    return fetch


async def error_of(request: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HTTPClientError) as caught:
        await request
    return caught.value.code, json.loads(caught.value.response.body or b"{}")


def quoted(session: str) -> str:
    return urllib.parse.quote(session, safe="")


async def test_status_reports_store_and_watcher(api: Any, spot_env: Path) -> None:
    response = await api("status")
    status = json.loads(response.body)
    assert status["store"] == {"url": str(spot_env.resolve()), "kind": "local", "writable": True, "error": None}
    assert status["watcher"] == {"running": False, "provider": None, "sources": []}
    assert status["last_notice"] is None
    assert status["version"]


@pytest.fixture
def unwritable_store(spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server starts on a store under a plain file: nothing can be created there, not even by root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JUPYTER_SPOT_STORE", str(blocker / "store"))
    return blocker / "store"


async def test_unwritable_store_is_reported_not_fatal(unwritable_store: Path, api: Any) -> None:
    status = json.loads((await api("status")).body)
    assert status["store"]["writable"] is False
    assert "a-file" in status["store"]["error"]


async def test_notebooks_still_open_with_a_kernel_on_an_unwritable_store(
    unwritable_store: Path, jp_fetch: Any, jp_root_dir: Path
) -> None:
    """The session record cannot be read or written there: a warning in the log, not a 500."""
    (jp_root_dir / "nb.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    body = {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    assert response.code == 201 and json.loads(response.body)["kernel"]["id"]


async def test_sessions_lists_interrupted_snapshot(api: Any, store: Any) -> None:
    old = commit_snapshot(store, "work/analysis.ipynb", minutes_ago=10)
    new = commit_snapshot(store, "work/analysis.ipynb", minutes_ago=5)
    commit_snapshot(store, "other.ipynb", minutes_ago=1)
    sessions = json.loads((await api("sessions")).body)["sessions"]
    assert [s["id"] for s in sessions] == ["other.ipynb", "work/analysis.ipynb"]
    analysis = sessions[1]
    assert analysis["interrupted"] is True
    assert analysis["live_kernel"] is None
    assert "no server here" in analysis["reason"]
    latest = analysis["latest"]
    assert latest["id"] == new != old
    assert latest["session"] == "work/analysis.ipynb"
    assert latest["created"].endswith("Z")
    assert (latest["kind"], latest["during_cell"], latest["execution_count"], latest["variable_count"]) == (
        "auto",
        None,
        3,
        1,
    )
    assert latest["size"] > 0
    assert latest["skipped"] == [{"name": "conn", "type": "sqlite3.Connection", "reason": "cannot pickle", "cell": 2}]

    only = json.loads((await api("sessions?path=work%2Fanalysis.ipynb")).body)["sessions"]
    assert [s["id"] for s in only] == ["work/analysis.ipynb"]
    none = json.loads((await api("sessions?path=never-opened.ipynb")).body)["sessions"]
    assert none == []


async def test_closed_session_is_not_interrupted(api: Any, store: Any) -> None:
    from jupyter_spot.store.holders import session_record_name

    commit_snapshot(store, "done.ipynb", minutes_ago=5)
    closed_at = datetime.now(timezone.utc).isoformat()
    store.put_record(
        session_record_name("done.ipynb"), {"session": "done.ipynb", "state": "closed", "closed_at": closed_at}
    )
    (session,) = json.loads((await api("sessions")).body)["sessions"]
    assert (session["id"], session["interrupted"], session["reason"]) == ("done.ipynb", False, None)


async def test_snapshots_newest_first_and_delete(api: Any, store: Any) -> None:
    ids = [commit_snapshot(store, "work/a b.ipynb", minutes_ago=m) for m in (30, 20, 10)]
    path = f"sessions/{quoted('work/a b.ipynb')}/snapshots"
    listed = json.loads((await api(path)).body)["snapshots"]
    assert [s["id"] for s in listed] == ids[::-1]

    response = await api(f"{path}/{ids[1]}", method="DELETE")
    assert response.code == 204
    assert store.list_snapshots("work/a b.ipynb") == [ids[0], ids[2]]
    code, body = await error_of(api(f"{path}/{ids[1]}", method="DELETE"))
    assert code == 404 and ids[1] in body["message"]


@pytest.mark.parametrize(
    "path",
    [
        "sessions/..%2F..%2Fetc/snapshots",
        "sessions/..%2F..%2Fetc%2Fpasswd/restore",
        "sessions/work%2F..%2F..%2Fx/snapshots",
        "sessions/%00nul/snapshots",
        "sessions/..%5C..%5Cwin/snapshots",
        "sessions?path=..%2F..%2Fetc",
        "sessions/ok.ipynb/snapshots/..%2F..%2Fmanifest",
        "sessions/ok.ipynb/snapshots/.hidden",
    ],
)
async def test_hostile_ids_are_400(api: Any, store: Any, path: str) -> None:
    commit_snapshot(store, "ok.ipynb", minutes_ago=1)
    method = "POST" if path.endswith("restore") else "DELETE" if "snapshots/" in path else "GET"
    code, body = await error_of(api(path, method=method, body={} if method == "POST" else None))
    assert code == 400
    assert "not a" in body["message"]
    assert store.list_snapshots("ok.ipynb")  # nothing was deleted


async def test_unknown_session_and_snapshot_are_404(api: Any, store: Any) -> None:
    commit_snapshot(store, "ok.ipynb", minutes_ago=1)
    code, body = await error_of(api("sessions/missing.ipynb/snapshots"))
    assert code == 404 and "missing.ipynb" in body["message"]
    code, _ = await error_of(api("sessions/missing.ipynb/restore", method="POST", body={"snapshot": "latest"}))
    assert code == 404
    code, _ = await error_of(
        api("sessions/ok.ipynb/restore", method="POST", body={"snapshot": "20200101T000000.000000Z-none"})
    )
    assert code == 404
    code, body = await error_of(api("sessions/ok.ipynb/restore", method="POST", body={"kernel_id": "nope"}))
    assert code == 404 and "nope" in body["message"]


async def test_bad_restore_bodies_are_400(api: Any, store: Any) -> None:
    commit_snapshot(store, "ok.ipynb", minutes_ago=1)
    for body in ("not json", "[1, 2]", {"snapshot": "../x"}, {"snapshot": "latest", "kernel_id": 5}):
        code, reply = await error_of(api("sessions/ok.ipynb/restore", method="POST", body=body))
        assert code == 400, body
        assert reply["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "status"),
        ("GET", "sessions"),
        ("GET", "sessions/ok.ipynb/snapshots"),
        ("POST", "sessions/ok.ipynb/restore"),
        ("DELETE", "sessions/ok.ipynb/snapshots/20200101T000000.000000Z-x"),
    ],
)
async def test_every_route_needs_a_token(api: Any, store: Any, method: str, path: str) -> None:
    snapshot_id = commit_snapshot(store, "ok.ipynb", minutes_ago=1)
    code, _ = await error_of(api(path, method=method, body="{}" if method == "POST" else None, auth=False))
    assert code == 403
    assert store.list_snapshots("ok.ipynb") == [snapshot_id]


async def test_writes_need_xsrf_with_cookie_auth(api: Any, store: Any, jp_auth_header: dict[str, str]) -> None:
    """A browser's login cookie alone cannot delete: the X-XSRFToken header must match the _xsrf cookie."""
    snapshot_id = commit_snapshot(store, "ok.ipynb", minutes_ago=1)
    token = jp_auth_header["Authorization"].split()[-1]
    login = await api(f"status?token={token}", auth=False)
    cookies = {}
    for header in login.headers.get_list("Set-Cookie"):
        name, _, rest = header.partition("=")
        cookies[name] = rest.split(";")[0]
    assert any(name.startswith("username-") for name in cookies), cookies
    cookies["_xsrf"] = "a-browser-xsrf-token"
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    path = f"sessions/ok.ipynb/snapshots/{snapshot_id}"
    code, body = await error_of(api(path, method="DELETE", auth=False, headers={"Cookie": cookie}))
    assert code == 403 and "xsrf" in body["message"].lower()
    assert store.list_snapshots("ok.ipynb") == [snapshot_id]
    headers = {"Cookie": cookie, "X-XSRFToken": cookies["_xsrf"]}
    assert (await api(path, method="DELETE", auth=False, headers=headers)).code == 204
    assert store.list_snapshots("ok.ipynb") == []


def test_no_auth_warning_when_unauthenticated_access_is_off(
    jp_configurable_serverapp: Any, jp_server_config: dict[str, Any]
) -> None:
    from jupyter_server.utils import JupyterServerAuthWarning

    server = {
        "jpserver_extensions": {"jupyter_spot": True, "jupyter_server_terminals": False},
        "allow_unauthenticated_access": False,
    }
    config = {**jp_server_config, "ServerApp": server}
    with warnings.catch_warnings():
        warnings.simplefilter("error", JupyterServerAuthWarning)
        app = jp_configurable_serverapp(config=config)
    assert "jupyter_spot" in app.extension_manager.extension_apps
    patterns = [rule.matcher.regex.pattern for rule in app.web_app.default_router.rules[0].target.rules]
    assert any("jupyter-spot/api/status" in p for p in patterns)


@pytest.mark.parametrize("spot_app", [{"keep": 2, "gc_interval": 0.2}])
async def test_server_collects_old_snapshots_periodically(api: Any, store: Any, jp_serverapp: Any) -> None:
    ids = [commit_snapshot(store, "long.ipynb", minutes_ago=m) for m in (40, 30, 20, 10)]
    await jp_serverapp.extension_manager.start_all_extensions()  # what a real server does once its loop runs
    deadline = time.monotonic() + 20
    while store.list_snapshots("long.ipynb") != ids[2:]:
        assert time.monotonic() < deadline, store.list_snapshots("long.ipynb")
        await asyncio.sleep(0.1)
    listed = json.loads((await api("sessions/long.ipynb/snapshots")).body)["snapshots"]
    assert [s["id"] for s in listed] == ids[:1:-1]

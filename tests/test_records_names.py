"""Malformed records, names of any length and script, session identity, hostile names — with a real
jupyter_server, real kernels, the real `jupyter spot list` and moto's S3 server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import JupyterServer, Kernel, snapshot_line, until_async
from tornado.httpclient import HTTPClientError

from jupyter_spot.store import open_store
from jupyter_spot.store.base import digest_of
from jupyter_spot.store.holders import session_record_name

pytestmark = pytest.mark.timeout(180)

#: 40 characters, 110 bytes of UTF-8, 290 bytes once percent-encoded: too long for one file name.
LONG_NAME = "プロジェクト/売上予測モデルの検証と改善_第三四半期レポート_最終版.ipynb"


@pytest.fixture
def spot_config() -> dict[str, Any]:
    return {"notice_sources": [], "heartbeat_interval": 0.2}


@pytest.fixture
def jp_server_config(spot_env: Path, spot_config: dict[str, Any]) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_spot": True}}, "SpotApp": spot_config}


@pytest.fixture
def store(spot_env: Path) -> Any:
    return open_store(str(spot_env))


@pytest.fixture
def raw_fetch(jp_serverapp: Any, http_server_client: Any, jp_auth_header: dict[str, str], jp_base_url: str) -> Any:
    """The server's answer to ``path`` sent exactly as written (no re-quoting), errors included."""

    async def fetch(path: str, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        try:
            response = await http_server_client.fetch(
                f"{jp_base_url}{path}", method=method, body=body, headers=jp_auth_header, request_timeout=120
            )
        except HTTPClientError as error:
            return error.code, error.response.body if error.response else b""
        return response.code, response.body

    return fetch


def commit(store: Any, session: str, minutes_ago: float = 1.0) -> str:
    """A real signed manifest with one blob, as the kernel writes one."""
    created = datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)
    snapshot_id = created.strftime("%Y%m%dT%H%M%S.%fZ") + "-t"
    data = json.dumps({"x": minutes_ago}).encode()
    digest = digest_of(data)
    store.put_blob(digest, data)
    store.commit_manifest(
        {
            "session": session,
            "id": snapshot_id,
            "created": created.isoformat(),
            "kind": "auto",
            "variables": {"x": {"group": 0, "type": "int", "size": len(data)}},
            "blobs": [digest],
            "size": len(data),
        }
    )
    return snapshot_id


def write_raw_record(store_root: Path, name: str, data: bytes) -> None:
    """A record exactly as a careless (or hostile) writer to the shared store left it."""
    (store_root / "records").mkdir(parents=True, exist_ok=True)
    (store_root / "records" / f"{name}.json").write_bytes(data)


def open_body(path: str, name: str | None = None) -> dict[str, Any]:
    return {"path": path, "name": Path(path).name if name is None else name, "type": "notebook",
            "kernel": {"name": "python3"}}


def warnings_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# -- malformed records ---------------------------------------------------------------------------------------------


async def test_a_list_record_neither_fails_the_notebook_nor_leaks_a_kernel(
    raw_fetch: Any, jp_serverapp: Any, jp_root_dir: Path, spot_env: Path, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / "a.ipynb")
    name = session_record_name("a.ipynb")
    write_raw_record(spot_env, name, b'["x"]')
    km = jp_serverapp.kernel_manager
    for _ in range(2):  # a retry must not leak a second kernel either
        code, body = await raw_fetch("api/sessions", "POST", open_body("a.ipynb"))
        assert code == 201, body
    assert len(km.list_kernel_ids()) == 1
    assert store.get_record(name)["state"] == "live"  # the bad record was replaced by a good one
    assert len(warnings_naming(caplog, name)) == 1


async def test_a_kernel_whose_post_start_steps_fail_is_shut_down(
    raw_fetch: Any, jp_serverapp: Any, jp_root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / "a.ipynb")
    monkeypatch.setenv("JUPYTER_SPOT_FAULTS", "kernel-started=raise@1+")
    for _ in range(2):
        code, _body = await raw_fetch("api/sessions", "POST", open_body("a.ipynb"))
        assert code == 500
    assert jp_serverapp.kernel_manager.list_kernel_ids() == []


@pytest.mark.servers
async def test_the_heartbeat_outlives_a_malformed_record_and_a_failed_beat(
    spot_env: Path, tmp_path: Path, store: Any, jupyter_servers: Callable[..., JupyterServer]
) -> None:
    """A real server: one session's record turns into a list and one beat fails; every live notebook still
    beats, so `jupyter spot list` (and other servers) never call them INTERRUPTED."""
    root = tmp_path / "root"
    root.mkdir()
    for notebook in ("a.ipynb", "b.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), root / notebook)
        commit(store, notebook)
    server = jupyter_servers(
        "server", root, env={"JUPYTER_SPOT_FAULTS": "heartbeat=raise@3"}, sources=["signal"],
        options=["--SpotApp.heartbeat_interval=0.3"],
    )
    await asyncio.to_thread(server.start)
    for notebook in ("a.ipynb", "b.ipynb"):
        await server.fetch("api/sessions", "POST", open_body(notebook))
    good, bad = session_record_name("a.ipynb"), session_record_name("b.ipynb")
    write_raw_record(spot_env, bad, b'["x"]')
    beats: set[str] = set()

    def a_beats_on() -> bool:
        (holder,) = store.get_record(good)["holders"].values()
        beats.add(holder["heartbeat"])
        return len(beats) >= 5

    await until_async(a_beats_on, 30, "a's heartbeat to go on beating (the heartbeat task died)")
    await until_async(lambda: store.get_record(bad) is not None, 30, "the malformed record to be rewritten")
    listed = spot_list(spot_env)
    assert listed.returncode == 0, listed.stderr
    flags = {s["id"]: (s["interrupted"], bool(s["live_elsewhere"])) for s in json.loads(listed.stdout)["sessions"]}
    assert flags == {"a.ipynb": (False, True), "b.ipynb": (False, True)}
    server.kill()  # the machine vanishes: the log holds what the server said until then
    log = server.log_path.read_text(errors="replace")
    assert "heartbeat failed" in log and "injected fault at heartbeat" in log
    assert log.count(bad) == 1, log  # one warning, however many beats read it


def spot_list(store_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jupyter", "spot", "list", "--json", f"--store={store_root}"],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'["x"]', b"null", b'{"state": "live", "holders": ["x"], "kernel": "k"}', b"\xff\xfe",
     b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "invalid-json", "list", "null", "wrong-field-types", "not-utf8", "nested-too-deep"],
)
async def test_a_malformed_session_or_notice_record_is_skipped_with_one_warning(
    content: bytes, raw_fetch: Any, spot_env: Path, store: Any
) -> None:
    commit(store, "work/a.ipynb")
    name = session_record_name("work/a.ipynb")
    write_raw_record(spot_env, name, content)
    notice = b'{"at": "2026-01-01T00:00:00Z", "kernels": ["x"]}' if content.startswith(b'{"state"') else content
    write_raw_record(spot_env, "notice-20260101T000000.000000-h", notice)
    write_raw_record(spot_env, "job-20260101T000000-abcd", content)
    for _ in range(2):  # polled twice, as a browser tab does
        code, body = await raw_fetch("jupyter-spot/api/sessions")
        assert code == 200, body
        (listed,) = json.loads(body)["sessions"]
        assert (listed["id"], listed["interrupted"]) == ("work/a.ipynb", True)

    listed_by_cli = spot_list(spot_env)
    assert listed_by_cli.returncode == 0, listed_by_cli.stderr
    (session,) = json.loads(listed_by_cli.stdout)["sessions"]
    assert session["id"] == "work/a.ipynb" and session["interrupted"] is True
    assert listed_by_cli.stderr.count(name) == 1, listed_by_cli.stderr
    assert listed_by_cli.stderr.count("notice-20260101T000000.000000-h") == 1, listed_by_cli.stderr


def test_job_records_of_the_wrong_shape_are_skipped(spot_env: Path, store: Any) -> None:
    from jupyter_spot.jobs import record as job_record

    write_raw_record(spot_env, "job-20260101T000000-abcd", b'["x"]')
    write_raw_record(spot_env, "job-20260101T000001-abcd", b"")
    assert job_record.session_jobs(store, "a.ipynb") == []
    assert job_record.active_on_host(store, "any-host") == []
    with pytest.raises(job_record.JobError):
        job_record.read(store, "20260101T000000-abcd")


# -- names of any length and script -------------------------------------------------------------------------------


def test_the_long_name_really_is_too_long_for_one_file_name() -> None:
    assert len(urllib.parse.quote(LONG_NAME, safe="")) > 255


@pytest.mark.parametrize(
    "session",
    [LONG_NAME, "d/" + "長" * 1000, "x" * 1024, "%41" * 300 + ".ipynb"],
    ids=["japanese-290-bytes", "1000-cjk", "1024-ascii", "percent-runs"],
)
def test_long_names_are_stored_listed_and_loaded_under_their_real_name(session: str, store: Any) -> None:
    snapshot_id = commit(store, session)
    short = commit(store, "short.ipynb")
    assert store.list_sessions() == sorted([session, "short.ipynb"])
    assert store.list_snapshots(session) == [snapshot_id]
    assert store.load_manifest(session, snapshot_id)["session"] == session
    assert (store.root / "sessions" / "short.ipynb" / f"{short}.json").is_file()  # short names: layout unchanged
    for path in store.root.rglob("*"):
        assert len(path.name.encode()) <= 255, path


@pytest.mark.s3
def test_long_names_on_s3_keep_keys_under_1024_bytes(s3_url: str, spot_env: Path) -> None:
    import boto3

    bucket = s3_url[len("s3://"):].split("/")[0]
    client = boto3.client("s3")
    s3 = open_store(f"s3://{bucket}/team/spot")
    longest = "d/" + "長" * 1000  # 9,000 bytes percent-encoded
    middle = "m/" + "é" * 100 + ".ipynb"  # 608 bytes encoded: too long for a disk, fine as an S3 key
    ids = {name: commit(s3, name) for name in (longest, middle, LONG_NAME, "short.ipynb")}
    assert s3.list_sessions() == sorted(ids)
    for name, snapshot_id in ids.items():
        assert s3.list_snapshots(name) == [snapshot_id]
        assert s3.load_manifest(name, snapshot_id)["session"] == name
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="team/spot/sessions/")["Contents"]]
    assert all(len(key.encode()) <= 1024 for key in keys)
    assert f"team/spot/sessions/short.ipynb/{ids['short.ipynb']}.json" in keys  # short names: layout unchanged
    assert any(key.startswith("team/spot/sessions/m%2F%C3%A9") and "%~" not in key for key in keys)

    # Through a local cache (tiered): each tier maps the name its own way; both list the real name.
    from jupyter_spot.store.filesystem import FileStore
    from jupyter_spot.store.tiered import TieredStore

    tiered = TieredStore(FileStore(spot_env.parent / "cache"), open_store(f"s3://{bucket}/team/other"))
    try:
        snapshot_id = commit(tiered, middle)
        assert tiered.flush_replication(time.time() + 60) == []
        assert tiered.durable.list_sessions() == tiered.fast.list_sessions() == [middle]
        assert tiered.load_manifest(middle, snapshot_id)["session"] == middle
    finally:
        tiered.close()


def test_a_long_names_folder_does_not_answer_for_another_name(spot_env: Path, store: Any) -> None:
    """The readable name kept inside is checked against the folder it is in."""
    commit(store, LONG_NAME)
    other = LONG_NAME.replace("最終版", "草稿")
    commit(store, other)
    folders = {p.name: p for p in (store.root / "sessions").iterdir()}
    assert len(folders) == 2
    first, second = sorted(folders.values())
    name_file = next(p for p in first.iterdir() if not p.name.endswith(".json"))
    name_file.write_bytes(next(p for p in second.iterdir() if not p.name.endswith(".json")).read_bytes())
    listed = store.list_sessions()
    assert len(listed) == 1 and listed[0] in (LONG_NAME, other)


def test_a_long_name_snapshots_from_a_real_kernel(spot_env: Path, kernels: Callable[..., Kernel]) -> None:
    with kernels(session=LONG_NAME, load=True) as kernel:
        out = kernel.run("sales = [1, 2, 3]\n%spot snapshot")
        assert "too long" not in out.lower(), out
        snapshot_line(out)
    store = open_store(str(spot_env))
    assert store.list_sessions() == [LONG_NAME]
    assert len(store.list_snapshots(LONG_NAME)) >= 1


async def test_the_rest_api_serves_a_long_name(raw_fetch: Any, store: Any) -> None:
    snapshot_id = commit(store, LONG_NAME)
    quoted = urllib.parse.quote(LONG_NAME, safe="")
    code, body = await raw_fetch(f"jupyter-spot/api/sessions/{quoted}/snapshots")
    assert code == 200, body
    assert [s["id"] for s in json.loads(body)["snapshots"]] == [snapshot_id]
    code, body = await raw_fetch(f"jupyter-spot/api/sessions?path={quoted}")
    assert code == 200, body
    assert [s["id"] for s in json.loads(body)["sessions"]] == [LONG_NAME]


# -- session identity comes from the notebook path ----------------------------------------------------------------


async def test_two_notebooks_opened_with_an_empty_session_name_stay_two_sessions(
    raw_fetch: Any, jp_serverapp: Any, jp_root_dir: Path, store: Any
) -> None:
    (jp_root_dir / "work").mkdir()
    kernels = {}
    for notebook in ("work/a.ipynb", "work/b.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / notebook)
        code, body = await raw_fetch("api/sessions", "POST", open_body(notebook, name=""))
        assert code == 201, body
        kernels[notebook] = json.loads(body)["kernel"]["id"]
    for notebook, kernel_id in kernels.items():
        record = store.get_record(session_record_name(notebook))
        assert record is not None and record["kernel_id"] == kernel_id, (notebook, record)
    assert store.get_record(session_record_name("work")) is None


async def test_a_session_name_unlike_the_file_name_does_not_change_the_identity(
    raw_fetch: Any, jp_root_dir: Path, store: Any
) -> None:
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / "a.ipynb")
    code, body = await raw_fetch("api/sessions", "POST", open_body("a.ipynb", name="My analysis"))
    assert code == 201, body
    record = store.get_record(session_record_name("a.ipynb"))
    assert record is not None and record["kernel_id"] == json.loads(body)["kernel"]["id"]


def test_a_kernel_outside_the_server_does_not_take_a_folder_for_its_notebook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """jupyter_server without our extension still sets JPY_SESSION_NAME to the folder for an empty name."""
    from jupyter_spot.config import resolve_session

    monkeypatch.setenv("JPY_SESSION_NAME", f"{tmp_path}/work/")
    assert resolve_session(kernel_id="k-1") == "k-1"
    monkeypatch.setenv("JPY_SESSION_NAME", f"{tmp_path}/work/a.ipynb")
    assert resolve_session(kernel_id="k-1") == f"{tmp_path}/work/a.ipynb"


# -- hostile names: 400 or 404, never 500 -------------------------------------------------------------------------

HOSTILE = [
    "", "%2E", "%2E%2E", "..%2F..%2Fetc%2Fpasswd", "a%2F..%2Fb", "%00", "a%00b", "%0A", "%5C", "%2F", "%2Fabs",
    "a%2F%2Fb", "%FF", "%C0%AF", "%ED%A0%80", "x" * 2000, urllib.parse.quote("長" * 1000, safe=""),
    urllib.parse.quote(LONG_NAME, safe=""), "%25", "%", "%zz", "~", "%2E%2Fa",
]


@pytest.mark.parametrize("raw", HOSTILE)
async def test_hostile_session_names_get_400_or_404(raw: str, raw_fetch: Any) -> None:
    answers = [
        await raw_fetch(f"jupyter-spot/api/sessions/{raw}/snapshots"),
        await raw_fetch(f"jupyter-spot/api/sessions/{raw}/snapshots/20260101T000000.000000Z-t", "DELETE"),
        await raw_fetch(f"jupyter-spot/api/sessions/{raw}/restore", "POST", {"snapshot": "latest"}),
        await raw_fetch(f"jupyter-spot/api/sessions?path={raw}"),
    ]
    for code, body in answers:
        assert code in (200, 400, 404), (code, body)
        if code != 200:
            assert "message" in json.loads(body or b"{}") or code == 404, body


@pytest.mark.parametrize("raw", ["..", "%2E%2E", "%00", "a%2F..", "%FF", "x" * 300, "", "-", "a%2Fb"])
async def test_hostile_snapshot_ids_get_400_or_404(raw: str, raw_fetch: Any, store: Any) -> None:
    commit(store, "a.ipynb")
    for method, suffix, body in (("DELETE", f"snapshots/{raw}", None), ("POST", "restore", {"snapshot": raw})):
        code, answer = await raw_fetch(f"jupyter-spot/api/sessions/a.ipynb/{suffix}", method, body)
        assert code in (400, 404), (method, code, answer)

"""Lines of descent: a new kernel never shadows the state it could restore (issue 9 §1, §3).

Real kernels on one store: an "old machine" kernel snapshots and is SIGKILLed, a
fresh kernel in the same session runs cells, sees a notice, restores or discards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import Kernel, snapshot_line, until, until_async
from harness.spot_cli import spot
from harness.store import commit_snapshot

from jupyter_spot.notice import Notice, deliver_notice_to_kernel
from jupyter_spot.notice.model import deadline_in
from jupyter_spot.server.catalog import describe_session
from jupyter_spot.store import collect_garbage, open_store
from jupyter_spot.store.holders import session_record_name
from jupyter_spot.store.lines import DISCARDED, lines_record_name, record_decision

pytestmark = pytest.mark.timeout(240)
SESSION = "lines.ipynb"


@pytest.fixture
def session(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return SESSION


def interrupted_machine(code: str) -> str:
    """A kernel on the old machine: runs ``code``, waits until it is durable, is SIGKILLed. Its newest snapshot."""
    with Kernel(load=True) as kernel:
        kernel.run(code)
        assert "pending: 0" in kernel.run("%spot status")
        kernel.kill()
    store = open_store(os.environ["JUPYTER_SPOT_STORE"])
    return store.list_snapshots(os.environ["JUPYTER_SPOT_SESSION"])[-1]


def test_a_cell_before_restore_latest_does_not_shadow_the_interrupted_line(session: str, spot_env: Path) -> None:
    interrupted = interrupted_machine("x = 41\ndata = list(range(1000))")
    with Kernel(extra_arguments=["--SpotSettings.keep=2"]) as fresh:
        notice = fresh.run("%load_ext jupyter_spot")
        # Said once, in the first cell's output: which snapshot, when, how big, what, how to restore.
        assert interrupted in notice, notice
        assert "2 variables" in notice and "data, x" in notice and "UTC" in notice, notice
        assert "%spot restore" in notice and "%spot discard" in notice, notice
        fresh.run("y = 2")
        for step in range(4):  # more than `keep` snapshots of its own line
            fresh.run(f"z = {step}")
        store = open_store(str(spot_env))
        assert interrupted in store.list_snapshots(SESSION)  # retention spares the interrupted line
        line = store.load_manifest(SESSION, interrupted)["line"]
        report = fresh.run("%spot restore latest")
        assert interrupted in report, report
        # It says it did not take the newest snapshot, and what became of this kernel's own line.
        assert "not the newest" in report and "this kernel's own line" in report, report
        assert fresh.value("(x, len(data), y, z)") == (41, 1000, 2, 3)
        assert "jupyter-spot: session" not in fresh.run("w = 1")  # the notice is said once
        newest = store.load_manifest(SESSION, store.list_snapshots(SESSION)[-1])
        assert newest["line"] == line  # it continues the line it restored
        assert {"x", "y", "w"} <= set(newest["variables"])


def test_a_notice_before_any_restore_does_not_shadow_the_interrupted_line(
    session: str, spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted = interrupted_machine("x = 41")
    notice_file = tmp_path / "notice.json"
    monkeypatch.setenv("JUPYTER_SPOT_SERVER_WATCHES", "1")
    monkeypatch.setenv("JUPYTER_SPOT_NOTICE_FILE", str(notice_file))
    store = open_store(str(spot_env))
    with Kernel(load=True) as fresh:
        before = len(store.list_snapshots(SESSION))
        notice = Notice("interruption", "terminate", deadline_in(60), "aws", event_id="lines-1")
        deliver_notice_to_kernel(fresh.pid, notice, notice_file)
        until(lambda: len(store.list_snapshots(SESSION)) > before, 60, "the notice's flush")
        fresh.kill()
    flushed = store.load_manifest(SESSION, store.list_snapshots(SESSION)[-1])
    assert flushed["kind"] == "notice" and flushed["line"] != store.load_manifest(SESSION, interrupted)["line"]
    with Kernel(load=True) as third:
        report = third.run("%spot restore latest")
        assert interrupted in report, report
        assert third.value("x") == 41


def test_discard_then_latest_is_the_newest_snapshot(session: str, spot_env: Path) -> None:
    interrupted = interrupted_machine("x = 41")
    with Kernel(load=True) as fresh:
        fresh.run("y = 2")
        out = fresh.run("%spot discard")
        assert interrupted in out and "discarded" in out, out
        store = open_store(str(spot_env))
        own = store.list_snapshots(SESSION)[-1]
        report = fresh.run("%spot restore latest")  # nothing undecided is left: the newest snapshot
        assert own in report and "latest:" not in report, report
        assert "nothing to discard" in fresh.run("%spot discard")
        fresh.run("w = 3")
        own = store.list_snapshots(SESSION)[-1]
    with Kernel() as later:
        notice = later.run("%load_ext jupyter_spot")
        assert own in notice and interrupted not in notice, notice  # the discarded line is not offered again


def test_string_and_bytes_buffers_restore_with_contents_and_position(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run(
            "import io\ntext = io.StringIO('hello\\nworld')\ntext.read(3)\n"
            "raw = io.BytesIO(b'abcdef')\nraw.seek(4)\nboth = [text, raw]"
        )
        out = kernel.run("%spot snapshot")
        assert snapshot_line(out)["skipped"] == "0", out  # a snapshot was taken, and nothing left out
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "not restored" not in report, report
        assert fresh.value("(text.tell(), text.read(), raw.tell(), raw.read(), both[0] is text)") == (
            3, "lo\nworld", 4, b"ef", True,
        )


# -- with the server ---------------------------------------------------------------------------------


@pytest.fixture
def jp_server_config(spot_env: Path) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_spot": True}},
        "SpotApp": {"notice_sources": [], "keep": 3, "gc_interval": 3600.0},
    }


async def run_in(km: Any, kernel_id: str, code: str) -> str:
    """Run ``code`` in one of the server's kernels; its stdout."""
    client = km.get_kernel(kernel_id).client()
    client.start_channels()
    chunks: list[str] = []
    try:
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive(
            code, timeout=60, output_hook=lambda m: chunks.append(m["content"].get("text", ""))
        )
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(chunks)


async def test_server_keeps_offering_the_interrupted_line_until_discard(
    session: str, spot_env: Path, jp_fetch: Any, jp_serverapp: Any, jp_root_dir: Path
) -> None:
    interrupted = interrupted_machine("x = 41")
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / SESSION)
    store = open_store(str(spot_env))
    body = {"path": SESSION, "name": SESSION, "type": "notebook", "kernel": {"name": "python3"}}
    opened = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    kernel_id = json.loads(opened.body)["kernel"]["id"]
    km = jp_serverapp.kernel_manager
    first = await run_in(km, kernel_id, "y = 1")  # the user runs a cell before clicking Restore
    assert interrupted in first and "%spot restore" in first, first

    async def listed() -> dict[str, Any]:
        (described,) = json.loads((await jp_fetch("jupyter-spot", "api", "sessions", params={"path": SESSION})).body)[
            "sessions"
        ]
        return described

    await until_async(
        lambda: any(store.load_manifest(SESSION, s).get("kernel") == kernel_id for s in store.list_snapshots(SESSION)),
        60,
        "the new kernel's first snapshot",
        interval=0.1,
    )
    described = await listed()
    assert described["interrupted"] is True and described["live_kernel"] == kernel_id, described
    assert described["latest"]["id"] == interrupted and described["newest"]["id"] != interrupted, described

    for step in range(5):  # more than `keep` (3) snapshots of the new kernel's own line
        await run_in(km, kernel_id, f"z = {step}")
    app = jp_serverapp.extension_manager.extension_apps["jupyter_spot"].copy().pop()
    report = await app.collect_garbage()
    assert report.snapshots_deleted, "the GC kept everything: it did not run with keep=3"
    assert interrupted in store.list_snapshots(SESSION)
    assert (await listed())["interrupted"] is True

    discarded = json.loads((await jp_fetch("jupyter-spot", "api", "sessions", SESSION, "discard", method="POST",
                                           body="{}")).body)
    assert discarded["snapshot"]["id"] == interrupted
    described = await listed()
    assert (described["interrupted"], described["reason"]) == (False, None)
    assert described["latest"]["id"] == store.list_snapshots(SESSION)[-1]
    await app.collect_garbage()
    assert interrupted not in store.list_snapshots(SESSION)  # decided: an old snapshot like any other
    with pytest.raises(Exception) as missing:
        await jp_fetch("jupyter-spot", "api", "sessions", SESSION, "discard", method="POST", body="{}")
    assert getattr(missing.value, "code", None) == 404


# -- retention and records, on a store ---------------------------------------------------------------


def test_gc_spares_each_undecided_lines_newest_snapshot_for_keep_interrupted_days(spot_env: Path) -> None:
    store = open_store(str(spot_env))
    minutes = 24 * 60
    ancient = commit_snapshot(store, "nb.ipynb", minutes_ago=20 * minutes, line="ancient")  # lost 20 days ago
    recent = [commit_snapshot(store, "nb.ipynb", minutes_ago=2 * minutes - m, line="recent") for m in range(2)]
    dropped = commit_snapshot(store, "nb.ipynb", minutes_ago=minutes, line="dropped")
    record_decision(store, "nb.ipynb", "dropped", DISCARDED, dropped, "test")
    current = [commit_snapshot(store, "nb.ipynb", minutes_ago=10 - m, line="current") for m in range(4)]

    report = json.loads(spot("gc", "--keep=2", "--keep-interrupted-days=30", "--json").stdout)
    assert sorted(report["snapshots_deleted"]) == [f"nb.ipynb/{i}" for i in sorted([recent[0], dropped, *current[:2]])]
    assert store.list_snapshots("nb.ipynb") == [ancient, recent[1], *current[2:]]
    collect_garbage(store, keep=2)  # the default: 14 days
    assert store.list_snapshots("nb.ipynb") == [recent[1], *current[2:]]
    refused = spot("gc", "--keep=2", check=False, JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS="soon")
    assert refused.returncode == 1 and "JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS" in refused.stderr


def test_old_manifests_are_one_line_and_a_forged_record_only_changes_what_is_offered(spot_env: Path) -> None:
    store = open_store(str(spot_env))
    old = [commit_snapshot(store, "old.ipynb", minutes_ago=m) for m in (30, 20)]  # no `line`: written before lines
    described = describe_session(store, "old.ipynb", live=[])
    assert described is not None
    assert (described["interrupted"], described["line"], described["latest"]["id"]) == (True, "legacy", old[-1])
    # Anyone who can write the store can write records: they are not signed. A forged one can
    # say a line was decided (so it is no longer offered), and nothing more.
    for forged in ({"session": "old.ipynb", "lines": {"legacy": {"decision": "pickle-me", "snapshot": "z"}}},
                   {"session": "other.ipynb", "lines": {"legacy": {"decision": "discarded", "snapshot": "z"}}},
                   {"session": "old.ipynb", "lines": ["not", "a", "map"]}):
        store.put_record(lines_record_name("old.ipynb"), forged)
        assert describe_session(store, "old.ipynb", live=[])["interrupted"] is True
    store.put_record(lines_record_name("old.ipynb"),
                     {"session": "old.ipynb", "lines": {"legacy": {"decision": "discarded", "snapshot": "z"}}})
    described = describe_session(store, "old.ipynb", live=[])
    assert (described["interrupted"], described["latest"]["id"]) == (False, old[-1])


async def test_closing_the_new_kernel_closes_its_line_not_the_interrupted_one(
    session: str, spot_env: Path, jp_fetch: Any, jp_serverapp: Any, jp_root_dir: Path
) -> None:
    interrupted = interrupted_machine("x = 41")
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / SESSION)
    store = open_store(str(spot_env))
    body = json.dumps({"path": SESSION, "name": SESSION, "type": "notebook", "kernel": {"name": "python3"}})
    opened = json.loads((await jp_fetch("api", "sessions", method="POST", body=body)).body)
    await run_in(jp_serverapp.kernel_manager, opened["kernel"]["id"], "y = 2")
    await until_async(lambda: len(store.list_snapshots(SESSION)) >= 2, 60, "the new kernel's first snapshot", interval=0.1)
    await jp_fetch("api", "sessions", opened["id"], method="DELETE")  # the user shuts the new kernel down
    await until_async(
        lambda: (store.get_record(session_record_name(SESSION)) or {}).get("state") == "closed",
        30,
        "a closed record after the shutdown",
    )
    (described,) = json.loads((await jp_fetch("jupyter-spot", "api", "sessions")).body)["sessions"]
    assert described["interrupted"] is True and described["latest"]["id"] == interrupted, described
    # Reopened: a new kernel is told about the lost line, not about the one the user closed.
    reopened = json.loads((await jp_fetch("api", "sessions", method="POST", body=body)).body)
    first = await run_in(jp_serverapp.kernel_manager, reopened["kernel"]["id"], "pass")
    assert interrupted in first, first
    await jp_fetch("jupyter-spot", "api", "sessions", SESSION, "discard", method="POST", body="{}")
    (described,) = json.loads((await jp_fetch("jupyter-spot", "api", "sessions")).body)["sessions"]
    assert described["interrupted"] is False, described  # the closed line is not offered in its place

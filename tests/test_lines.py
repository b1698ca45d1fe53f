"""Lines of descent: a new kernel never shadows the state it could restore (issue 9 §1, §3).

Real kernels on one store: an "old machine" kernel snapshots and is SIGKILLed, a
fresh kernel in the same session runs cells, sees a notice, restores or discards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from spot_kernel import SpotKernel

from jupyter_spot.notice import Notice, deliver_notice_to_kernel
from jupyter_spot.notice.model import deadline_in
from jupyter_spot.store import open_store

pytestmark = pytest.mark.timeout(240)
SESSION = "lines.ipynb"


@pytest.fixture
def session(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return SESSION


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll until ``predicate`` is truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def interrupted_machine(code: str) -> str:
    """A kernel on the old machine: runs ``code``, waits until it is durable, is SIGKILLed. Its newest snapshot."""
    kernel = SpotKernel()
    try:
        kernel.run(code)
        assert "pending: 0" in kernel.run("%spot status")
    finally:
        kernel.kill()
    store = open_store(os.environ["JUPYTER_SPOT_STORE"])
    return store.list_snapshots(os.environ["JUPYTER_SPOT_SESSION"])[-1]


def test_a_cell_before_restore_latest_does_not_shadow_the_interrupted_line(session: str, spot_env: Path) -> None:
    interrupted = interrupted_machine("x = 41\ndata = list(range(1000))")
    with SpotKernel(load=False, extra_arguments=["--SpotSettings.keep=2"]) as fresh:
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
    fresh = SpotKernel()
    try:
        before = len(store.list_snapshots(SESSION))
        notice = Notice("interruption", "terminate", deadline_in(60), "aws", event_id="lines-1")
        deliver_notice_to_kernel(fresh.pid, notice, notice_file)
        wait_for(lambda: len(store.list_snapshots(SESSION)) > before, "the notice's flush")
    finally:
        fresh.kill()
    flushed = store.load_manifest(SESSION, store.list_snapshots(SESSION)[-1])
    assert flushed["kind"] == "notice" and flushed["line"] != store.load_manifest(SESSION, interrupted)["line"]
    with SpotKernel() as third:
        report = third.run("%spot restore latest")
        assert interrupted in report, report
        assert third.value("x") == 41


def test_discard_then_latest_is_the_newest_snapshot(session: str, spot_env: Path) -> None:
    interrupted = interrupted_machine("x = 41")
    with SpotKernel() as fresh:
        fresh.run("y = 2")
        out = fresh.run("%spot discard")
        assert interrupted in out and "discarded" in out, out
        store = open_store(str(spot_env))
        own = store.list_snapshots(SESSION)[-1]
        report = fresh.run("%spot restore latest")  # nothing undecided is left: the newest snapshot
        assert own in report and "latest:" not in report, report
        assert "no snapshot to discard" in fresh.run("%spot discard")
        fresh.run("w = 3")
        own = store.list_snapshots(SESSION)[-1]
    with SpotKernel(load=False) as later:
        notice = later.run("%load_ext jupyter_spot")
        assert own in notice and interrupted not in notice, notice  # the discarded line is not offered again


def test_string_and_bytes_buffers_restore_with_contents_and_position(session: str) -> None:
    with SpotKernel() as kernel:
        kernel.run(
            "import io\ntext = io.StringIO('hello\\nworld')\ntext.read(3)\n"
            "raw = io.BytesIO(b'abcdef')\nraw.seek(4)\nboth = [text, raw]"
        )
        out = kernel.run("%spot snapshot")
        assert "0 skipped" in out, out
    with SpotKernel() as fresh:
        report = fresh.run("%spot restore")
        assert "not restored" not in report, report
        assert fresh.value("(text.tell(), text.read(), raw.tell(), raw.read(), both[0] is text)") == (
            3, "lo\nworld", 4, b"ef", True,
        )

"""End to end: a real kernel, a simulated AWS notice mid-cell, SIGKILL, restore in a fresh kernel.

The kernel has no server extension, so it watches IMDS (the simulator) by
itself; the notice reaches its main thread as SIGUSR1 while a long loop runs.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from jupyter_spot.notice.simulator import Simulator
from jupyter_spot.store import open_store

SESSION = "notice-e2e"
POLL = 0.2

LOOP_CELL = """\
import time
for i in range(600):  # a 60-second cell
    progress = i + 1
    time.sleep(0.1)
"""


class Kernel:
    """A real ipykernel with jupyter-spot loaded, driven over its ZMQ channels."""

    def __init__(self, extra: list[str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(extra_arguments=extra)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """Execute ``code``; return the reply content and everything it printed."""
        msg_id = self.kc.execute(code)
        return self.reply(msg_id, timeout)["content"], self.output(msg_id)

    def reply(self, msg_id: str, timeout: float) -> dict[str, Any]:
        """The shell reply to ``msg_id``, skipping stale ones (wait_for_ready may leave kernel_info replies)."""
        end = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, end - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def output(self, msg_id: str, until_idle: bool = True, timeout: float = 10) -> str:
        """What ``msg_id`` printed until it finished (or, for a cell still running, within ``timeout``)."""
        text = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                text.append("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" and until_idle:
                break
        return "".join(text)

    def value(self, expression: str) -> str:
        """``repr`` of ``expression`` in the kernel's namespace."""
        msg_id = self.kc.execute("", user_expressions={"v": expression})
        result = self.reply(msg_id, 30)["content"]["user_expressions"]["v"]
        assert result["status"] == "ok", result
        return result["data"]["text/plain"]

    def kill(self) -> None:
        os.kill(self.km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
        self.kc.stop_channels()
        self.km.cleanup_resources()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=True)


@pytest.fixture
def aws(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A simulated IMDS (IMDSv2 only) that the kernels started by the test will poll."""
    with Simulator("aws", imdsv2_only=True) as sim:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", sim.url)
        monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
        monkeypatch.delenv("JUPYTER_SPOT_SERVER_WATCHES", raising=False)
        monkeypatch.delenv("JUPYTER_SPOT_NOTICE_FILE", raising=False)
        yield sim


def manifests(store_dir: Path) -> list[dict[str, Any]]:
    store = open_store(str(store_dir))
    return [store.load_manifest(SESSION, sid) for sid in store.list_snapshots(SESSION)]


def wait_for(predicate, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_notice_mid_cell_flush_survives_sigkill_and_restores(aws: Simulator, spot_env: Path) -> None:
    kernel = Kernel([f"--SpotSettings.notice_poll_interval={POLL}"])
    try:
        kernel.run("%load_ext jupyter_spot")
        kernel.run("progress = 0")
        assert wait_for(
            lambda: any(m.get("during_cell") is None and m["kind"] == "auto" for m in manifests(spot_env)), 20
        )
        before = len(manifests(spot_env))

        cell_id = kernel.kc.execute(LOOP_CELL)
        wait_for(lambda: aws.requests and len(aws.requests) > 3, 10)  # the kernel is polling IMDS
        time.sleep(1.0)  # the loop is well under way
        fired = time.monotonic()
        aws.fire("terminate")
        mid = wait_for(lambda: [m for m in manifests(spot_env)[before:] if m.get("during_cell") is not None], 5)
        flushed_after = time.monotonic() - fired
        assert mid, "no mid-cell snapshot within 5 s of the notice"
        printed = kernel.output(cell_id, until_idle=False, timeout=2)
        kernel.kill()  # the machine goes away mid-cell
    except BaseException:
        kernel.shutdown()
        raise
    assert flushed_after < 5
    assert mid[0]["during_cell"] == mid[0]["execution_count"]
    assert "jupyter-spot" in printed and "s left" in printed, printed

    aws.stop()  # a fresh machine: no notice standing
    # Only restore in the new kernel: its own snapshots would become the newest.
    fresh = Kernel(["--SpotSettings.auto_snapshot=False", "--SpotSettings.watch_notices=False"])
    try:
        fresh.run("%load_ext jupyter_spot")
        _, report = fresh.run("%spot restore latest")
        progress = int(fresh.value("progress"))
        _, clean_report = fresh.run("%spot restore --clean")
        clean_progress = int(fresh.value("progress"))
    finally:
        fresh.shutdown()
    assert "mid-cell" in report and "--clean" in report, report
    assert 5 <= progress < 600, f"restored progress {progress}: the loop ran ~{1 + flushed_after:.1f} s at 10 steps/s"
    assert clean_progress == 0, clean_report
    assert "mid-cell" not in clean_report


def test_rebalance_gives_one_snapshot_and_a_warning(aws: Simulator, spot_env: Path) -> None:
    kernel = Kernel([f"--SpotSettings.notice_poll_interval={POLL}"])
    try:
        kernel.run("%load_ext jupyter_spot")
        kernel.run("data = list(range(10))")
        assert wait_for(lambda: len(manifests(spot_env)) == 1, 20)
        cell_id = kernel.kc.execute("import time\nfor i in range(30):\n    time.sleep(0.1)\n")
        aws.rebalance()
        printed = kernel.output(cell_id, until_idle=True, timeout=20)
        polls = len(aws.requests)
        time.sleep(10 * POLL)  # many more polls see the same recommendation
        assert len(aws.requests) > polls + 5
        after = manifests(spot_env)
        kernel.run("import signal")
        handler = kernel.value("signal.getsignal(signal.SIGUSR1).__qualname__")
        kernel.run("%unload_ext jupyter_spot")
        unloaded = kernel.value("signal.getsignal(signal.SIGUSR1)")
    finally:
        kernel.shutdown()
    assert printed.count("rebalance recommendation") >= 1 and printed.count("Taking a snapshot now") == 1, printed
    # the first auto snapshot, one for the rebalance, one auto after the loop cell: no flush loop
    rebalance = [m for m in after if "rebalance" in str(m.get("reason", ""))]
    assert len(rebalance) == 1, [(m["kind"], m.get("reason")) for m in after]
    assert len(after) == 3
    assert handler == "'KernelNoticeHandler._on_signal'"
    assert unloaded == "<Handlers.SIG_DFL: 0>"  # %unload_ext gives the signal back

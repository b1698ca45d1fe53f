"""SIGTERM as a notice, cloud detection, the simulate command, and the server → kernel hand-off.

Every process here is real: signals go to real child processes, and the
hand-off test's "kernel" is a Python process running a long loop on its main
thread, exactly where the kernel's handler has to interrupt it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from harness import until

from jupyter_spot.notice import AWSSource, KernelNotReady, Notice, deliver_notice_to_kernel, detect_cloud
from jupyter_spot.notice.detect import AZURE_ASSET_TAG
from jupyter_spot.notice.model import deadline_in, utcnow
from jupyter_spot.notice.simulator import Simulator

PY = sys.executable


def wait_for_file(path: Path, timeout: float = 60.0) -> str:
    return until(lambda: path.exists() and path.read_text(), timeout, f"{path.name} to be written")


# -- SIGTERM ----------------------------------------------------------------------------

SIGTERM_CHILD = """
import sys, time, pathlib
from jupyter_spot.notice import NoticeWatcher, SignalSource
out = pathlib.Path(sys.argv[1])
def flush(notice):
    time.sleep(0.3)  # the work the notice is for; the process must outlive it
    out.write_text(f"{notice.kind} {notice.action} {notice.source} {notice.seconds_left():.0f}")
watcher = NoticeWatcher([SignalSource(grace=25, wait=0.1)], [flush]).start()
out.with_suffix(".ready").write_text("ready")
while True:
    time.sleep(0.05)
"""


def test_sigterm_flushes_first_then_the_default_action_ends_the_process(tmp_path: Path) -> None:
    out = tmp_path / "flushed"
    child = subprocess.Popen([PY, "-c", SIGTERM_CHILD, str(out)])
    try:
        wait_for_file(out.with_suffix(".ready"))
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM  # the previous (default) action ran…
    finally:
        child.kill()
    assert out.read_text() in (
        "interruption terminate signal 25",
        "interruption terminate signal 24",
    )  # …after the flush


def test_sigterm_chains_a_previous_python_handler_after_the_callbacks() -> None:
    order: list[str] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: order.append("previous handler"))
    try:
        from jupyter_spot.notice import NoticeWatcher, SignalSource

        source = SignalSource(signal.SIGUSR2, grace=10, wait=0.05)
        with NoticeWatcher([source], [lambda n: (time.sleep(0.2), order.append(f"flush {n.source}"))]):
            os.kill(os.getpid(), signal.SIGUSR2)
            # the main thread must run bytecode for handlers to fire: until() polls in Python
            until(lambda: len(order) >= 2, 30, "the flush and the previous handler")
        assert order == ["flush signal", "previous handler"]
        assert signal.getsignal(signal.SIGUSR2) != source._handle  # ours is gone again
    finally:
        signal.signal(signal.SIGUSR2, previous)


# -- detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files, cloud",
    [
        ({"sys_vendor": "Amazon EC2", "product_name": "m5.large"}, "aws"),
        ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "aws"),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
        ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": AZURE_ASSET_TAG}, "azure"),
        ({"sys_vendor": "LENOVO", "product_name": "ThinkPad X1"}, None),
        ({}, None),
    ],
)
def test_detect_cloud_from_dmi(files: dict, cloud: str | None, tmp_path: Path, monkeypatch) -> None:
    for name in (
        "JUPYTER_SPOT_CLOUD",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "GCE_METADATA_HOST",
        "JUPYTER_SPOT_AZURE_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    assert detect_cloud(probe=False, dmi_root=tmp_path) == cloud


def test_detect_cloud_settings_win(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "sys_vendor").write_text("Amazon EC2\n")
    monkeypatch.setenv("JUPYTER_SPOT_CLOUD", "none")
    assert detect_cloud(dmi_root=tmp_path) is None
    monkeypatch.delenv("JUPYTER_SPOT_CLOUD")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    assert detect_cloud(dmi_root=tmp_path) == "gcp"


# -- jupyter spot simulate ----------------------------------------------------------------


def test_simulate_command_prints_the_export_and_fires(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            PY,
            "-c",
            "from jupyter_spot.cli import main; main()",
            "simulate",
            "aws",
            "--port",
            "0",
            "--notice-after",
            "0.5",
            "--imdsv2-only",
            "--action",
            "stop",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if "export AWS_EC2_METADATA_SERVICE_ENDPOINT=" in line:
                endpoint = line.split("=", 1)[1].strip()
                break
        assert endpoint and endpoint.startswith("http://127.0.0.1:")
        source = AWSSource(endpoint)
        end = time.monotonic() + 10
        notice = None
        while notice is None and time.monotonic() < end:
            notice = source.poll()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    assert notice is not None and (notice.kind, notice.action) == ("interruption", "stop")


def test_simulate_command_rejects_an_unknown_cloud() -> None:
    result = subprocess.run(
        [PY, "-c", "from jupyter_spot.cli import main; main()", "simulate", "oracle"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "aws|gcp|azure" in result.stderr


def test_simulator_control_endpoint_fires_the_notice() -> None:
    from jupyter_spot.notice.fetch import request

    with Simulator("azure") as sim:
        resp = request(sim.url, "POST", "/__simulator/notice", body=b'{"action": "terminate"}')
        assert resp.status == 200
        state = json.loads(request(sim.url, "GET", "/__simulator/state").body)
        bad = request(sim.url, "POST", "/__simulator/notice", body=b"not json")
    assert state["notice"]["EventType"] == "Terminate"
    assert bad.status == 400


# -- server → kernel hand-off --------------------------------------------------------------

KERNEL_LIKE = """
import json, os, signal, sys, time, pathlib, asyncio
from jupyter_spot.notice.kernel_watch import start_kernel_watch
out = pathlib.Path(sys.argv[1])
from jupyter_spot.notice.fetch import request
progress = 0
def flush(reason, deadline):
    acks = None
    if os.environ.get("SIM_URL"):  # what the cloud has been told while we are still flushing
        acks = json.loads(request(os.environ["SIM_URL"], "GET", "/__simulator/state").body)["acks"]
    out.write_text(json.dumps({"reason": reason, "progress": progress, "deadline": deadline.isoformat(),
                               "acks_during_flush": acks}))
    return f"flushed at {progress}"
def snapshot(reason):
    out.write_text(json.dumps({"snapshot": reason, "progress": progress}))
    return "snapshot taken"
start_kernel_watch(flush, snapshot, poll_interval=0.1)
# A probe: CPython runs pending handlers in signal-number order, SIGUSR1 before SIGUSR2, so once
# this file is written every SIGUSR1 sent before the SIGUSR2 has been handled.
signal.signal(signal.SIGUSR2, lambda *_: out.with_suffix(".probe").write_text(str(time.time())))
if sys.argv[2] == "busy":
    while True:
        progress += 1  # a long pure-Python cell
else:  # idle: the main thread waits in an event loop, as an idle kernel does
    asyncio.run(asyncio.sleep(60))
"""


def handled_so_far(kernel: subprocess.Popen[str], out: Path) -> None:
    """Until the KERNEL_LIKE process has handled every SIGUSR1 sent to it so far (see its probe)."""
    probe = out.with_suffix(".probe")
    probe.unlink(missing_ok=True)
    kernel.send_signal(signal.SIGUSR2)
    wait_for_file(probe)


@pytest.mark.parametrize("state", ["busy", "idle"])
def test_server_hand_off_interrupts_the_main_thread(state: str, tmp_path: Path) -> None:
    out, notice_file = tmp_path / "flushed.json", tmp_path / "notice.json"
    env = {**os.environ, "JUPYTER_SPOT_NOTICE_FILE": str(notice_file), "JUPYTER_SPOT_SERVER_WATCHES": "1"}
    kernel = subprocess.Popen([PY, "-c", KERNEL_LIKE, str(out), state], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(Path(str(notice_file) + ".ready"))
        notice = Notice("interruption", "terminate", deadline_in(120), "aws", event_id="e1")
        deliver_notice_to_kernel(kernel.pid, notice, notice_file)
        result = json.loads(wait_for_file(out))
        deliver_notice_to_kernel(kernel.pid, notice, notice_file)  # the same notice twice: one flush
        handled_so_far(kernel, out)
        assert kernel.poll() is None  # SIGUSR1 did not kill it
    finally:
        kernel.kill()
        stderr = kernel.communicate()[1]
    assert result["reason"] == "aws interruption: terminate"
    assert (result["progress"] > 0) == (state == "busy")
    assert stderr.count("Saving this session now") == 1
    assert "flushed at" in stderr


def test_rebalance_is_one_ordinary_snapshot_and_a_warning(tmp_path: Path) -> None:
    out, notice_file = tmp_path / "flushed.json", tmp_path / "notice.json"
    env = {**os.environ, "JUPYTER_SPOT_NOTICE_FILE": str(notice_file), "JUPYTER_SPOT_SERVER_WATCHES": "1"}
    kernel = subprocess.Popen([PY, "-c", KERNEL_LIKE, str(out), "busy"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(Path(str(notice_file) + ".ready"))
        notice = Notice("rebalance", "terminate", None, "aws", event_id="rebalance-1")
        for _ in range(3):
            deliver_notice_to_kernel(kernel.pid, notice, notice_file)
            handled_so_far(kernel, out)  # each one arrives on its own, not merged with the next
        result = json.loads(wait_for_file(out))
    finally:
        kernel.kill()
        stderr = kernel.communicate()[1]
    assert result["snapshot"] == "rebalance recommendation"
    assert stderr.count("Taking a snapshot now") == 1
    assert "rebalance recommendation" in stderr


def test_hand_off_refuses_a_kernel_without_the_handler(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        notice = Notice("interruption", "terminate", deadline_in(30), "signal")
        with pytest.raises(KernelNotReady, match="has not installed"):
            deliver_notice_to_kernel(sleeper.pid, notice, tmp_path / "notice.json")
        Path(str(tmp_path / "notice.json") + ".ready").write_text("1")  # stale: pid 1 is not this kernel
        with pytest.raises(KernelNotReady, match="names pid 1"):
            deliver_notice_to_kernel(sleeper.pid, notice, tmp_path / "notice.json")
        # A SIGUSR1 from either call would be pending by now, and Linux delivers it before this
        # (higher-numbered) SIGTERM: the process dies of ours only if it was never signalled.
        sleeper.terminate()
        assert sleeper.wait(timeout=30) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


def test_hibernate_flushes_only_what_is_cheap(tmp_path: Path) -> None:
    out, notice_file = tmp_path / "flushed.json", tmp_path / "notice.json"
    env = {**os.environ, "JUPYTER_SPOT_NOTICE_FILE": str(notice_file), "JUPYTER_SPOT_SERVER_WATCHES": "1"}
    kernel = subprocess.Popen([PY, "-c", KERNEL_LIKE, str(out), "busy"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(Path(str(notice_file) + ".ready"))
        deliver_notice_to_kernel(kernel.pid, Notice("interruption", "hibernate", deadline_in(120), "aws"), notice_file)
        result = json.loads(wait_for_file(out))
    finally:
        kernel.kill()
        kernel.communicate()
    budget = (datetime.fromisoformat(result["deadline"]) - utcnow()).total_seconds()
    assert 0 < budget <= 5  # RAM survives hibernation: not the full 120 s


def test_kernel_without_server_watches_azure_and_acks_after_its_flush(tmp_path: Path) -> None:
    out = tmp_path / "flushed.json"
    with Simulator("azure") as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_SPOT_", "AWS_EC2", "GCE_"))}
        env.update(sim.env, SIM_URL=sim.url)
        kernel = subprocess.Popen([PY, "-c", KERNEL_LIKE, str(out), "busy"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            until(lambda: len(sim.requests) >= 3, 60, "the kernel's own watcher to poll")
            event = sim.fire()
            result = json.loads(wait_for_file(out))
            until(lambda: sim.acks, 60, "Azure to be told the event is handled")
            polls = len(sim.requests)
            until(lambda: len(sim.requests) >= polls + 3, 60, "more polls (a second ack would be in by now)")
            acks = list(sim.acks)
        finally:
            kernel.kill()
            stderr = kernel.communicate()[1]
    assert result["reason"] == "azure interruption: preempt"
    assert result["progress"] > 0  # taken in the middle of the running loop
    assert result["acks_during_flush"] == []  # Azure not told before the flush was done…
    assert acks == [event["EventId"]]  # …and told once after
    assert "Saving this session now" in stderr

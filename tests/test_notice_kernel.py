"""End to end: a real kernel, a simulated AWS notice mid-cell, SIGKILL, restore in a fresh kernel.

The kernel has no server extension, so it watches IMDS (the simulator) by
itself; the notice reaches its main thread as SIGUSR1 while a long loop runs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import FaultPause, Kernel, until

from jupyter_spot.notice import Notice, deliver_notice_to_kernel
from jupyter_spot.notice.model import deadline_in
from jupyter_spot.notice.simulator import Simulator
from jupyter_spot.store import open_store

SESSION = "notice-e2e"
POLL = 0.2

LOOP_CELL = """\
import time
for i in range(600):  # a 60-second cell
    progress = i + 1
    if progress == 10:
        print("ten steps done", flush=True)
    time.sleep(0.1)
"""


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


def test_notice_mid_cell_flush_survives_sigkill_and_restores(
    aws: Simulator, spot_env: Path, kernels: Callable[..., Kernel]
) -> None:
    kernel = kernels(extra_arguments=[f"--SpotSettings.notice_poll_interval={POLL}"])
    kernel.run("%load_ext jupyter_spot")
    kernel.run("progress = 0")
    until(
        lambda: any(m.get("during_cell") is None and m["kind"] == "auto" for m in manifests(spot_env)),
        60,
        "the auto snapshot after `progress = 0`",
    )
    before = len(manifests(spot_env))

    cell_id = kernel.start(LOOP_CELL)
    until(lambda: len(aws.requests) > 3, 60, "the kernel to poll IMDS")
    printed = kernel.output_of(cell_id, until_idle=False, until_printed="ten steps done", timeout=60)
    aws.fire("terminate")
    mid = until(
        lambda: [m for m in manifests(spot_env)[before:] if m.get("during_cell") is not None],
        60,
        "a mid-cell snapshot after the notice",
    )
    printed += kernel.output_of(cell_id, until_idle=False, until_printed="s left", timeout=60)
    kernel.kill()  # the machine goes away mid-cell
    assert mid[0]["during_cell"] == mid[0]["execution_count"]
    assert "jupyter-spot" in printed and "s left" in printed, printed

    aws.stop()  # a fresh machine: no notice standing
    # Only restore in the new kernel: its own snapshots would become the newest.
    fresh = kernels(extra_arguments=["--SpotSettings.auto_snapshot=False", "--SpotSettings.watch_notices=False"])
    fresh.run("%load_ext jupyter_spot")
    report = fresh.run("%spot restore latest")
    progress = fresh.value("progress")
    clean_report = fresh.run("%spot restore --clean")
    clean_progress = fresh.value("progress")
    assert "mid-cell" in report and "--clean" in report, report
    assert 10 <= progress < 600, f"restored progress {progress}: the notice came after step 10, mid-loop"
    assert clean_progress == 0, clean_report
    assert "mid-cell" not in clean_report


def test_rebalance_gives_one_snapshot_and_a_warning(
    aws: Simulator, spot_env: Path, kernels: Callable[..., Kernel]
) -> None:
    kernel = kernels(extra_arguments=[f"--SpotSettings.notice_poll_interval={POLL}"])
    kernel.run("%load_ext jupyter_spot")
    kernel.run("data = list(range(10))")
    until(lambda: len(manifests(spot_env)) == 1, 60, "the auto snapshot after `data = …`")
    cell_id = kernel.start("import time\nfor i in range(30):\n    time.sleep(0.1)\n")
    aws.rebalance()
    printed = kernel.output_of(cell_id, timeout=60)
    polls = len(aws.requests)
    until(lambda: len(aws.requests) > polls + 5, 60, "many more polls that see the same recommendation")
    after = manifests(spot_env)
    kernel.run("import signal")
    handler = kernel.repr_of("signal.getsignal(signal.SIGUSR1).__qualname__")
    kernel.run("%unload_ext jupyter_spot")
    unloaded = kernel.repr_of("signal.getsignal(signal.SIGUSR1)")
    assert printed.count("rebalance recommendation") >= 1 and printed.count("Taking a snapshot now") == 1, printed
    # the first auto snapshot, one for the rebalance, one auto after the loop cell: no flush loop
    rebalance = [m for m in after if "rebalance" in str(m.get("reason", ""))]
    assert len(rebalance) == 1, [(m["kind"], m.get("reason")) for m in after]
    assert len(after) == 3
    assert handler == "'KernelNoticeHandler._on_signal'"
    assert unloaded == "<Handlers.SIG_DFL: 0>"  # %unload_ext gives the signal back


def test_azure_is_acknowledged_only_after_a_real_kernels_flush(
    spot_env: Path, tmp_path: Path, kernels: Callable[..., Kernel], simulators: Callable[..., Simulator]
) -> None:
    """The kernel watches Azure itself; its flush is held at the `notice-flush` fault point, and
    Azure must not hear "done" (which lets it stop the VM at once) until the flush is let go."""
    azure = simulators("azure")
    pause = FaultPause(tmp_path / "faults", "notice-flush")
    kernel = kernels(
        session=SESSION,
        extra_arguments=[f"--SpotSettings.notice_poll_interval={POLL}"],
        env={**azure.env, **pause.env, "JUPYTER_SPOT_CLOUD": "azure"},
    )
    kernel.run("%load_ext jupyter_spot")
    kernel.run("progress = 0")
    cell_id = kernel.start(LOOP_CELL)
    until(lambda: len(azure.requests) >= 3, 60, "the kernel to poll Azure's scheduled events")
    kernel.output_of(cell_id, until_idle=False, until_printed="ten steps done", timeout=60)
    event = azure.fire()
    assert pause.reached("notice-flush") == kernel.pid
    assert azure.acks == []  # the flush has not run: Azure must not be told to go ahead
    pause.release("notice-flush")
    until(lambda: azure.acks, 60, "Azure to be told the event is handled")
    assert azure.acks == [event["EventId"]]
    mid = [m for m in manifests(spot_env) if m.get("during_cell") is not None]
    assert len(mid) == 1 and "azure interruption: preempt" in str(mid[0].get("reason")), mid


def test_hibernate_flush_of_a_real_kernel_gives_up_after_its_short_budget(
    spot_env: Path, tmp_path: Path, kernels: Callable[..., Kernel]
) -> None:
    """Hibernation keeps RAM: a flush whose writes cannot finish (held at `blob-write`) gives up
    after the 5 s budget, not after the notice's 120 s."""
    notice_file = tmp_path / "notice.json"
    pause = FaultPause(tmp_path / "faults", "blob-write")
    kernel = kernels(
        session=SESSION,
        extra_arguments=["--SpotSettings.background_threshold=0"],
        env={"JUPYTER_SPOT_SERVER_WATCHES": "1", "JUPYTER_SPOT_NOTICE_FILE": str(notice_file)},
    )
    kernel.run("%load_ext jupyter_spot\n%spot off")
    kernel.run(f"import os\nimport numpy as np\nos.environ['JUPYTER_SPOT_FAULTS'] = {pause.env['JUPYTER_SPOT_FAULTS']!r}")
    cell_id = kernel.start(
        "import time\nweights = np.ones(2_000_000)\nprint('looping', flush=True)\nfor i in range(900):\n    time.sleep(0.1)"
    )
    assert Path(str(notice_file) + ".ready").exists()  # the handler is in place
    kernel.output_of(cell_id, until_idle=False, until_printed="looping", timeout=60)  # mid-cell from here
    notice = Notice("interruption", "hibernate", deadline_in(120), "aws", event_id="h1")
    sent = time.monotonic()
    deliver_notice_to_kernel(kernel.pid, notice, notice_file)
    printed = kernel.output_of(cell_id, until_idle=False, until_printed="deadline passed", timeout=90)
    waited = time.monotonic() - sent
    assert pause.reached("blob-write") == kernel.pid
    assert "hibernate, 120 s left. Saving this session now" in printed, printed
    assert "snapshot failed: the deadline passed before the snapshot was durable" in printed, printed
    assert waited < 60, f"the hibernate flush waited {waited:.0f} s: not the 5 s budget"  # 120 s for a terminate


def test_the_same_notice_twice_flushes_a_real_kernel_once(
    spot_env: Path, tmp_path: Path, kernels: Callable[..., Kernel]
) -> None:
    """The server may hand the same notice over twice (a retry, two sources): one flush."""
    notice_file, probe = tmp_path / "notice.json", tmp_path / "probe"
    kernel = kernels(
        session=SESSION, env={"JUPYTER_SPOT_SERVER_WATCHES": "1", "JUPYTER_SPOT_NOTICE_FILE": str(notice_file)}
    )
    kernel.run("%load_ext jupyter_spot")
    # CPython runs pending handlers in signal-number order: once SIGUSR2 wrote the probe,
    # every SIGUSR1 (the hand-off) sent before it has been handled.
    kernel.run(f"import signal, pathlib\nsignal.signal(signal.SIGUSR2, lambda *_: pathlib.Path({str(probe)!r}).touch())")
    cell_id = kernel.start(LOOP_CELL)
    kernel.output_of(cell_id, until_idle=False, until_printed="ten steps done", timeout=60)
    notice = Notice("interruption", "terminate", deadline_in(120), "aws", event_id="twice")
    deliver_notice_to_kernel(kernel.pid, notice, notice_file)
    printed = kernel.output_of(cell_id, until_idle=False, until_printed="written", timeout=60)
    deliver_notice_to_kernel(kernel.pid, notice, notice_file)
    os.kill(kernel.pid, signal.SIGUSR2)
    until(probe.exists, 60, "the kernel to handle the second hand-off")
    printed += kernel.output_of(cell_id, until_idle=False, timeout=1)
    assert printed.count("Saving this session now") == 1, printed
    assert len([m for m in manifests(spot_env) if m.get("during_cell") is not None]) == 1

"""%%spot_job --shell: a compiled program as a job, its $SPOT_CHECKPOINT_DIR synced to the store.

Real kernels, real runners, a real C program built with ``cc`` (harness.jobs.PROGRAM). The program
counts 20 steps, logging each step it starts to steps.txt and its progress to
$SPOT_CHECKPOINT_DIR/state (written to a temporary file and renamed). It waits
at a gate step until the test creates a file, so "the machine dies at step 8"
is an exact moment, not a race against a timer.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Kernel, until
from harness.jobs import DEADLINE, STEP_SECONDS, STEPS, jobs_kernel
from harness.jobs import job as _job
from harness.jobs import jobs as _jobs
from harness.jobs import runners as _runners
from harness.jobs import shell_cell as _cell
from harness.jobs import store  # noqa: F401 - fixture
from harness.jobs import synced_state as _synced_state
from harness.jobs import uninterrupted_result as _uninterrupted_result

from jupyter_spot.jobs import record
from jupyter_spot.jobs.shell import group_members
from jupyter_spot.store import open_store
from jupyter_spot.store.manifest import JOB_CHECKPOINT_FILES

SYNC_EVERY = 0.5
Kernels = Callable[..., Kernel]


def test_compiled_program_resumes_from_its_synced_checkpoint_after_the_machine_dies(
        store: Path, tmp_path: Path, kernels: Kernels) -> None:  # noqa: F811
    work, gate = tmp_path / "work", tmp_path / "gate"
    kernel = jobs_kernel(kernels, tmp_path / "work")
    kernel.run("experiment = 'counter'")  # something for the snapshot a restore starts from
    started = kernel.execute(_cell("counter", 8, gate, f"--sync-every {SYNC_EVERY}"))
    assert started.error is None, started
    assert "output files out/result.txt arrive" in started.text
    job = _job(store, "counter")
    assert job["kind"] == "shell" and job["engine"] == "local"
    # step 8 has started (and waits at the gate), and a sync since holds step 7's finished state
    until(lambda: (work / "steps.txt").exists() and (work / "steps.txt").read_text().split()[-1:] == ["8"],
          DEADLINE, "step 8")
    until(lambda: (_synced_state(store, job["id"], "jobs.ipynb") or "").startswith("8 "),
          DEADLINE, "the sync after step 7")
    kernel.wait_until_durable()
    # the machine is lost: the kernel and the runner's whole process group (bash, the program) at once
    pid = _job(store, "counter")["pid"]
    kernel.kill()
    os.killpg(pid, signal.SIGKILL)
    until(lambda: not _runners(store), DEADLINE, "the job's processes to go")
    assert _job(store, "counter")["state"] == "running"  # nobody got to say otherwise
    gate.touch()
    with jobs_kernel(kernels, tmp_path / "work") as fresh:
        (work / "out" / "result.txt").unlink(missing_ok=True)
        report = fresh.execute("%spot restore latest")
        assert report.error is None, report
        assert "job counter was running on" in report.text and "re-running it (attempt 2" in report.text, report
        waited = fresh.execute("%spot_job wait counter --timeout 120")
        assert "job counter done in" in waited.text and str(work / "out" / "result.txt") in waited.text, waited
        assert "done" in fresh.execute("%spot_job status counter").text
    steps = [int(step) for step in (work / "steps.txt").read_text().split()]
    first_run_end = next(index for index in range(1, len(steps)) if steps[index] <= steps[index - 1])
    resumed_at = steps[first_run_end]
    assert steps[:first_run_end] == list(range(9)) and steps[first_run_end:] == list(range(resumed_at, STEPS))
    # it resumed from the last sync (step 8), not from 0; none skipped; redone: at most a sync's worth + 1
    assert resumed_at == 8
    redone = len(steps) - STEPS
    assert redone <= SYNC_EVERY / STEP_SECONDS + 1
    assert (work / "out" / "result.txt").read_text() == _uninterrupted_result(work / "steps", tmp_path)


def test_notice_gives_the_program_its_grace_and_the_checkpoint_saved_then_is_restored(
        store: Path, tmp_path: Path, kernels: Kernels) -> None:  # noqa: F811
    work, gate = tmp_path / "work", tmp_path / "gate"
    kernel = jobs_kernel(kernels, tmp_path / "work")
    kernel.run("experiment = 'noticed'")
    # no periodic sync during the test: what is restored can only come from the sync on SIGTERM
    started = kernel.execute(_cell("noticed", 5, gate, "--sync-every 3600 --grace 20"))
    assert started.error is None, started
    until(lambda: (work / "steps.txt").exists() and (work / "steps.txt").read_text().split()[-1:] == ["5"],
          DEADLINE, "step 5")
    job = _job(store, "noticed")
    # a notice reaches the runner as SIGTERM (systemd stop, node drain, the cloud's notice in the runner)
    os.kill(job["pid"], signal.SIGTERM)
    ended = until(lambda: (j := _job(store, "noticed"))["state"] != "running" and j,
                  DEADLINE, "the job to be interrupted")
    assert ended["state"] == "interrupted" and "stopped by SIGTERM" in ended["error"], ended
    # bash died at once; the program took 0.5 s to save: the runner waited for it, then synced
    opened = open_store(str(store))
    saved = opened.get_record(record.checkpoint_name(job["id"]))
    listing = record.verify(opened, saved["files"], JOB_CHECKPOINT_FILES, "jobs.ipynb", job["id"])
    assert "saved-on-sigterm" in listing and "(SIGTERM)" in saved["progress"]
    assert "re-runs it from its checkpoint" in kernel.execute("1").text  # the line at the next cell
    kernel.wait_until_durable()
    kernel.kill()
    gate.touch()
    with jobs_kernel(kernels, tmp_path / "work") as fresh:
        report = fresh.execute("%spot restore latest")
        assert "job noticed was interrupted: re-running it (attempt 2" in report.text, report
        waited = fresh.execute("%spot_job wait noticed --timeout 120")
        assert "job noticed done in" in waited.text, waited
    # the re-run found the file the program saved during its grace period, and resumed at step 5
    runtime = Path(_job(store, "noticed")["log"]).with_suffix(".checkpoint")
    assert (runtime / "saved-on-sigterm").read_text().startswith("5 ")
    assert [int(step) for step in (work / "steps.txt").read_text().split()] == [*range(6), *range(5, STEPS)]


def test_cancel_and_bad_shell_cells(store: Path, tmp_path: Path, kernels: Kernels) -> None:  # noqa: F811
    with jobs_kernel(kernels, tmp_path / "work") as kernel:
        refused = kernel.execute("%%spot_job --shell --outputs ../outside.txt\necho hi")
        assert "is not a path inside the notebook's directory. Nothing was started" in refused.stderr, refused
        assert _jobs(store) == []
        failing = kernel.execute("%%spot_job --shell --name bad\necho about to fail\nexit 3")
        assert failing.error is None, failing
        status = until(lambda: "failed" in (t := kernel.execute("%spot_job status bad").text) and t,
                       DEADLINE, "the job to fail")
        assert "the script ended with exit status 3" in status
        kernel.execute("%%spot_job --shell --name sleeper --grace 5\nsleep 600")
        until(lambda: _job(store, "sleeper")["state"] == "running", DEADLINE, "the sleeper to run")
        assert "job sleeper cancelled" in kernel.execute("%spot_job cancel sleeper").text
        assert _job(store, "sleeper")["state"] == "cancelled"
        until(lambda: not _runners(store), DEADLINE, "its processes to go")
        assert "sleeper" in kernel.execute("%spot_job list").text
        # the runner alone SIGKILLed (the OOM killer; Ray killing its actor's child): its programs go with it
        kernel.execute("%%spot_job --shell --name orphan\nsleep 600")
        runner = until(lambda: (job := _job(store, "orphan"))["state"] == "running" and job["pid"],
                       DEADLINE, "the orphan job to run")
        until(lambda: len(group_members(runner)) >= 3, DEADLINE, "its sleep to start")  # bash, sleep, the guardian
        os.kill(runner, signal.SIGKILL)
        until(lambda: not group_members(runner), DEADLINE, "the job's programs to go")


@pytest.fixture(autouse=True)
def _has_cc() -> None:
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode:
        pytest.skip("no C compiler (cc) on this machine")

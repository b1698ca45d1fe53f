"""%%spot_job: heavy cells as detached jobs that survive the kernel, in real kernels.

Jobs are real runner processes; the tests kill kernels and runners with
SIGKILL as a lost machine would, and poll the store with deadlines (never a
sleep as an assertion). A job is never left running: a finalizer kills every
runner of the test's store.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from harness import Kernel, until

from harness.jobs import DEADLINE, jobs_kernel, store  # noqa: F401 (store: a fixture)
from harness.jobs import job as _job
from harness.jobs import jobs as _jobs
from harness.jobs import runners as _runners
from jupyter_spot.jobs import record
from jupyter_spot.jobs.record import active_on_host
from jupyter_spot.store import collect_garbage, open_store
from jupyter_spot.store.manifest import JOB_RUNNER

Kernels = Callable[..., Kernel]


def _kernel(kernels: Kernels, tmp_path: Path, session: str = "jobs.ipynb") -> Kernel:
    return jobs_kernel(kernels, tmp_path / "work", session)


def _value(kernel: Kernel, expression: str) -> Any:
    result = kernel.execute(f"print(repr({expression}))")
    assert result.error is None, result
    return eval(result.text.strip().splitlines()[-1])


def test_job_output_arrives_in_the_namespace(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    kernel = _kernel(kernels, tmp_path)
    kernel.execute("import numpy as np\nx = np.arange(100_000, dtype=np.float64)\nunused = [1, 2]")
    started = kernel.execute("%%spot_job --name double\ntotal = float((x * 2).sum())\nn = len(x)")
    assert started.error is None, started
    assert "(double) started; outputs total, n arrive" in started.text
    job = _job(store, "double")
    assert job["inputs"] == ["x"] and job["outputs"] == ["total", "n"]
    # the outputs come in at a cell boundary, with one line saying so
    seen = until(
        lambda: (r := kernel.execute("print('total' in globals())")).text.strip().endswith("True") and r,
        DEADLINE,
        "the job's outputs",
    )
    assert "job double done in" in seen.text and "total, n now in the namespace" in seen.text
    assert _value(kernel, "(total, n)") == (float(2 * sum(range(100_000))), 100_000)
    assert "done" in kernel.execute("%spot_job list").text


def test_job_outlives_a_killed_kernel_and_a_restore_collects_it(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    release = tmp_path / "release"
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"import numpy as np\nx = np.arange(10)\nrelease = {str(release)!r}")
    started = kernel.execute("%%spot_job --name slow\nimport os, time\nwhile not os.path.exists(release):\n"
                         "    time.sleep(0.02)\ntripled = x * 3")
    assert started.error is None, started
    until(lambda: _job(store, "slow")["state"] == "running", DEADLINE, "the job to start")
    # what a notice record lists as lost with this machine
    (active,) = active_on_host(open_store(str(store)), socket.gethostname())
    assert (active["name"], active["state"], active["pid"]) == ("slow", "running", _job(store, "slow")["pid"])
    kernel.wait_until_durable()
    kernel.kill()
    assert _job(store, "slow")["state"] == "running" and _runners(store)  # the kernel's death did not stop it
    release.touch()
    until(lambda: _job(store, "slow")["state"] == "done", DEADLINE, "the job to finish")
    fresh = _kernel(kernels, tmp_path)
    report = fresh.execute("%spot restore latest")
    assert report.error is None, report
    assert "job slow done in" in report.text and "tripled now in the namespace" in report.text
    assert _value(fresh, "tripled.tolist()") == [3 * i for i in range(10)]
    assert _job(store, "slow")["collected_at"]


def test_lost_job_is_rerun_and_resumes_from_its_checkpoint(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    steps, go = tmp_path / "steps", tmp_path / "go"
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"steps = {str(steps)!r}\ngo = {str(go)!r}")
    started = kernel.execute(
        "%%spot_job --name loop\n"
        "import os, time\n"
        "from jupyter_spot.jobs import checkpoint\n"
        "total = 0\n"
        "for i in checkpoint.range(8, keep=('total',)):\n"
        "    with open(steps, 'a') as f:\n"
        "        f.write(f'{i}\\n')\n"
        "    total += i\n"
        "    while i == 3 and not os.path.exists(go):\n"
        "        time.sleep(0.02)\n"
    )
    assert started.error is None, started
    until(lambda: steps.exists() and steps.read_text().splitlines()[-1:] == ["3"], DEADLINE, "step 3")
    kernel.wait_until_durable()
    # the machine is lost: the kernel and the job's whole process group die at once
    pid = _job(store, "loop")["pid"]
    kernel.kill()
    os.killpg(pid, signal.SIGKILL)
    until(lambda: not _runners(store), DEADLINE, "the job's process to go")
    # garbage collection with no grace period keeps what the job's records pin: inputs and checkpoint
    collected = collect_garbage(open_store(str(store)), keep=1, grace_seconds=0)
    assert collected.blobs_kept >= len(_job(store, "loop")["blobs"]) > 0
    go.touch()
    fresh = _kernel(kernels, tmp_path)
    report = fresh.execute("%spot restore latest")
    assert report.error is None, report
    assert "job loop was running on" in report.text
    assert "re-running it (attempt 2, resuming from its checkpoint at 3/8)" in report.text
    until(
        lambda: fresh.execute("print('total' in globals())").text.strip().endswith("True"),
        DEADLINE,
        "the re-run's outputs",
    )
    assert _value(fresh, "(total, i)") == (sum(range(8)), 7)
    # steps 0-2 were not redone; step 3, unfinished when the job was killed, was
    assert steps.read_text().split() == ["0", "1", "2", "3", "3", "4", "5", "6", "7"]


def _checkpoint_progress(store: Path, name: str) -> str | None:
    """The progress of the job's last checkpoint save (None before its first)."""
    saved = open_store(str(store)).get_record(record.checkpoint_name(_job(store, name)["id"]))
    return saved["progress"] if saved else None


def test_checkpoint_every_saves_at_most_that_often_and_a_rerun_redoes_only_the_unsaved_steps(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    """``every=3``: steps that finish within 3 s of the last save are not saved; the step that
    ends 3 s after it is. The job waits out those 3 s itself (step 2), so what is saved does
    not depend on the machine's speed, only on steps 0, 1 and 3 taking less than 3 s."""
    steps, go = tmp_path / "steps", tmp_path / "go"
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"steps = {str(steps)!r}\ngo = {str(go)!r}")
    started = kernel.execute(
        "%%spot_job --name every\n"
        "import os, time\n"
        "from jupyter_spot.jobs import checkpoint\n"
        "total = 0\n"
        "for i in checkpoint.range(6, keep=('total',), every=3):\n"
        "    with open(steps, 'a') as f:\n"
        "        f.write(f'{i}\\n')\n"
        "    total += i\n"
        "    if i == 0:\n"
        "        began = time.monotonic()\n"
        "    while i == 2 and time.monotonic() - began < 3:  # 3 s since the loop started: due\n"
        "        time.sleep(0.02)\n"
        "    while i == 4 and not os.path.exists(go):\n"
        "        time.sleep(0.02)\n"
    )
    assert started.error is None, started
    # A save happens in the loop's next(), before the next step starts: once step 2 runs, the
    # saves after steps 0 and 1 would be in the store.
    until(lambda: steps.exists() and steps.read_text().split()[-1:] == ["2"], DEADLINE, "step 2")
    assert _checkpoint_progress(store, "every") is None
    until(lambda: steps.read_text().split()[-1:] == ["4"], DEADLINE, "step 4")
    assert _checkpoint_progress(store, "every") == "3/6"  # after step 2; step 3 came too soon to save
    kernel.wait_until_durable()
    pid = _job(store, "every")["pid"]
    kernel.kill()
    os.killpg(pid, signal.SIGKILL)  # the machine is lost mid-step 4
    until(lambda: not _runners(store), DEADLINE, "the job's process to go")
    go.touch()
    fresh = _kernel(kernels, tmp_path)
    report = fresh.execute("%spot restore latest")
    assert report.error is None, report
    assert "re-running it (attempt 2, resuming from its checkpoint at 3/6)" in report.text, report.text
    assert "job every done in" in fresh.execute("%spot_job wait every --timeout 60").text
    assert _value(fresh, "total") == sum(range(6))  # `total` as saved after step 2, then steps 3-5
    assert steps.read_text().split() == ["0", "1", "2", "3", "4", "3", "4", "5"]  # step 3 was redone
    assert _checkpoint_progress(store, "every") == "6/6"  # the last step is always saved


def test_failing_job_shows_its_error_and_returns_nothing(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    kernel = _kernel(kernels, tmp_path)
    started = kernel.execute("%%spot_job --name bad\ny = 1\nraise ValueError('boom at step 2')")
    assert started.error is None, started
    status = until(
        lambda: "failed" in (t := kernel.execute("%spot_job status bad").text) and t, DEADLINE, "the job to fail"
    )
    assert "error: ValueError: boom at step 2" in status
    assert "raise ValueError('boom at step 2')" in status  # the traceback shows the job's own line
    assert _value(kernel, "'y' in globals()") is False


def test_unpicklable_input_is_refused_and_nothing_starts(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    kernel = _kernel(kernels, tmp_path)
    kernel.execute("gen = (i for i in range(3))")
    refused = kernel.execute("%%spot_job --name sum\nout = sum(gen)")
    message = refused.text + refused.stderr + str(refused.error)
    assert "cannot send gen to a job" in message and "generator" in message
    assert "Nothing was started" in message
    assert _jobs(store) == [] and not _runners(store)
    assert "no jobs" in kernel.execute("%spot_job list").text


def test_cells_whose_inputs_cannot_be_known_or_sent_are_refused(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    kernel = _kernel(kernels, tmp_path)
    kernel.execute("x = 3\npassword = 'hunter2'\n%spot exclude password")
    for cell in ("y = globals()['x']", "exec('y = x')", "def sneaky():\n    return eval('x')\ny = sneaky()"):
        refused = kernel.execute(f"%%spot_job --name dynamic\n{cell}")
        assert "uses globals(), vars(), locals(), exec or eval" in refused.stderr, (cell, refused)
        assert "Nothing was started" in refused.stderr
    refused = kernel.execute("%%spot_job --name secret\ny = password + '!'")
    assert "password excluded with %spot exclude" in refused.stderr and "Nothing was started" in refused.stderr
    assert _jobs(store) == [] and not _runners(store)


def test_wait_collects_only_the_listed_outputs_and_cancel_stops_a_job(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"x = 3\nrelease = {str(tmp_path / 'release')!r}")
    started = kernel.execute("%%spot_job --name quick --outputs a,b\na = x * 2\nb = [x]\nc = 5")
    assert "outputs a, b arrive" in started.text, started
    waited = kernel.execute("%spot_job wait quick --timeout 120")
    assert "job quick done" in waited.text and "a, b now in the namespace" in waited.text, waited
    assert _value(kernel, "(a, b, 'c' in globals())") == (6, [3], False)  # c was not asked for

    kernel.execute("%%spot_job --name slow\nimport os, time\nwhile not os.path.exists(release):\n    time.sleep(0.02)\nz = 1")
    until(lambda: _job(store, "slow")["state"] == "running", DEADLINE, "the job to start")
    assert "job slow cancelled" in kernel.execute("%spot_job cancel slow").text
    until(lambda: not _runners(store), DEADLINE, "the cancelled job's process to end")
    assert _job(store, "slow")["state"] == "cancelled"
    assert "cancelled" in kernel.execute("%spot_job status slow").text
    assert _value(kernel, "'z' in globals()") is False


def test_checkpoint_save_and_load_within_a_job_and_outside_one(store: Path, tmp_path: Path, kernels: Kernels) -> None:
    kernel = _kernel(kernels, tmp_path)
    cell = (
        "from jupyter_spot.jobs import checkpoint\n"
        "seen = checkpoint.load('nothing yet')\ncheckpoint.save('saved once')\nagain = checkpoint.load('default')"
    )
    kernel.execute(cell)  # tried in the notebook first: load gives the default, save does nothing
    assert _value(kernel, "(seen, again)") == ("nothing yet", "default")
    kernel.execute(f"%%spot_job --name ck\n{cell}")
    assert "job ck done" in kernel.execute("%spot_job wait ck --timeout 120").text
    assert _value(kernel, "(seen, again)") == ("nothing yet", "saved once")


@pytest.mark.parametrize("beat_age, outcome", [(5, "still running"), (120, "re-running it (attempt 2")])
def test_a_job_running_on_another_machine_counts_while_its_heartbeat_is_fresh(
    beat_age: float, outcome: str, store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    """A record naming another host cannot be checked by pid: its heartbeat's age decides
    between "still running there" (watched) and "that machine is gone" (re-run here)."""
    go = tmp_path / "go"
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"go = {str(go)!r}")
    kernel.execute("%%spot_job --name far\nimport os, time\nwhile not os.path.exists(go):\n    time.sleep(0.02)\nfar = 1")
    until(lambda: _job(store, "far")["state"] == "running", DEADLINE, "the job to start")
    kernel.wait_until_durable()
    pid = _job(store, "far")["pid"]
    kernel.kill()
    os.killpg(pid, signal.SIGKILL)
    until(lambda: not _runners(store), DEADLINE, "the job's process to go")
    # As if that runner had been on another machine, which last stamped the record `beat_age` s ago.
    # Only the runner's signed claim says where it runs (the plain `host` is for people), so the
    # claim is signed anew for the other host, as that machine's runner would have signed it.
    beat = (datetime.now(timezone.utc) - timedelta(seconds=beat_age)).isoformat(timespec="milliseconds")
    opened, job = open_store(str(store)), _job(store, "far")
    claim = {**record.runner(opened, job), "host": "other-machine.internal"}
    runner = record.sign(opened, claim, JOB_RUNNER, job["session"], job["id"])
    record.update(opened, job["id"], host="other-machine.internal", heartbeat=beat, runner=runner)
    go.touch()
    fresh = _kernel(kernels, tmp_path)
    report = fresh.execute("%spot restore latest")
    assert report.error is None, report
    assert f"job far {'is' if beat_age < 45 else 'was'} " in report.text and "other-machine.internal" in report.text
    assert outcome in report.text, report.text
    if beat_age < 45:
        assert not _runners(store)  # watched, not run a second time
    else:
        until(lambda: _job(store, "far")["state"] == "done", DEADLINE, "the re-run to finish here")


def test_python_job_stopped_by_sigterm_is_interrupted_and_a_restore_resumes_it(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    steps, go = tmp_path / "steps", tmp_path / "go"
    kernel = _kernel(kernels, tmp_path)
    kernel.execute(f"steps = {str(steps)!r}\ngo = {str(go)!r}")
    kernel.execute(
        "%%spot_job --name loop\n"
        "import os, time\n"
        "from jupyter_spot.jobs import checkpoint\n"
        "for i in checkpoint.range(6):\n"
        "    with open(steps, 'a') as f:\n"
        "        f.write(f'{i}\\n')\n"
        "    while i == 2 and not os.path.exists(go):\n"
        "        time.sleep(0.02)\n"
    )
    until(lambda: steps.exists() and steps.read_text().split()[-1:] == ["2"], DEADLINE, "step 2")
    os.kill(_job(store, "loop")["pid"], signal.SIGTERM)  # a notice, a node drain: not a failure of the job
    ended = until(lambda: (job := _job(store, "loop"))["state"] != "running" and job, DEADLINE, "the job to stop")
    assert ended["state"] == "interrupted" and "stopped by SIGTERM" in ended["error"], ended
    kernel.wait_until_durable()
    kernel.kill()
    go.touch()
    fresh = _kernel(kernels, tmp_path)
    report = fresh.execute("%spot restore latest")
    assert "job loop was interrupted: re-running it (attempt 2, resuming from its checkpoint: 2/6)" in report.text
    assert "job loop done in" in fresh.execute("%spot_job wait loop --timeout 60").text
    assert steps.read_text().split() == ["0", "1", "2", "2", "3", "4", "5"]

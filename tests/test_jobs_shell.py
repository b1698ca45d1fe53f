"""%%spot_job --shell: a compiled program as a job, its $SPOT_CHECKPOINT_DIR synced to the store.

Real kernels, real runners, a real C program built with ``cc``. The program
counts 20 steps, logging each step it starts to steps.txt and its progress to
$SPOT_CHECKPOINT_DIR/state (written to a temporary file and renamed). It waits
at a gate step until the test creates a file, so "the machine dies at step 8"
is an exact moment, not a race against a timer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_jobs import _job, _jobs, _kernel, _runners, _until, store  # noqa: F401, F811  (store is a fixture)

from jupyter_spot.jobs import record
from jupyter_spot.jobs.shell import group_members
from jupyter_spot.store import open_store
from jupyter_spot.store.manifest import JOB_CHECKPOINT_FILES

STEPS = 20
STEP_SECONDS = 0.1
SYNC_EVERY = 0.5

PROGRAM = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t term = 0;
static void on_term(int signum) { (void)signum; term = 1; }

static void save(const char *dir, const char *name, long step, unsigned long long acc) {
    char path[4096], tmp[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    FILE *f = fopen(tmp, "w");
    fprintf(f, "%ld %llu\n", step, acc);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    /* steps GATE_STEP GATE_FILE */
    long gate = atol(argv[1]);
    const char *dir = getenv("SPOT_CHECKPOINT_DIR");
    long step = 0;
    unsigned long long acc = 1469598103934665603ULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/state", dir);
    FILE *f = fopen(path, "r");
    if (f) { if (fscanf(f, "%ld %llu", &step, &acc) != 2) return 9; fclose(f); }
    signal(SIGTERM, on_term);
    while (step < %(steps)d) {
        FILE *log = fopen("steps.txt", "a");
        fprintf(log, "%ld\n", step);
        fclose(log);
        while (step == gate && access(argv[2], F_OK) != 0 && !term) usleep(10000);
        if (term) {            /* a notice: take time to save, as real programs do, then go */
            usleep(500000);
            save(dir, "saved-on-sigterm", step, acc);
            return 143;
        }
        acc = (acc ^ (unsigned long long)step) * 1099511628211ULL;
        usleep(%(step_us)d);
        step++;
        save(dir, "state", step, acc);
    }
    FILE *out = fopen("out/result.txt", "w");
    fprintf(out, "%llu\n", acc);
    fclose(out);
    return 0;
}
""".replace("%(steps)d", str(STEPS)).replace("%(step_us)d", str(int(STEP_SECONDS * 1e6)))


def _cell(name: str, gate: int, gate_file: Path, *extra: str) -> str:
    return (f"%%spot_job --shell --name {name} --outputs out/result.txt {' '.join(extra)}\n"
            "set -e\n"
            "cat > steps.c <<'EOF'\n" + PROGRAM + "EOF\n"
            "cc -O1 -o steps steps.c\n"
            "mkdir -p out\n"
            f"./steps {gate} {gate_file}\n")


def _synced_state(store_path: Path, job_id: str, session: str) -> str | None:
    """The ``state`` file as the store's last signed sync of the job's checkpoint directory holds it."""
    opened = open_store(str(store_path))
    saved = opened.get_record(record.checkpoint_name(job_id))
    if saved is None:
        return None
    listing = record.verify(opened, saved["files"], JOB_CHECKPOINT_FILES, session, job_id)
    return bytes(opened.get_blob(listing["state"]["blob"])).decode() if "state" in listing else None


def _uninterrupted_result(binary: Path, tmp_path: Path) -> str:
    """What the same program computes when nothing stops it."""
    run_in = tmp_path / "uninterrupted"
    (run_in / "out").mkdir(parents=True)
    (run_in / "checkpoint").mkdir()
    subprocess.run([str(binary), "-1", "/nonexistent"], cwd=run_in, check=True, timeout=60,
                   env={**os.environ, "SPOT_CHECKPOINT_DIR": str(run_in / "checkpoint")})
    return (run_in / "out" / "result.txt").read_text()


def test_compiled_program_resumes_from_its_synced_checkpoint_after_the_machine_dies(
        store: Path, tmp_path: Path) -> None:  # noqa: F811
    work, gate = tmp_path / "work", tmp_path / "gate"
    kernel = _kernel(tmp_path)
    kernel.run("experiment = 'counter'")  # something for the snapshot a restore starts from
    started = kernel.run(_cell("counter", 8, gate, f"--sync-every {SYNC_EVERY}"))
    assert started.error is None, started
    assert "output files out/result.txt arrive" in started.text
    job = _job(store, "counter")
    assert job["kind"] == "shell" and job["engine"] == "local"
    # step 8 has started (and waits at the gate), and a sync since holds step 7's finished state
    _until("step 8", lambda: (work / "steps.txt").exists() and (work / "steps.txt").read_text().split()[-1:] == ["8"])
    _until("the sync after step 7",
           lambda: (_synced_state(store, job["id"], "jobs.ipynb") or "").startswith("8 "))
    kernel.wait_until_durable()
    # the machine is lost: the kernel and the runner's whole process group (bash, the program) at once
    pid = _job(store, "counter")["pid"]
    kernel.kill()
    os.killpg(pid, signal.SIGKILL)
    _until("the job's processes to go", lambda: not _runners(store))
    assert _job(store, "counter")["state"] == "running"  # nobody got to say otherwise
    gate.touch()
    with contextlib.closing(_kernel(tmp_path)) as fresh:
        (work / "out" / "result.txt").unlink(missing_ok=True)
        report = fresh.run("%spot restore latest")
        assert report.error is None, report
        assert "job counter was running on" in report.text and "re-running it (attempt 2" in report.text, report
        waited = fresh.run("%spot_job wait counter --timeout 120")
        assert "job counter done in" in waited.text and str(work / "out" / "result.txt") in waited.text, waited
        assert "done" in fresh.run("%spot_job status counter").text
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
        store: Path, tmp_path: Path) -> None:  # noqa: F811
    work, gate = tmp_path / "work", tmp_path / "gate"
    kernel = _kernel(tmp_path)
    kernel.run("experiment = 'noticed'")
    # no periodic sync during the test: what is restored can only come from the sync on SIGTERM
    started = kernel.run(_cell("noticed", 5, gate, "--sync-every 3600 --grace 20"))
    assert started.error is None, started
    _until("step 5", lambda: (work / "steps.txt").exists() and (work / "steps.txt").read_text().split()[-1:] == ["5"])
    job = _job(store, "noticed")
    # a notice reaches the runner as SIGTERM (systemd stop, node drain, the cloud's notice in the runner)
    os.kill(job["pid"], signal.SIGTERM)
    ended = _until("the job to be interrupted", lambda: (j := _job(store, "noticed"))["state"] != "running" and j)
    assert ended["state"] == "interrupted" and "stopped by SIGTERM" in ended["error"], ended
    # bash died at once; the program took 0.5 s to save: the runner waited for it, then synced
    opened = open_store(str(store))
    saved = opened.get_record(record.checkpoint_name(job["id"]))
    listing = record.verify(opened, saved["files"], JOB_CHECKPOINT_FILES, "jobs.ipynb", job["id"])
    assert "saved-on-sigterm" in listing and "(SIGTERM)" in saved["progress"]
    assert "re-runs it from its checkpoint" in kernel.run("1").text  # the line at the next cell
    kernel.wait_until_durable()
    kernel.kill()
    gate.touch()
    with contextlib.closing(_kernel(tmp_path)) as fresh:
        report = fresh.run("%spot restore latest")
        assert "job noticed was interrupted: re-running it (attempt 2" in report.text, report
        waited = fresh.run("%spot_job wait noticed --timeout 120")
        assert "job noticed done in" in waited.text, waited
    # the re-run found the file the program saved during its grace period, and resumed at step 5
    runtime = Path(_job(store, "noticed")["log"]).with_suffix(".checkpoint")
    assert (runtime / "saved-on-sigterm").read_text().startswith("5 ")
    assert [int(step) for step in (work / "steps.txt").read_text().split()] == [*range(6), *range(5, STEPS)]


def test_cancel_and_bad_shell_cells(store: Path, tmp_path: Path) -> None:  # noqa: F811
    with contextlib.closing(_kernel(tmp_path)) as kernel:
        refused = kernel.run("%%spot_job --shell --outputs ../outside.txt\necho hi")
        assert "is not a path inside the notebook's directory. Nothing was started" in refused.stderr, refused
        assert _jobs(store) == []
        failing = kernel.run("%%spot_job --shell --name bad\necho about to fail\nexit 3")
        assert failing.error is None, failing
        status = _until("the job to fail", lambda: "failed" in (t := kernel.run("%spot_job status bad").text) and t)
        assert "the script ended with exit status 3" in status
        kernel.run("%%spot_job --shell --name sleeper --grace 5\nsleep 600")
        _until("the sleeper to run", lambda: _job(store, "sleeper")["state"] == "running")
        assert "job sleeper cancelled" in kernel.run("%spot_job cancel sleeper").text
        assert _job(store, "sleeper")["state"] == "cancelled"
        _until("its processes to go", lambda: not _runners(store))
        assert "sleeper" in kernel.run("%spot_job list").text
        # the runner alone SIGKILLed (the OOM killer; Ray killing its actor's child): its programs go with it
        kernel.run("%%spot_job --shell --name orphan\nsleep 600")
        runner = _until("the orphan job to run", lambda: (job := _job(store, "orphan"))["state"] == "running" and
                        job["pid"])
        _until("its sleep to start", lambda: len(group_members(runner)) >= 3)  # bash, sleep, the guardian
        os.kill(runner, signal.SIGKILL)
        _until("the job's programs to go", lambda: not group_members(runner))


@pytest.fixture(autouse=True)
def _has_cc() -> None:
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode:
        pytest.skip("no C compiler (cc) on this machine")

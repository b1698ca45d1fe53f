"""%%spot_job helpers: a test's store and its runners, job records, and the gated C program of the shell jobs.

Shared by the jobs tests (directory store) and the Ray engine's tests (S3 store).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_spot.jobs import record
from jupyter_spot.store import open_store
from jupyter_spot.store.manifest import JOB_CHECKPOINT_FILES

from .kernel import Kernel

#: How long a local job gets to reach a state the test waits for.
DEADLINE = 30.0


def runners(store: Path | str) -> list[int]:
    """Pids of runner processes working on this test's store."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"jupyter_spot.jobs.runner" in argv and str(store).encode() in argv:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def store(spot_env: Path) -> Iterator[Path]:
    """The test's directory store; every runner still working on it is killed (with its group) at the end."""
    yield spot_env
    for pid in runners(spot_env):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def jobs(store: Path) -> list[dict[str, Any]]:
    """The job records of a directory store (not their checkpoint records)."""
    records = store / "records"
    found = [] if not records.is_dir() else sorted(records.glob("job-*.json"))
    return [json.loads(path.read_text()) for path in found if not path.name.endswith(".checkpoint.json")]


def job(store: Path, name: str) -> dict[str, Any]:
    """The one job record named ``name`` (fails the test if there is not exactly one)."""
    found = [job for job in jobs(store) if isinstance(job, dict) and job.get("name") == name]
    assert len(found) == 1, f"{len(found)} job records named {name!r} in {store}"
    return found[0]


def jobs_kernel(kernels: Callable[..., Kernel], cwd: Path, session: str = "jobs.ipynb") -> Kernel:
    """A kernel of ``session`` in ``cwd`` (from the ``kernels`` fixture) with jupyter-spot loaded."""
    kernel = kernels(cwd, session)
    result = kernel.execute("%load_ext jupyter_spot")
    assert result.error is None, result
    return kernel


# -- the shell jobs' program -----------------------------------------------------------------
#: The program counts STEPS steps of STEP_SECONDS each.
STEPS = 20
STEP_SECONDS = 0.1

#: A C program that counts STEPS steps, logging each step it starts to steps.txt and its
#: progress to $SPOT_CHECKPOINT_DIR/state (written to a temporary file and renamed). It waits
#: at a gate step (argv[1]) until a file (argv[2]) exists, so "the machine dies at step 8" is an
#: exact moment; on SIGTERM it takes 0.5 s to save ``saved-on-sigterm``, then exits 143.
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


def shell_cell(name: str, gate: int, gate_file: Path, *extra: str) -> str:
    """A ``%%spot_job --shell`` cell that builds PROGRAM and runs it, gated at step ``gate``."""
    return (f"%%spot_job --shell --name {name} --outputs out/result.txt {' '.join(extra)}\n"
            "set -e\n"
            "cat > steps.c <<'EOF'\n" + PROGRAM + "EOF\n"
            "cc -O1 -o steps steps.c\n"
            "mkdir -p out\n"
            f"./steps {gate} {gate_file}\n")


def synced_state(store: Path | str, job_id: str, session: str) -> str | None:
    """The ``state`` file as the store's last signed sync of the job's checkpoint directory holds it."""
    opened = open_store(str(store))
    saved = opened.get_record(record.checkpoint_name(job_id))
    if saved is None:
        return None
    listing = record.verify(opened, saved["files"], JOB_CHECKPOINT_FILES, session, job_id)
    return bytes(opened.get_blob(listing["state"]["blob"])).decode() if "state" in listing else None


def uninterrupted_result(binary: Path, tmp_path: Path) -> str:
    """What the same program computes when nothing stops it."""
    run_in = tmp_path / "uninterrupted"
    (run_in / "out").mkdir(parents=True)
    (run_in / "checkpoint").mkdir()
    subprocess.run([str(binary), "-1", "/nonexistent"], cwd=run_in, check=True, timeout=60,
                   env={**os.environ, "SPOT_CHECKPOINT_DIR": str(run_in / "checkpoint")})
    return (run_in / "out" / "result.txt").read_text()

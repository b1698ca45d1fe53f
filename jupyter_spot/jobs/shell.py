"""A shell job run by the runner: a bash script in the notebook's directory, its
``$SPOT_CHECKPOINT_DIR`` synced to the store, its output files stored at the end.

The script runs in the runner's process group, so whatever kills the runner's
group (a lost machine, ``%spot_job cancel``'s SIGKILL) takes the program too.
On SIGTERM — a notice, a node drain, ``%spot_job cancel`` — the runner passes
SIGTERM to every other process of its group and waits, up to the job's grace
period, for all of them (not only bash: a program bash started goes on
writing its checkpoint after bash has gone), then syncs the directory and
leaves the job ``interrupted``: a restore re-runs it from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..store import Store
from . import files, submit

#: Environment variables a shell job gets.
CHECKPOINT_ENV = "SPOT_CHECKPOINT_DIR"


def checkpoint_directory(job_id: str) -> Path:
    """The job's local checkpoint directory, beside its log on the machine that runs it."""
    return submit.log_path(job_id).with_suffix(".checkpoint")


#: Run in the runner's process group beside the script: when the runner dies alone (SIGKILLed by
#: the OOM killer, or by Ray with the actor's worker, which kills its child but not the child's group),
#: it SIGKILLs the group, so that no program of the job runs on without a runner to sync its checkpoint.
GUARDIAN = """
import os, signal, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    time.sleep(0.2)
os.killpg(0, signal.SIGKILL)
"""


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` other than this one (zombies are gone already)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class ShellRun:
    """One run of a shell job, from restoring its checkpoint to storing its outputs."""

    def __init__(self, store: Store, session: str, job_id: str, spec: dict[str, Any]) -> None:
        self.store, self.session, self.job_id, self.spec = store, session, job_id, spec
        self.cwd = Path(spec["cwd"]) if spec.get("cwd") else submit.work_directory(job_id)
        self.sync_every = float(spec.get("sync_every", 60.0))
        self.grace = float(spec.get("grace", 30.0))
        self.checkpoint = files.CheckpointDirectory(store, session, job_id, checkpoint_directory(job_id))
        self.stop = threading.Event()
        self.stopped_by = ""

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopped_by = self.stopped_by or "SIGTERM"
        self.stop.set()

    def on_notice(self, notice: Any) -> None:
        self.stopped_by = self.stopped_by or f"an interruption notice ({notice.describe()})"
        self.stop.set()

    def run(self, attempt: int) -> dict[str, Any]:
        """Run the script to its end; the fields the runner finishes the record with."""
        restored = self.checkpoint.restore()
        if restored:
            print(f"restored {restored} checkpoint file(s) into ${CHECKPOINT_ENV}={self.checkpoint.directory}",
                  flush=True)
        script = self.checkpoint.directory.with_suffix(".sh")
        script.write_text(self.spec["script"])
        env = {**os.environ, CHECKPOINT_ENV: str(self.checkpoint.directory), "SPOT_JOB_ID": self.job_id,
               "SPOT_JOB_NAME": self.spec["name"], "SPOT_JOB_ATTEMPT": str(attempt)}
        process = subprocess.Popen(["bash", str(script)], cwd=self.cwd, env=env,
                                   stdin=subprocess.DEVNULL)
        guardian = subprocess.Popen([sys.executable, "-c", GUARDIAN, str(os.getpid())], stdin=subprocess.DEVNULL)
        next_sync = time.monotonic() + self.sync_every
        while process.poll() is None and not self.stop.is_set():
            self.stop.wait(min(0.2, max(0.0, next_sync - time.monotonic())))
            if time.monotonic() >= next_sync:
                self.checkpoint.sync("every {:g}s".format(self.sync_every))
                next_sync = time.monotonic() + self.sync_every
        code = self._end_group(process)
        guardian.kill()
        guardian.wait()
        self.checkpoint.sync(self.stopped_by or "at exit")
        if self.stop.is_set():
            print(f"stopped by {self.stopped_by}; checkpoint synced ({len(self.checkpoint.listing)} file(s))",
                  flush=True)
            why = f"stopped by {self.stopped_by}; its checkpoint was synced, a restore re-runs it from there"
            return {"state": "interrupted", "error": why}
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            return {"state": "failed", "error": f"the script ended with {how}"}
        try:
            outputs = files.store_outputs(self.store, self.cwd, self.spec["outputs"])
        except ValueError as error:
            return {"state": "failed", "error": str(error)}
        print(f"done; output files: {', '.join(outputs) or '(none)'}", flush=True)
        return {"state": "done", "result": {"files": outputs}, "outputs_stored": list(outputs),
                "blobs": sorted({entry["blob"] for entry in outputs.values()})}

    def _end_group(self, process: subprocess.Popen[bytes]) -> int:
        """Once bash has ended or a stop came: SIGTERM to every other process of the group (what the
        script left running, or everything on a stop), SIGKILL to any left after the grace period."""
        pgid = os.getpgid(0)
        if self.stop.is_set():
            _signal_all(group_members(pgid), signal.SIGTERM)
        else:
            process.wait()
            _signal_all(group_members(pgid), signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while (process.poll() is None or group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = group_members(pgid)
        if left:
            print(f"{len(left)} process(es) still running after the {self.grace:g}s grace period: SIGKILL", flush=True)
            _signal_all(left, signal.SIGKILL)
        return process.wait()


def watch_notices(on_notice: Any) -> Any:
    """A notice watcher for the cloud this machine is configured for (no network probe); None if none."""
    from ..notice import NoticeWatcher, cloud_sources, detect_cloud

    provider = detect_cloud(probe=False)
    sources = cloud_sources(provider) if provider else []
    if not sources:
        return None
    watcher = NoticeWatcher(sources)
    watcher.add_callback(lambda notice: on_notice(notice) if notice.kind == "interruption" else None)
    return watcher.start()

"""The kernel's side of jobs: start them, notice them finishing, bring their outputs in.

Outputs are put into the namespace only between cells (``pre_run_cell``) or
while ``%spot_job wait`` runs — never from a thread while a cell runs — so a
cell sees a job's outputs either all or none, and the snapshot after that cell
holds them. A restore looks the session's jobs up again: outputs a snapshot
does not hold yet are collected, live jobs watched, lost ones re-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..kernel.engine import SnapshotEngine
from ..store import StoreError
from . import engines, files, pack, record, submit

#: A cancelled runner gets this long after SIGTERM before SIGKILL.
CANCEL_GRACE_SECONDS = 5.0
#: ``%spot_job wait`` polls this often and prints progress this often.
WAIT_POLL_SECONDS = 0.1
WAIT_PROGRESS_SECONDS = 10.0


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _snapshot_time(snapshot_id: str) -> datetime:
    return datetime.strptime(snapshot_id.split("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)


def _log_tail(path: str | None) -> str:
    try:
        lines = Path(path or "").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _age_seconds(stamp: str) -> float:
    try:
        return (datetime.now(timezone.utc) - _parse(stamp)).total_seconds()
    except (ValueError, TypeError):  # not a time, or one without a zone
        return float("inf")


def elapsed(job: dict[str, Any]) -> str:
    start = job.get("started") or job.get("created")
    end = job.get("finished") or datetime.now(timezone.utc).isoformat()
    try:
        return f"{(_parse(end) - _parse(start)).total_seconds():.1f}s"
    except (ValueError, TypeError):  # not started, or not times (a damaged record)
        return "?"


class JobWatcher:
    """This kernel's jobs: the runners it started and the records it watches."""

    def __init__(self, shell: Any, engine: SnapshotEngine) -> None:
        self.shell = shell
        self.engine = engine
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # runners started here (reaped here)
        self.watching: set[str] = set()
        self.config = engines.settings(shell)

    @property
    def store(self) -> Any:
        return self.engine.store

    # -- starting ----------------------------------------------------------------
    def submit(self, cell: str, name: str | None, outputs: str | None, engine: str | None = None) -> dict[str, Any]:
        """Store the cell's inputs and start it; ValueError or pack.CannotSend if it cannot be a job."""
        source, inputs, assigned = submit.analyse(self.shell, cell, self.engine.excluded)
        wanted = [output.strip() for output in outputs.split(",") if output.strip()] if outputs else assigned
        values = {name_: self.shell.user_ns[name_] for name_ in inputs}
        runs_on = self._engine(engine)  # refuses a setup it cannot run on before anything is written
        job = submit.create(self.store, self.engine.session, name, source, values, wanted, outputs is not None,
                            runs_on.name)
        self._start(job, os.getcwd(), runs_on)
        return job

    def submit_shell(self, script: str, name: str | None, outputs: str | None, sync_every: float, grace: float,
                     engine: str | None = None) -> dict[str, Any]:
        """Start the cell as a bash script; ValueError if it cannot be a job."""
        wanted = [output.strip() for output in outputs.split(",") if output.strip()] if outputs else []
        runs_on = self._engine(engine)
        job = submit.create_shell(self.store, self.engine.session, name, script, wanted, sync_every, grace,
                                  runs_on.name)
        self._start(job, os.getcwd(), runs_on)
        return job

    def _engine(self, name: str | None) -> engines.Engine:
        return engines.get(name, self.store, self.config)

    def _start(self, job: dict[str, Any], cwd: str | None, runs_on: engines.Engine) -> None:
        process = runs_on.start(self.engine.store_url, job, cwd)
        if process is not None:
            self.processes[job["id"]] = process
        self.watching.add(job["id"])

    def rerun(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run a job again from its record: same source, same inputs, its checkpoint."""
        spec = record.spec(self.store, job)  # refuse before starting anything we did not sign
        runs_on = self._engine(spec.get("engine", "local"))
        job = record.update(self.store, job["id"], state="queued", attempt=job.get("attempt", 1) + 1,
                            host=record.host(), pid=None, runner=None, log=str(submit.log_path(job["id"])),
                            started=None, finished=None, heartbeat=None, error=None, traceback=None)
        self._start(job, spec.get("cwd"), runs_on)
        return job

    # -- finding -----------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        return record.session_jobs(self.store, self.engine.session)

    def find(self, name: str) -> dict[str, Any]:
        """The session's newest job with this name (or id)."""
        matches = [job for job in self.jobs() if name in (job["name"], job["id"])]
        if not matches:
            raise record.JobError(f"no job {name!r} in session {self.engine.session!r} (`%spot_job list`)")
        return matches[-1]

    def progress(self, job_id: str) -> str | None:
        saved = self.store.get_record(record.checkpoint_name(job_id))
        return None if saved is None else saved.get("progress")

    # -- finishing ---------------------------------------------------------------
    def pre_run_cell(self, info: Any = None) -> None:
        for line in self.poll():
            print(line)

    def poll(self) -> list[str]:
        """One line per watched job that finished since the last look (its outputs collected)."""
        lines = []
        for job_id in sorted(self.watching):
            try:
                line = self._check(job_id)
            except (StoreError, record.JobError) as error:
                self.watching.discard(job_id)
                line = f"jupyter-spot: job {job_id} cannot be checked any more: {error}"
            if line:
                lines.append(line)
        return lines

    def _check(self, job_id: str) -> str | None:
        process = self.processes.get(job_id)
        exit_code = None if process is None else process.poll()
        job = self._read(job_id)
        if job["state"] in record.ACTIVE:
            if job.get("engine", "local") != "local":
                return None  # the cluster restarts its runner: only the record says when it ends
            if process is not None:
                gone = exit_code is not None
            else:  # a runner this kernel did not start: only its signed claim says where it runs
                signed = record.runner(self.store, job)
                gone = signed is not None and signed["host"] == record.host() and not record.runner_alive(signed, job_id)
            if not gone:
                return None
            job = self._read(job_id)  # it may have finished between the two reads
            if job["state"] in record.ACTIVE:
                how = (f"killed by signal {-exit_code}" if exit_code is not None and exit_code < 0
                       else f"exit code {exit_code}" if exit_code is not None else "its process is gone")
                tail = _log_tail(job.get("log"))
                job = record.update(self.store, job_id, state="failed", finished=record.now(),
                                    error=f"the runner ended without finishing ({how})" + (f": {tail}" if tail else ""))
        self.watching.discard(job_id)
        self.processes.pop(job_id, None)
        return "jupyter-spot: " + self._outcome(job)

    def _read(self, job_id: str) -> dict[str, Any]:
        """The record of a job of this session (a record moved to another session is not ours any more)."""
        job = record.read(self.store, job_id)
        if job["session"] != self.engine.session:
            raise record.JobError(f"its record now names session {job['session'][:200]!r}")
        return job

    def _outcome(self, job: dict[str, Any]) -> str:
        name = job["name"]
        if job["state"] == "done":
            return self.collect(job)
        if job["state"] == "failed":
            return f"job {name} failed: {job.get('error')} (`%spot_job status {name}`)"
        if job["state"] in record.RERUNNABLE:
            return (f"job {name} was {job['state']}: {job.get('error')}; `%spot restore` on the next machine "
                    "re-runs it from its checkpoint")
        return f"job {name} {job['state']}"

    def collect(self, job: dict[str, Any]) -> str:
        """Put a finished job's outputs into the namespace; the line that says so."""
        name = job["name"]
        if job.get("kind") == "shell":
            return self._collect_files(job)
        try:
            result = record.result(self.store, job)
            values = pack.load(self.store, result["outputs"], self.shell.user_ns)
        except Exception as error:  # a damaged blob, an output class the kernel cannot import, …
            return f"job {name} finished but its outputs cannot be loaded: {type(error).__name__}: {error}"
        self.shell.user_ns.update(values)
        record.update(self.store, job["id"], collected_at=record.now())
        line = f"job {name} done in {elapsed(job)}: {', '.join(values) or 'no outputs'}"
        line += " now in the namespace" if values else ""
        if result["skipped"]:
            line += "; not returned: " + ", ".join(f"{key} ({why})" for key, why in result["skipped"].items())
        return line

    def _collect_files(self, job: dict[str, Any]) -> str:
        """Write a finished shell job's output files into the notebook's directory; the line naming each."""
        name = job["name"]
        try:
            written = files.put_back(self.store, record.result(self.store, job)["files"], Path.cwd())
        except (StoreError, record.JobError, OSError, ValueError, TypeError, KeyError) as error:
            return f"job {name} finished but its output files cannot be written: {type(error).__name__}: {error}"
        record.update(self.store, job["id"], collected_at=record.now())
        lines = [f"job {name} done in {elapsed(job)}: " + ("output files written:" if written else "no output files")]
        return "\n".join([*lines, *(f"  {path}" for path in written)])

    def wait(self, name: str, timeout: float | None) -> None:
        """Block until the job finishes (printing progress), then collect it."""
        job = self.find(name)
        job_id = job["id"]
        if job["state"] not in record.ACTIVE:
            if job["state"] == "done" and job.get("collected_at"):
                print(f"jupyter-spot: job {name} finished; its outputs were collected at {job['collected_at']}")
            else:
                self.watching.discard(job_id)
                print("jupyter-spot: " + self._outcome(job))
            return
        self.watching.add(job_id)
        started = time.monotonic()
        shown = started
        print(f"jupyter-spot: waiting for job {name} ({job['state']}; Interrupt stops waiting, not the job)")
        try:
            while True:
                line = self._check(job_id)
                if line:
                    print(line)
                    return
                now = time.monotonic()
                if timeout is not None and now - started >= timeout:
                    print(f"jupyter-spot: job {name} still running after {timeout:g}s; its outputs arrive at the "
                          "next cell after it finishes")
                    return
                if now - shown >= WAIT_PROGRESS_SECONDS:
                    shown = now
                    progress = self.progress(job_id)
                    print(f"  … {now - started:.0f}s" + (f", checkpoint at {progress}" if progress else ""))
                time.sleep(WAIT_POLL_SECONDS)
        except KeyboardInterrupt:
            print(f"jupyter-spot: stopped waiting; job {name} keeps running")

    def cancel(self, name: str) -> str:
        """Stop a job's runner: only a process this kernel started, or the one the runner's signed
        claim names, and only while its exact command line and start time still match."""
        job = self.find(name)
        if job["state"] not in record.ACTIVE:
            return f"job {job['name']} is {job['state']}: nothing to cancel"
        if job.get("engine", "local") != "local":
            try:
                self._engine(job["engine"]).cancel(job)
            except ValueError as error:  # no cluster reachable from here, Ray not installed
                raise record.JobError(f"job {job['name']} runs on the {job['engine']} cluster: {error}") from None
            record.update(self.store, job["id"], state="cancelled", finished=record.now(), error="cancelled")
            self.watching.discard(job["id"])
            return f"job {job['name']} cancelled"
        process = self.processes.pop(job["id"], None)
        if process is not None and process.poll() is None:
            pid = process.pid  # our child, not yet reaped: the pid cannot have been reused
            identity = record.process_identity(pid)
            target = identity if identity and record.is_runner_command(identity["cmdline"], job["id"]) else None
        else:
            signed = record.runner(self.store, job)
            if signed is None and job.get("pid"):
                raise record.JobError(
                    f"job {job['name']}: its record names pid {job.get('pid')} on {job.get('host')}, but carries no "
                    "runner claim signed with this machine's key for this job of this session; not signalling it "
                    "(a forged record, or one written by an older version)")
            if signed is not None and signed["host"] != record.host():
                raise record.JobError(f"job {job['name']} runs on {signed['host']} (pid {signed['pid']}): "
                                      "it can only be cancelled there")
            pid = signed["pid"] if signed else None
            target = record.process_identity(pid) if signed and record.runner_alive(signed, job["id"]) else None
        # a shell job's runner passes SIGTERM on to its programs and waits for them, up to the job's grace period
        grace = float(record.spec(self.store, job).get("grace", 0)) if job.get("kind") == "shell" else None
        if target is not None and pid is not None:
            self._stop(pid, target, process, grace)
        if process is not None:
            process.wait(timeout=CANCEL_GRACE_SECONDS)
        record.update(self.store, job["id"], state="cancelled", finished=record.now(), error="cancelled")
        self.watching.discard(job["id"])
        return f"job {job['name']} cancelled"

    @staticmethod
    def _stop(pid: int, identity: dict[str, Any], process: subprocess.Popen[bytes] | None,
              runner_grace: float | None = None) -> None:
        """SIGTERM the runner's process group (or, with ``runner_grace``, only the runner, which passes it on and
        waits that long), SIGKILL to the group after a grace period; each signal only while the process is still
        the one identified (so a reused pid is never hit)."""
        def still_it() -> bool:
            if process is not None and process.poll() is not None:
                return False
            try:
                leads_group = os.getpgid(pid) == pid  # the runner leads its own group: its children go too
            except ProcessLookupError:
                return False
            return leads_group and record.process_identity(pid) == identity

        if still_it():
            os.kill(pid, signal.SIGTERM) if runner_grace is not None else os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS + (runner_grace or 0.0)
        while still_it() and time.monotonic() < deadline:
            time.sleep(0.05)
        if still_it():
            os.killpg(pid, signal.SIGKILL)

    # -- after a restore ---------------------------------------------------------
    def after_restore(self, report: Any) -> None:
        """Pick the restored session's jobs up again; one note each in the restore report."""
        if report.snapshot_id is None:
            return
        taken = _snapshot_time(report.snapshot_id)
        problems: list[str] = []
        jobs = record.session_jobs(self.store, report.session, problems)
        report.notes.extend(problems)
        for job in jobs:
            try:
                note = self._pick_up(job, taken)
            except (StoreError, record.JobError, OSError, ValueError, TypeError, KeyError) as error:
                note = f"job {job['name']} cannot be picked up: {error}"  # a damaged record costs only its job
            if note:
                report.notes.append(note)

    def _pick_up(self, job: dict[str, Any], taken: datetime) -> str | None:
        name, state = job["name"], job["state"]
        if state == "done":
            collected = job.get("collected_at")
            if collected and _parse(collected) <= taken:
                return None  # the restored snapshot already holds its outputs
            return self.collect(job)
        if state in record.RERUNNABLE:
            job = self.rerun(job)
            progress = self.progress(job["id"])
            resume = f", resuming from its checkpoint: {progress}" if progress else ""
            return f"job {name} was {state}: re-running it (attempt {job['attempt']}{resume})"
        if state not in record.ACTIVE:
            return None
        if job.get("engine", "local") != "local":
            return self._pick_up_remote(job)
        signed = record.runner(self.store, job)  # the only trusted word on where it runs
        where = signed["host"] if signed else f"{str(job.get('host'))[:200]} (no runner signed in)"  # shown only
        if signed is None:
            alive = False
        elif where == record.host():
            alive = record.runner_alive(signed, job["id"])
        else:
            beat = job.get("heartbeat")
            alive = isinstance(beat, str) and _age_seconds(beat) < 3 * record.HEARTBEAT_SECONDS
        if alive:
            self.watching.add(job["id"])
            return f"job {name} is still running (pid {signed['pid']} on {where}): its outputs arrive when it finishes"
        job = self.rerun(job)
        progress = self.progress(job["id"])
        resume = f", resuming from its checkpoint at {progress}" if progress else ""
        return f"job {name} was {state} on {where}, whose process is gone: re-running it (attempt {job['attempt']}{resume})"


    def _pick_up_remote(self, job: dict[str, Any]) -> str:
        """A job a cluster runs: watched while its engine still has it, started there again if not."""
        runs_on = self._engine(job["engine"])
        if runs_on.alive(job):
            self.watching.add(job["id"])
            return (f"job {job['name']} is still running on the {runs_on.name} cluster "
                    f"(attempt {job.get('attempt', 1)}): its outputs arrive when it finishes")
        job = self.rerun(job)
        return (f"job {job['name']} was {job['state']} but the {runs_on.name} cluster no longer has it: "
                f"started there again (attempt {job['attempt']})")

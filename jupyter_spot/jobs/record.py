"""A job's record in the store: what to run, and how far it got.

One small JSON record per job (``job-<id>``), rewritten as the job moves
through its states: queued → running → done | failed | interrupted (or cancelled). What to
run (source, inputs), what came back (outputs), the checkpoint and which
process runs it (pid, host, exact command line) are signed with the snapshot
key and bound to the job's session and id, because running the one,
unpickling the others and signalling the last act on this machine: someone who
can write to the store but lacks the key cannot make a runner or a kernel load
theirs, nor take one of ours from another job or session. Progress fields
(state, times, error, and the pid and host shown to users) are plain and
decide nothing that runs, loads or kills.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from datetime import datetime, timezone
from typing import Any

from ..store import ManifestError, Store, StoreError
from ..store.manifest import JOB_RESULT, JOB_RUNNER, JOB_SPEC, job_place

PREFIX = "job-"
CHECKPOINT_SUFFIX = ".checkpoint"
#: States a runner may still be working in.
ACTIVE = ("queued", "running")
#: States a restore re-runs: stopped on purpose by a notice or SIGTERM, checkpoint synced.
RERUNNABLE = ("interrupted",)
#: A running job's runner stamps its record this often; three missed stamps: its machine is gone.
HEARTBEAT_SECONDS = 15.0


class JobError(Exception):
    """A job cannot be found, trusted or started; the message says why."""


def new_id() -> str:
    """Time-sortable and short: ``20261129T031233-ab12``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


def record_name(job_id: str) -> str:
    return PREFIX + job_id


def checkpoint_name(job_id: str) -> str:
    return PREFIX + job_id + CHECKPOINT_SUFFIX


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def host() -> str:
    return socket.gethostname()


def read(store: Store, job_id: str) -> dict[str, Any]:
    record = store.get_record(record_name(job_id))
    if record is None:
        raise JobError(f"no job {job_id!r} in {store.url}")
    problem = malformed(record, job_id)
    if problem:
        raise JobError(f"the record of job {job_id} is unusable: {problem}")
    return record


def malformed(record: Any, job_id: str) -> str | None:
    """Why a record read as ``job-<job_id>`` is not a job record (None if it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if record.get("id") != job_id:
        return f"it names job {str(record.get('id'))[:80]!r}"
    for key in ("session", "name", "state"):
        if not isinstance(record.get(key), str):
            return f"its {key} is not a string"
    for key in ("inputs", "outputs"):
        if not (isinstance(record.get(key), list) and all(isinstance(name, str) for name in record[key])):
            return f"its {key} is not a list of names"
    return None


def write(store: Store, record: dict[str, Any]) -> None:
    store.put_record(record_name(record["id"]), record)


def update(store: Store, job_id: str, **fields: Any) -> dict[str, Any]:
    """Re-read the record and change some fields (its writers take turns: kernel, then runner, then kernel)."""
    record = read(store, job_id)
    record.update(fields)
    write(store, record)
    return record


def sign(store: Store, document: dict[str, Any], kind: str, session: str, job_id: str) -> str:
    """``document`` signed as the ``kind`` of one job of one session."""
    return store.signer.encode(document, kind, job_place(session, job_id)).decode()


def verify(store: Store, signed: Any, kind: str, session: str, job_id: str) -> dict[str, Any]:
    """A document signed as the ``kind`` of exactly this job of this session; JobError says why not."""
    if not isinstance(signed, str):
        raise JobError(f"job {job_id} of session {session!r} has no signed {kind}")
    try:
        return store.signer.decode(signed.encode(), kind, job_place(session, job_id))
    except ManifestError as error:
        raise JobError(str(error)) from None


def spec(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """What the job runs (source, inputs, outputs), verified for this job of the record's session."""
    return verify(store, record.get("spec"), JOB_SPEC, record["session"], record["id"])


def result(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """What the job gave back (packed outputs, skipped ones), verified for this job of the record's session."""
    return verify(store, record.get("result"), JOB_RESULT, record["session"], record["id"])


def runner(store: Store, record: dict[str, Any]) -> dict[str, Any] | None:
    """Which process runs the job (pid, host, command line, start time), as its runner signed it; None if unsigned.

    The only source of a pid to signal or a host to trust: the record's plain
    ``pid`` and ``host`` are for people to read.
    """
    if record.get("runner") is None:
        return None
    try:
        return verify(store, record["runner"], JOB_RUNNER, record["session"], record["id"])
    except JobError:
        return None


def session_jobs(store: Store, session: str, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The session's job records, oldest first.

    Records that cannot be read or are not job records are left out, and named in ``problems``.
    """
    jobs = []
    for name in _job_record_names(store):
        try:
            record = store.get_record(name)
        except StoreError as error:  # one unreadable record must not hide the session's other jobs
            if problems is not None:
                problems.append(f"{error}; left out")
            continue
        if record is not None:
            problem = malformed(record, name[len(PREFIX):])
            if problem:
                if problems is not None and isinstance(record, dict) and record.get("session") == session:
                    problems.append(f"record {name} is not a usable job record ({problem}); left out")
            elif record["session"] == session:
                jobs.append(record)
    return sorted(jobs, key=lambda record: record["id"])


def _job_record_names(store: Store) -> list[str]:
    return [name for name in store.list_records() if name.startswith(PREFIX) and not name.endswith(CHECKPOINT_SUFFIX)]


def active_on_host(store: Store, on_host: str) -> list[dict[str, Any]]:
    """Jobs queued or running on ``on_host``, in brief: what a notice record lists as about to be lost."""
    found = []
    for name in _job_record_names(store):
        try:
            job = store.get_record(name)
        except StoreError:
            continue  # not a record anyone can read: nothing to list
        if not malformed(job, name[len(PREFIX):]) and job["state"] in ACTIVE and job.get("host") == on_host:
            found.append({key: job.get(key) for key in ("id", "name", "session", "state", "pid", "attempt")})
    return sorted(found, key=lambda job: job["id"])


RUNNER_MODULE = "jupyter_spot.jobs.runner"


def claim(job_id: str, attempt: int) -> dict[str, Any]:
    """What the runner signs about itself, so that only it is ever signalled as this job's runner."""
    return {"job": job_id, "attempt": attempt, "pid": os.getpid(), "host": host(),
            **(process_identity(os.getpid()) or {})}


def process_identity(pid: int) -> dict[str, Any] | None:
    """What tells a process from any other, ever (None if there is no such process): its exact
    command line and its start time, so a reused pid is never taken for the process it was."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                raw = handle.read()
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            return None
        # field 22 of stat: clock ticks from boot to the process's start; the name (field 2) may hold spaces
        started = stat[stat.rindex(b")") + 2:].split()[19].decode()
        return {"cmdline": raw.decode(errors="surrogateescape").split("\0")[:-1], "started": started}
    try:  # no /proc (macOS): ps prints the same two facts
        shown = subprocess.run(["ps", "-o", "lstart=", "-o", "args=", "-p", str(pid)], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    line = shown.stdout.rstrip("\n")
    if shown.returncode or len(line) < 26:
        return None
    return {"cmdline": line[25:], "started": line[:24]}


def is_runner_command(command_line: Any, job_id: str) -> bool:
    """``python -m jupyter_spot.jobs.runner <store> <job_id>``, exactly."""
    if isinstance(command_line, list):
        return len(command_line) == 5 and command_line[1:3] == ["-m", RUNNER_MODULE] and command_line[4] == job_id
    return isinstance(command_line, str) and f" -m {RUNNER_MODULE} " in command_line and \
        command_line.endswith(f" {job_id}")


def runner_alive(signed: dict[str, Any] | None, job_id: str) -> bool:
    """Whether the process a runner's signed claim names still runs on this machine: same pid,
    same start time, same exact command line, and that command line runs this job."""
    if not signed or signed.get("host") != host() or signed.get("job") != job_id:
        return False
    pid = signed.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    identity = process_identity(pid)
    return (identity is not None and is_runner_command(identity["cmdline"], job_id)
            and identity == {"cmdline": signed.get("cmdline"), "started": signed.get("started")})

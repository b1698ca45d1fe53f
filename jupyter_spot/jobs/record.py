"""A job's record in the store: what to run, and how far it got.

One small JSON record per job (``job-<id>``), rewritten as the job moves
through its states: queued → running → done | failed (or cancelled). What to
run (source, inputs) and what came back (outputs) are signed with the
snapshot key, because running the one and unpickling the other is code
execution: someone who can write to the store but lacks the key cannot make a
runner or a kernel load theirs. Progress fields (state, pid, host, times,
error) are plain.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from ..store import ManifestError, Store
from ..store.base import report_bad_record

PREFIX = "job-"
CHECKPOINT_SUFFIX = ".checkpoint"
#: States a runner may still be working in.
ACTIVE = ("queued", "running")
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
    return record


def write(store: Store, record: dict[str, Any]) -> None:
    store.put_record(record_name(record["id"]), record)


def update(store: Store, job_id: str, **fields: Any) -> dict[str, Any]:
    """Re-read the record and change some fields (its writers take turns: kernel, then runner, then kernel)."""
    record = read(store, job_id)
    record.update(fields)
    write(store, record)
    return record


def sign(store: Store, document: dict[str, Any]) -> str:
    return store.signer.encode(document).decode()


def verify(store: Store, signed: str, where: str) -> dict[str, Any]:
    try:
        return store.signer.decode(signed.encode(), where=where)
    except ManifestError as error:
        raise JobError(str(error)) from None


def spec(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """What the job runs (source, inputs, outputs), verified."""
    return verify(store, record["spec"], f"job {record['id']}")


def result(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """What the job gave back (packed outputs, skipped ones), verified."""
    return verify(store, record["result"], f"outputs of job {record['id']}")


def job_records(store: Store) -> Iterator[dict[str, Any]]:
    """Every job record whose ``id`` names it; others are skipped with one warning each."""
    for name in store.list_records():
        if name.startswith(PREFIX) and not name.endswith(CHECKPOINT_SUFFIX):
            record = store.get_record(name)
            if record is None:
                continue
            if record.get("id") != name[len(PREFIX) :]:
                report_bad_record(store.url, name, f"its 'id' is {str(record.get('id'))[:40]!r}, not its name's")
                continue
            yield record


def session_jobs(store: Store, session: str) -> list[dict[str, Any]]:
    """The session's job records, oldest first."""
    jobs = [record for record in job_records(store) if record.get("session") == session]
    return sorted(jobs, key=lambda record: record["id"])


def active_on_host(store: Store, on_host: str) -> list[dict[str, Any]]:
    """Jobs queued or running on ``on_host``, in brief: what a notice record lists as about to be lost."""
    found = [
        {key: job.get(key) for key in ("id", "name", "session", "state", "pid", "attempt")}
        for job in job_records(store)
        if job.get("state") in ACTIVE and job.get("host") == on_host
    ]
    return sorted(found, key=lambda job: job["id"])


def process_alive(pid: int | None, job_id: str) -> bool:
    """Whether ``pid`` on this machine is still this job's runner (not a zombie, not a reused pid)."""
    if not pid:
        return False
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                return job_id.encode() in handle.read()
        except OSError:
            return False
    try:  # no /proc (macOS): trust the pid
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

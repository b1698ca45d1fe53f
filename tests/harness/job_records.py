"""A test store's job records and runner processes, read straight from disk (no kernel needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def runner_pids(store: Path) -> list[int]:
    """Pids of job runner processes working on the local store ``store``."""
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


def job_records(store: Path) -> list[dict[str, Any]]:
    """Every job record in the local store (checkpoints left out)."""
    records = store / "records"
    found = [] if not records.is_dir() else sorted(records.glob("job-*.json"))
    return [json.loads(path.read_text()) for path in found if not path.name.endswith(".checkpoint.json")]


def job_named(store: Path, name: str) -> dict[str, Any]:
    """The one job record called ``name`` (fails the test if there is not exactly one)."""
    found = [job for job in job_records(store) if isinstance(job, dict) and job.get("name") == name]
    assert len(found) == 1, f"{len(found)} job records named {name!r} in {store}"
    return found[0]

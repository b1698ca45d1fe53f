"""Snapshots committed straight to a store, as the kernel engine writes them (no kernel needed)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from jupyter_spot.store.base import digest_of


def commit_snapshot(store: Any, session: str, minutes_ago: float, **extra: Any) -> str:
    """A real signed manifest (blob included) of ``session``, dated ``minutes_ago``; its id."""
    created = datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)
    snapshot_id = created.strftime("%Y%m%dT%H%M%S.%fZ") + "-t"
    data = json.dumps({"x": minutes_ago}).encode()
    digest = digest_of(data)
    store.put_blob(digest, data)
    manifest = {
        "session": session,
        "id": snapshot_id,
        "created": created.isoformat(),
        "kind": "auto",
        "during_cell": None,
        "execution_count": 3,
        "variables": {"x": {"group": 0, "type": "int", "size": len(data)}},
        "variable_count": 1,
        "skipped": {"conn": {"type": "sqlite3.Connection", "reason": "cannot pickle", "cell": 2}},
        "blobs": [digest],
        "size": len(data),
        **extra,
    }
    store.commit_manifest(manifest)
    return snapshot_id

"""Named fault points, so tests and the fault campaign can stop a writer at an exact step.

Off unless ``$JUPYTER_SPOT_FAULTS`` names a point; then costs one environment lookup.
The variable holds ``point=action[@hit]`` items separated by ``;``:

* ``kill``          — SIGKILL this process there (a machine or OOM death);
* ``raise``         — raise ``OSError(EIO)`` there (a failing disk or network);
* ``sleep:SECONDS`` — stall there;
* ``pause:DIR``     — create ``DIR/<point>.reached`` (holding the pid), then wait until
  ``DIR/<point>.release`` exists: the test decides what happens while the step is in flight.

``@N`` fires on the N-th time the point is reached in this process (default: the first),
``@N+`` on the N-th and every later one. Points in the code:

``blob-write``       a blob's bytes are written but not yet durable under its address;
``manifest-commit``  every blob is stored, the manifest not yet written;
``manifest-write``   the commit checked that its blobs exist; the manifest is written next;
``gc-scan``          the collector is about to read one manifest for the blobs it references;
``gc-delete``        the collector is about to delete an unreferenced blob (writers were told);
``replicate``        a tiered store sent a snapshot's blobs to S3 but not its manifest;
``restore``          a manifest is loaded, nothing is in the namespace yet;
``notice-flush``     a notice's flush starts;
``flush-queued``     a notice's flush has queued its snapshot, superseding those still being written;
``key-create``       a KMS data key is made but its key object not yet written to the store;
``kernel-started``   the server started a kernel process and is about to record its session;
``heartbeat``        the server starts a round of heartbeats on its sessions' records.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from functools import lru_cache
from pathlib import Path

ENV = "JUPYTER_SPOT_FAULTS"
#: How long a paused point waits for its release before going on (a test that died).
PAUSE_LIMIT = 600.0

_hits: dict[str, int] = {}
_lock = threading.Lock()


@lru_cache(maxsize=8)
def _parse(spec: str) -> dict[str, tuple[str, int, bool]]:
    """``point -> (action, hit, and later hits too)``; a malformed item is an error, not ignored."""
    faults: dict[str, tuple[str, int, bool]] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        point, sep, action = item.partition("=")
        if not sep or not point or not action:
            raise ValueError(f"${ENV}: {item!r} is not point=action[@hit]")
        action, _, hit = action.partition("@")
        repeat = hit.endswith("+")
        faults[point.strip()] = (action.strip(), int(hit.rstrip("+") or 1), repeat)
    return faults


def fault_point(point: str) -> None:
    """Fire the fault ``$JUPYTER_SPOT_FAULTS`` sets for ``point``, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault = _parse(spec).get(point)
    if fault is None:
        return
    action, hit, repeat = fault
    with _lock:
        _hits[point] = count = _hits.get(point, 0) + 1
    if count < hit or (count > hit and not repeat):
        return
    name, _, argument = action.partition(":")
    if name == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif name == "raise":
        raise OSError(errno.EIO, f"injected fault at {point}")
    elif name == "sleep":
        time.sleep(float(argument))
    elif name == "pause":
        folder = Path(argument)
        (folder / f"{point}.reached").write_text(str(os.getpid()))
        release = folder / f"{point}.release"
        deadline = time.monotonic() + PAUSE_LIMIT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        raise ValueError(f"${ENV}: unknown action {action!r} for {point}")

"""Why a kernel was lost without the user asking: its exit status, or the idle culler.

The server learns it from jupyter_client's restarter (its ``restart`` and
``dead`` callbacks fire only for kernels that died on their own, never for a
restart the user asked for) and from wrapping the mapping kernel manager's
``cull_kernel_if_idle``. The cause goes into the session record (``lost``), so
the sessions API — and the Lab and Notebook 7 banners — can name it.
"""

from __future__ import annotations

import signal
from typing import Any

from ..units import human_bytes

#: Signals that mean the process crashed in native code rather than was told to stop.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
#: How many of the snapshot's variables an OOM cause names.
LARGEST_SHOWN = 5


def exit_cause(returncode: int | None) -> dict[str, Any]:
    """The ``lost`` entry for a kernel process that ended with ``returncode`` (negative: a signal)."""
    if returncode is None:
        return {"kind": "died", "text": "the kernel died (exit status unknown)"}
    if returncode < 0:
        number = -returncode
        if number == signal.SIGKILL:
            text, kind = f"the kernel was killed (signal {number}) — most likely out of memory", "oom"
        elif number in CRASH_SIGNALS:
            text, kind = f"the kernel crashed (signal {number})", "crash"
        else:
            text, kind = f"the kernel was stopped by signal {number}", "signal"
        return {"kind": kind, "signal": number, "text": text}
    return {"kind": "exit", "exit_code": returncode, "text": f"the kernel exited with status {returncode}"}


def cull_cause(idle_seconds: float) -> dict[str, Any]:
    """The ``lost`` entry for a kernel the server's idle culler shut down."""
    idle = f"{round(idle_seconds / 60)} min" if idle_seconds >= 60 else f"{int(idle_seconds)} s"
    return {"kind": "culled", "idle_seconds": int(idle_seconds), "text": f"culled after {idle} idle"}


def largest_variables(manifest: dict[str, Any], count: int = LARGEST_SHOWN) -> list[dict[str, Any]]:
    """The snapshot's biggest variables, largest first: what to ``%spot exclude`` or free after an OOM."""
    variables = manifest.get("variables")
    if not isinstance(variables, dict):
        return []
    sized = [
        {"name": str(name), "type": info.get("type"), "size": int(info.get("size") or 0)}
        for name, info in variables.items()
        if isinstance(info, dict) and isinstance(info.get("size"), (int, float))
    ]
    sized.sort(key=lambda v: v["size"], reverse=True)
    return sized[:count]


def describe_largest(variables: list[dict[str, Any]]) -> str:
    """``"big (800.0 MB), df (12.0 MB)"``."""
    return ", ".join(f"{v['name']} ({human_bytes(v['size'])})" for v in variables)

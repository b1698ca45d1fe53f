"""Why a kernel was lost without the user asking: its exit status, the idle culler, or its server stopping.

The server learns it from jupyter_client's restarter (its ``restart`` and
``dead`` callbacks fire only for kernels that died on their own, never for a
restart the user asked for), from wrapping the mapping kernel manager's
``cull_kernel_if_idle``, and from its own stop (JupyterHub's idle culler stops
the whole single-user server). The cause goes into the session record
(``lost``), so the sessions API — and the Lab and Notebook 7 banners — can name it.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

from ..units import human_bytes

#: Signals that mean the process crashed in native code rather than was told to stop.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
#: How many of the snapshot's variables an OOM cause names.
LARGEST_SHOWN = 5
#: Set in every JupyterHub single-user server's environment by its spawner.
HUB_ENV = ("JUPYTERHUB_API_URL", "JUPYTERHUB_SERVICE_PREFIX")
#: The ``kind`` of the loss a stopping server records for each of its kernels.
SERVER_STOPPED = "server-stopped"
#: A hub stopping a server idle this long is taken for its idle culler (the user stopping it was active).
HUB_CULLED_IDLE_SECONDS = 60.0


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


def _idle(seconds: float) -> str:
    return f"{round(seconds / 60)} min" if seconds >= 60 else f"{int(seconds)} s"


def cull_cause(idle_seconds: float) -> dict[str, Any]:
    """The ``lost`` entry for a kernel the server's idle culler shut down."""
    return {"kind": "culled", "idle_seconds": int(idle_seconds), "text": f"culled after {_idle(idle_seconds)} idle"}


def under_jupyterhub(env: Mapping[str, str]) -> bool:
    """A JupyterHub single-user server: its spawner set the hub's variables."""
    return any(env.get(name) for name in HUB_ENV)


def server_stop_cause(*, hub: bool, idle_seconds: float, signalled: bool) -> dict[str, Any]:
    """The ``lost`` entry for the kernels of a server that is stopping (not a cloud notice: that names itself).

    Under JupyterHub the hub stops the server: its idle culler (the usual case on
    return), an admin, or the user's "Stop My Server"; a server idle for a while
    was culled. Elsewhere: SIGTERM (``signalled``), ``jupyter server stop``, File ▸ Shut Down.
    """
    if hub and idle_seconds >= HUB_CULLED_IDLE_SECONDS:
        text = f"the server was stopped by JupyterHub (idle culler) after {_idle(idle_seconds)} idle"
    elif hub:
        text = "the server was stopped by JupyterHub"
    else:
        text = "the server was stopped (SIGTERM)" if signalled else "the server was stopped"
    return {"kind": SERVER_STOPPED, "hub": hub, "idle_seconds": int(idle_seconds), "text": text}


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

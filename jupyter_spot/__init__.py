"""jupyter-spot: Jupyter sessions that survive spot-instance interruptions.

The kernel-side API. Everything heavy is imported on first use, because the
server imports this package too.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ._version import __version__

if TYPE_CHECKING:
    from .kernel.results import RestoreReport, SnapshotResult

Hook = TypeVar("Hook", bound=Callable[..., Any])


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """The server extension (imported only when jupyter_server loads it)."""
    from .server.app import SpotApp

    return [{"module": "jupyter_spot", "app": SpotApp}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension lives (for ``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "jupyter-spot"}]


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext jupyter_spot``: snapshot after every cell from now on."""
    from .kernel import extension

    extension.load(ip)


def unload_ipython_extension(ip: Any) -> None:
    from .kernel import extension

    extension.unload(ip)


def snapshot() -> SnapshotResult:
    """Snapshot now; returns once the snapshot is durable."""
    from .kernel import extension

    return extension.current().snapshot(kind="explicit")


def restore(snapshot: str = "latest", session: str | None = None, clean: bool = False) -> RestoreReport:
    """Load a snapshot (default: this session's latest) into this kernel."""
    from .kernel import extension

    return extension.current().restore(snapshot, session=session, clean=clean)


def flush(reason: str, deadline: datetime | None = None) -> SnapshotResult:
    """Final snapshot on an interruption notice; waits until durable (or ``deadline``).

    May be called from a signal handler while a cell runs: the snapshot is then
    a mid-cell one, kept beside the last clean snapshot.
    """
    from .kernel import extension

    return extension.current().flush(reason, deadline)


def status() -> dict[str, Any]:
    """Store, session, last snapshot, and what is still being written."""
    from .kernel import extension

    return extension.current().status()


def after_restore(hook: Hook) -> Hook:
    """Decorator: run ``hook()`` (or ``hook(report)``) after every restore — reconnect, re-seed."""
    from .kernel.engine import register_after_restore

    return register_after_restore(hook)


__all__ = [
    "__version__",
    "after_restore",
    "flush",
    "load_ipython_extension",
    "restore",
    "snapshot",
    "status",
    "unload_ipython_extension",
]

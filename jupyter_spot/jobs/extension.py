"""Hooking jobs into a shell the snapshot engine is loaded in.

Apart from watch.py so the magics (which drive the watcher) and the watcher
never import each other.
"""

from __future__ import annotations

from typing import Any

from ..kernel.engine import AFTER_RESTORE_HOOKS, SnapshotEngine, register_after_restore
from . import engines
from .magics import JobMagics
from .watch import JobWatcher

#: The watcher of the shell the extension is loaded in.
WATCHER: JobWatcher | None = None


def load(shell: Any, engine: SnapshotEngine) -> JobWatcher:
    """Hook jobs into a shell the snapshot engine is loaded in: magics, cell boundary, restore."""
    global WATCHER
    engines.quiet_ray_import()
    watcher = JobWatcher(shell, engine)
    shell.events.register("pre_run_cell", watcher.pre_run_cell)
    register_after_restore(watcher.after_restore)
    shell.register_magics(JobMagics(shell, watcher))
    WATCHER = watcher
    return watcher


def unload(shell: Any) -> None:
    global WATCHER
    watcher = WATCHER
    if watcher is None or watcher.shell is not shell:
        return
    shell.events.unregister("pre_run_cell", watcher.pre_run_cell)
    AFTER_RESTORE_HOOKS[:] = [hook for hook in AFTER_RESTORE_HOOKS if hook != watcher.after_restore]
    WATCHER = None

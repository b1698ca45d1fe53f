"""``%load_ext jupyter_spot``: one engine per shell, hooked to every cell."""

from __future__ import annotations

import atexit
from typing import Any

from .engine import SnapshotEngine

#: The engine of the shell the extension is loaded in (one per kernel).
ENGINE: SnapshotEngine | None = None
#: Its interruption-notice handler (jupyter_spot.notice.kernel_watch), if the platform has one.
NOTICES: Any = None


def _flush_at_exit() -> None:
    if ENGINE is not None:
        ENGINE.wait_until_durable(timeout=60)


def load(shell: Any) -> SnapshotEngine:
    global ENGINE, NOTICES
    if ENGINE is not None and ENGINE.shell is shell:
        return ENGINE
    from ..jobs.extension import load as load_jobs
    from ..notice.kernel_watch import start_kernel_watch
    from ..store import StoreError
    from .magics import SpotMagics

    engine = SnapshotEngine(shell)
    try:
        engine.store.check_writable()
    except StoreError as error:
        engine._warn(f"snapshots cannot be written: {error}")
    shell.events.register("pre_run_cell", engine.pre_run_cell)
    shell.events.register("post_run_cell", engine.post_run_cell)
    shell.register_magics(SpotMagics(shell, engine))
    load_jobs(shell, engine)
    NOTICES = start_kernel_watch(
        engine.flush, watch=engine.settings.watch_notices, poll_interval=engine.settings.notice_poll_interval
    )
    atexit.register(_flush_at_exit)
    ENGINE = engine
    return engine


def unload(shell: Any) -> None:
    global ENGINE, NOTICES
    from ..jobs.extension import unload as unload_jobs

    engine = ENGINE
    if engine is None or engine.shell is not shell:
        return
    if NOTICES is not None:
        NOTICES.close()
        NOTICES = None
    shell.events.unregister("pre_run_cell", engine.pre_run_cell)
    shell.events.unregister("post_run_cell", engine.post_run_cell)
    unload_jobs(shell)
    engine.wait_until_durable(timeout=60)
    ENGINE = None


def rename_session(session: str) -> str | None:
    """The server's call when a notebook is renamed: a kernel without the extension has nothing to move."""
    return None if ENGINE is None else ENGINE.rename_session(session)


def current() -> SnapshotEngine:
    """The loaded engine, or load it into the running IPython shell."""
    if ENGINE is not None:
        return ENGINE
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("jupyter_spot snapshots need an IPython kernel: run `%load_ext jupyter_spot` in a notebook")
    return load(shell)

"""``jupyter spot run NOTEBOOK [-o OUT]``: a batch run that survives being killed.

nbclient executes the notebook one cell at a time in a kernel with the
jupyter-spot extension. After each cell the kernel takes an explicit snapshot
(auto-snapshots are off, so exactly one snapshot belongs to each cell) and the
output notebook is rewritten atomically with the cell's outputs and, in its
metadata, the progress (as papermill keeps its parameters there)::

    "jupyter_spot": {"session": …, "completed": 5, "snapshot": "<id>",
                     "sources": ["<sha256 of cell 0 source>", …], "status": "running"}

Run again after a kill: when the output notebook's progress matches the input
(same session, same sources for the completed cells) a fresh kernel restores
that snapshot and execution resumes at the first unfinished cell, so finished
cells never run twice. A run stopped by a failing cell resumes at that cell
(fix it and run again); a finished run (``status: "done"``) starts over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import nbformat
from jupyter_core.application import JupyterApp, base_aliases
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import Float, Unicode

from ._version import __version__
from .config import SESSION_ENV, STORE_ENV, resolve_store_url
from .server.catalog import isoformat, utcnow
from .store.holders import session_record_name
from .server.kernel_calls import KernelRestoreError, evaluate

METADATA_KEY = "jupyter_spot"
SNAPSHOT_EXPRESSION = "__import__('json').dumps(__import__('jupyter_spot').snapshot().to_dict(), default=str)"


class RunError(Exception):
    """The run cannot go on; the message says why and what was kept."""


def source_digest(cell: Any) -> str:
    return hashlib.sha256(f"{cell.cell_type}\0{cell.source}".encode()).hexdigest()


def session_name(notebook: Path) -> str:
    """The notebook path relative to the working directory (as a server would name it), else absolute."""
    path = notebook.resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def resume_point(notebook: Any, previous: Any, session: str) -> tuple[int, str | None]:
    """How many cells of ``notebook`` a previous (killed) run finished, and the snapshot after them."""
    progress = (previous.metadata.get(METADATA_KEY) if previous is not None else None) or {}
    completed = int(progress.get("completed") or 0)
    if progress.get("session") != session or progress.get("status") not in ("running", "failed") or not completed:
        return 0, None
    digests = [source_digest(cell) for cell in notebook.cells[:completed]]
    if len(previous.cells) < completed or progress.get("sources", [])[:completed] != digests:
        return 0, None  # the notebook changed since: its earlier outputs no longer describe it
    return completed, progress.get("snapshot")


def write_atomically(notebook: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        nbformat.write(notebook, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class NotebookRun:
    """One run: the input notebook, where outputs go, and how far it got."""

    def __init__(self, notebook: Path, output: Path, store_url: str, kernel_name: str, timeout: float | None) -> None:
        self.notebook_path = notebook
        self.output_path = output
        self.store_url = store_url
        self.session = session_name(notebook)
        self.timeout = timeout
        self.nb = nbformat.read(notebook, as_version=4)
        self.kernel_name = kernel_name or self.nb.metadata.get("kernelspec", {}).get("name", "python3")

    def say(self, text: str) -> None:
        print(f"jupyter spot run: {text}", file=sys.stderr, flush=True)

    def _progress(self, completed: int, snapshot: str | None, status: str) -> None:
        self.nb.metadata[METADATA_KEY] = {
            "session": self.session,
            "completed": completed,
            "snapshot": snapshot,
            "sources": [source_digest(cell) for cell in self.nb.cells],
            "status": status,
            "updated": isoformat(utcnow()),
        }
        write_atomically(self.nb, self.output_path)

    async def run(self) -> int:
        """Execute (or resume) the notebook; returns how many cells this call executed."""
        previous = nbformat.read(self.output_path, as_version=4) if self.output_path.exists() else None
        start, snapshot = resume_point(self.nb, previous, self.session)
        if start:
            for cell, done in zip(self.nb.cells[:start], previous.cells[:start], strict=True):
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = done.outputs, done.execution_count
            self.say(f"resuming {self.session} at cell {start + 1} of {len(self.nb.cells)} (snapshot {snapshot})")
        env = {**os.environ, SESSION_ENV: self.session, STORE_ENV: self.store_url}
        client = NotebookClient(
            self.nb,
            timeout=self.timeout,
            kernel_name=self.kernel_name,
            record_timing=False,
            extra_arguments=["--ext=jupyter_spot", "--SpotSettings.auto_snapshot=False"],
            resources={"metadata": {"path": str(self.notebook_path.resolve().parent)}},
        )
        self._record("running")
        executed = 0
        async with client.async_setup_kernel(env=env):
            if snapshot:
                await self._evaluate(
                    client, f"__import__('jupyter_spot').restore({snapshot!r}, session={self.session!r}).to_dict()"
                )
            for index in range(start, len(self.nb.cells)):
                cell = self.nb.cells[index]
                if cell.cell_type == "code":
                    try:
                        await client.async_execute_cell(cell, index)
                    except CellExecutionError:
                        self._progress(index, snapshot, "failed")
                        raise
                    executed += 1
                    result = await self._evaluate(client, SNAPSHOT_EXPRESSION)
                    result = json.loads(result) if isinstance(result, str) else result
                    if result.get("error") or not result.get("id"):
                        self.say(f"cell {index + 1}: snapshot failed ({result.get('error')}); a rerun restarts here")
                    else:
                        snapshot = result["id"]
                self._progress(index + 1, snapshot, "running")
        self._progress(len(self.nb.cells), snapshot, "done")
        self._record("closed", snapshot)
        return executed

    async def _evaluate(self, client: NotebookClient, expression: str) -> Any:
        try:
            value = await evaluate(client.kc, expression, self.timeout)
        except KernelRestoreError as error:
            raise RunError(f"{error} (outputs so far are in {self.output_path})") from None
        if isinstance(value, dict) and value.get("error"):
            raise RunError(f"restore failed: {value['error']}")
        return value

    def _record(self, state: str, snapshot: str | None = None) -> None:
        """The session record a server reads: a finished run is closed (its line too), not interrupted."""
        from .store import StoreError, open_store
        from .store.lines import close_line_of

        record = {"session": self.session, "state": state, "host": socket.gethostname(), "runner": "jupyter spot run"}
        if state == "closed":
            record["closed_at"] = isoformat(utcnow())
        try:
            store = open_store(self.store_url)
            if state == "closed" and snapshot:
                close_line_of(store, self.session, snapshot, "jupyter spot run (finished)")
            store.put_record(session_record_name(self.session), record)
        except StoreError as error:
            self.say(f"could not record the run in the store: {error}")


class RunApp(JupyterApp):
    name = "jupyter-spot-run"
    version = __version__
    description = (
        "Run a notebook with nbclient, snapshotting after each cell. Run it again after an interruption "
        "and it resumes at the first unfinished cell with the kernel's state restored."
    )
    output = Unicode("", help="Where the executed notebook goes (default: the input notebook, in place).").tag(
        config=True
    )
    store = Unicode("", help="Store URL (default: $JUPYTER_SPOT_STORE, else the Jupyter data dir).").tag(config=True)
    kernel = Unicode("", help="Kernel spec name (default: the notebook's).").tag(config=True)
    timeout = Float(None, allow_none=True, help="Seconds one cell may run (default: no limit).").tag(config=True)
    aliases = {
        **base_aliases,
        "o": "RunApp.output",
        "output": "RunApp.output",
        "store": "RunApp.store",
        "kernel": "RunApp.kernel",
        "timeout": "RunApp.timeout",
    }

    def start(self) -> None:
        if len(self.extra_args) != 1:
            print("usage: jupyter spot run NOTEBOOK [-o OUT]", file=sys.stderr)
            self.exit(2)
        notebook = Path(self.extra_args[0])
        if not notebook.is_file():
            print(f"jupyter spot run: no notebook {notebook}", file=sys.stderr)
            self.exit(2)
        run = NotebookRun(
            notebook,
            Path(self.output) if self.output else notebook,
            self.store or resolve_store_url(),
            self.kernel,
            self.timeout,
        )
        try:
            executed = asyncio.run(run.run())
        except CellExecutionError as error:
            print(f"jupyter spot run: a cell failed; outputs are in {run.output_path}\n{error}", file=sys.stderr)
            self.exit(1)
        except RunError as error:
            print(f"jupyter spot run: {error}", file=sys.stderr)
            self.exit(1)
        print(f"jupyter spot run: executed {executed} cell(s); wrote {run.output_path}")

"""Turning a cell into a job: find its inputs and outputs, store them, start the runner."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..kernel import tracking
from ..store import Store
from ..store.manifest import JOB_SPEC
from . import files, pack, record


def assigned_names(tree: ast.Module) -> list[str]:
    """Names the cell binds at top level (inside if/for/with/try too, not inside def/class)."""
    found: dict[str, None] = {}

    def target(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            found[node.id] = None
        elif isinstance(node, ast.Tuple | ast.List):
            for element in node.elts:
                target(element)
        elif isinstance(node, ast.Starred):
            target(node.value)

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found[statement.name] = None
                continue
            if isinstance(statement, ast.Assign):
                for node in statement.targets:
                    target(node)
            elif isinstance(statement, ast.AugAssign | ast.AnnAssign) and getattr(statement, "value", None):
                target(statement.target)
            elif isinstance(statement, ast.For | ast.AsyncFor):
                target(statement.target)
            elif isinstance(statement, ast.With | ast.AsyncWith):
                for item in statement.items:
                    if item.optional_vars is not None:
                        target(item.optional_vars)
            elif isinstance(statement, ast.Import | ast.ImportFrom):
                for alias in statement.names:
                    if alias.name != "*":
                        found[(alias.asname or alias.name).split(".")[0]] = None
            for node in ast.walk(statement):
                if isinstance(node, ast.NamedExpr):
                    target(node.target)
            for block in ("body", "orelse", "finalbody"):
                visit(getattr(statement, block, []))
            for handler in getattr(statement, "handlers", []):
                visit(handler.body)
            for case in getattr(statement, "cases", []):
                visit(case.body)

    visit(tree.body)
    return list(found)


def analyse(shell: Any, cell: str, excluded: set[str]) -> tuple[str, list[str], list[str]]:
    """(plain Python source, input names, output names) of a cell; ValueError says why not."""
    source = shell.transform_cell(cell)
    if "get_ipython()" in source:
        raise ValueError("a job runs as plain Python: magics, shell escapes (!cmd) and get_ipython() "
                         "are not available in it")
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(f"the cell is not valid Python: {error}") from None
    mentioned = tracking.cell_names(source)
    reachable = None if mentioned is None else tracking.reachable_names(mentioned, shell.user_ns)
    if reachable is None:
        raise ValueError("the cell (or a notebook function it calls) uses globals(), vars(), locals(), exec or "
                         "eval, so which variables it reads cannot be known")
    inputs = [name for name in tracking.user_names(shell.user_ns, shell.user_ns_hidden) if name in reachable]
    secret = sorted(set(inputs) & excluded)
    if secret:
        raise ValueError(f"{', '.join(secret)} excluded with %spot exclude: never written to the store, so a job "
                         "cannot take it")
    return source, inputs, assigned_names(tree)


def _cwd(engine: str) -> str | None:
    """The notebook's directory for a local job; none for a cluster's (a scratch directory on its node)."""
    return os.getcwd() if engine == "local" else None


def work_directory(job_id: str) -> Path:
    """Where a job without the notebook's directory runs (a cluster node): beside its log."""
    path = log_path(job_id).with_suffix(".work")
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_path(job_id: str) -> Path:
    """Where a runner's output goes: the Jupyter runtime dir, beside the kernels' connection files."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / "jupyter_spot" / "jobs" / f"{job_id}.log"


def launch(store_url: str, job_id: str, cwd: str | None,
           extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the runner detached: own session (a signal to the kernel's group misses it),
    stdin closed, output appended to its log."""
    log = log_path(job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(extra_env or {})}
    if env.get("MPLBACKEND", "").startswith("module://"):
        env["MPLBACKEND"] = "Agg"  # the kernel's inline backend has no frontend to draw in
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_spot.jobs.runner", store_url, job_id],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=cwd if cwd and os.path.isdir(cwd) else None, env=env,
        )
    return process


def create(store: Store, session: str, name: str | None, source: str, values: dict[str, Any],
           outputs: list[str], explicit_outputs: bool, engine: str = "local") -> dict[str, Any]:
    """Store the inputs and the signed job description; the record, queued (nothing started yet).

    Raises pack.CannotSend, before anything is written, if an input cannot be pickled.
    """
    dumped = pack.dump(values)
    job_id = record.new_id()
    name = name or job_id
    inputs = pack.write(store, dumped)
    spec = {
        "id": job_id, "session": session, "name": name, "source": source, "inputs": inputs,
        "outputs": outputs, "explicit_outputs": explicit_outputs, "cwd": _cwd(engine), "sys_path": list(sys.path),
        "engine": engine,
    }
    job = {
        "id": job_id, "session": session, "name": name, "inputs": list(values), "outputs": outputs,
        "spec": record.sign(store, spec, JOB_SPEC, session, job_id), "state": "queued", "attempt": 1,
        "created": record.now(), "host": record.host(), "pid": None, "runner": None, "log": str(log_path(job_id)),
        "started": None, "finished": None, "heartbeat": None, "error": None, "traceback": None, "collected_at": None,
        "blobs": pack.blob_keys(inputs), "engine": engine,
    }
    record.write(store, job)
    return job


def create_shell(store: Store, session: str, name: str | None, script: str, outputs: list[str],
                 sync_every: float, grace: float, engine: str) -> dict[str, Any]:
    """The signed description of a shell job and its record, queued; ValueError if it cannot be one."""
    if not script.strip():
        raise ValueError("the cell is empty: a shell job runs the cell as a bash script")
    for output in outputs:
        files.safe_relative(output)
    if not sync_every > 0 or not grace >= 0:
        raise ValueError("--sync-every must be more than 0 seconds and --grace at least 0")
    if shutil.which("bash") is None:
        raise ValueError("no bash on this machine's PATH")
    job_id = record.new_id()
    name = name or job_id
    spec = {"id": job_id, "session": session, "name": name, "kind": "shell", "script": script,
            "outputs": outputs, "sync_every": sync_every, "grace": grace, "cwd": _cwd(engine), "engine": engine}
    job = {
        "id": job_id, "session": session, "name": name, "kind": "shell", "engine": engine, "inputs": [],
        "outputs": outputs, "spec": record.sign(store, spec, JOB_SPEC, session, job_id), "state": "queued",
        "attempt": 1, "created": record.now(), "host": record.host(), "pid": None, "runner": None,
        "log": str(log_path(job_id)), "started": None, "finished": None, "heartbeat": None, "error": None,
        "traceback": None, "collected_at": None, "blobs": [],
    }
    record.write(store, job)
    return job

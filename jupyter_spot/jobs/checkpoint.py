"""Progress a job keeps in the store, so a re-run (on this machine or another) resumes.

Inside a job::

    from jupyter_spot.jobs import checkpoint

    done = checkpoint.load(set())          # what an earlier run saved, else the default
    checkpoint.save(done)                  # durable when it returns

    total = 0
    for i in checkpoint.range(1000, keep=("total",)):
        total += work(i)                   # a re-run starts after the last finished step,
                                           # with `total` as it was then

Outside a job (trying the cell out in the notebook) ``load`` returns the
default, ``save`` does nothing and ``range`` is ``range``.

Each ``checkpoint.range`` call site has its own position, and so has each
entry of a loop nested in another loop (counted per position of the enclosing
``checkpoint.range``, or per run of the job), so sequential and nested loops
resume where they were as long as the job's control flow is deterministic.
"""

from __future__ import annotations

import builtins
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..store import Store
from ..store.manifest import JOB_CHECKPOINT
from . import pack, record


@dataclass
class _Loop:
    key: str
    position: int = 0
    entries: dict[str, int] = field(default_factory=dict)  # call site → entries at this position


@dataclass
class _Context:
    store: Store
    session: str
    job_id: str
    state: dict[str, Any] | None = None  # {"value": … once saved, "ranges": {key: (next step, kept globals)}}
    loops: list[_Loop] = field(default_factory=list)  # checkpoint.range loops running, outermost first
    entries: dict[str, int] = field(default_factory=dict)  # top-level call site → entries in this run


_context: _Context | None = None


def attach(store: Store, session: str, job_id: str) -> None:
    """The runner's call: checkpoints of this process belong to ``job_id`` of ``session``."""
    global _context
    _context = _Context(store, session, job_id)


def _state(context: _Context) -> dict[str, Any]:
    if context.state is None:
        saved = context.store.get_record(record.checkpoint_name(context.job_id))
        if saved is None:
            context.state = {"ranges": {}}
        else:
            packed = record.verify(context.store, saved.get("state") if isinstance(saved, dict) else None,
                                   JOB_CHECKPOINT, context.session, context.job_id)
            namespace = sys.modules["__main__"].__dict__  # the job's: its classes resolve there
            context.state = pack.load(context.store, packed, namespace)["state"]
    return context.state


def _save(context: _Context, progress: str | None = None) -> None:
    state = _state(context)
    packed = pack.pack(context.store, {"state": state})
    context.store.put_record(record.checkpoint_name(context.job_id), {
        "id": context.job_id, "saved": record.now(), "progress": progress,
        "state": record.sign(context.store, packed, JOB_CHECKPOINT, context.session, context.job_id),
        "blobs": pack.blob_keys(packed),
    })


def load(default: Any = None) -> Any:
    """The value the last ``save`` of this job stored (by an earlier run too), else ``default``."""
    if _context is None:
        return default
    return _state(_context).get("value", default)


def save(value: Any) -> None:
    """Store ``value`` as this job's checkpoint; durable when it returns."""
    if _context is None:
        return
    _state(_context)["value"] = value
    _save(_context)


def range(*args: int, keep: Iterable[str] = (), every: float = 0.0) -> Iterator[int]:  # noqa: A001
    """``range(*args)`` that skips the steps an earlier run of the job finished.

    A step counts as finished when the loop asks for the next one; its position
    and the job globals named in ``keep`` are then saved (at most every
    ``every`` seconds, and always after the last step) and put back on resume.
    """
    steps = builtins.range(*args)
    if _context is None:
        return iter(steps)
    caller = sys._getframe(1)
    site = f"{caller.f_code.co_name}:{caller.f_lineno}"
    context = _context
    if context.loops:
        parent = context.loops[-1]
        prefix, entries = f"{parent.key}/{parent.position}/", parent.entries
    else:
        prefix, entries = "", context.entries
    entries[site] = entries.get(site, 0) + 1
    loop = _Loop(f"{prefix}{site}#{entries[site]}")
    return _resume(context, loop, steps, caller.f_globals, tuple(keep), every)


def _resume(context: _Context, loop: _Loop, steps: builtins.range, namespace: dict[str, Any],
            keep: tuple[str, ...], every: float) -> Iterator[int]:
    ranges = _state(context)["ranges"]
    start, kept = ranges.get(loop.key, (0, {}))
    namespace.update(kept)
    context.loops.append(loop)
    try:
        saved_at = time.monotonic()
        for index in builtins.range(start, len(steps)):
            loop.position, loop.entries = index, {}
            yield steps[index]
            last = index == len(steps) - 1
            if last or time.monotonic() - saved_at >= every:
                missing = [name for name in keep if name not in namespace]
                if missing:
                    raise NameError(f"checkpoint.range(keep=…): no global {', '.join(missing)} in the job")
                ranges[loop.key] = (index + 1, {name: namespace[name] for name in keep})
                _save(context, progress=f"{index + 1}/{len(steps)}")
                saved_at = time.monotonic()
    finally:
        context.loops.remove(loop)

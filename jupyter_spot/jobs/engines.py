"""Where a job's runner runs: ``local`` (a detached process on the notebook's machine) or
``ray`` (a detached actor on a Ray cluster, restarted on another node when its node dies).

Every engine runs the same runner (``python -m jupyter_spot.jobs.runner <store> <id>``)
against the same store, so what a job is, how it checkpoints and how a kernel
collects it do not depend on the engine; the engine only decides which machine
runs the runner and who starts it again when that machine is lost. A setup an
engine cannot run on is refused in one line before anything is written.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any, Protocol

from ..config import SpotJobs
from ..store import Store
from . import submit

ENGINES = ("local", "ray")
RAY_INSTALL = 'pip install "jupyter-spot[ray]"'


class Engine(Protocol):
    name: str

    def start(self, store_url: str, job: dict[str, Any], cwd: str | None) -> subprocess.Popen[bytes] | None:
        """Start the job's runner; the process if it is this kernel's child."""

    def cancel(self, job: dict[str, Any]) -> bool:
        """Stop a job this engine runs elsewhere; False if it is stopped as a local process instead."""

    def alive(self, job: dict[str, Any]) -> bool | None:
        """Whether the engine still runs (or will restart) the job; None if it cannot tell."""


class LocalEngine:
    """A detached process on this machine: outlives the kernel, dies with the machine."""

    name = "local"

    def start(self, store_url: str, job: dict[str, Any], cwd: str | None) -> subprocess.Popen[bytes]:
        return submit.launch(store_url, job["id"], cwd)

    def cancel(self, job: dict[str, Any]) -> bool:
        return False

    def alive(self, job: dict[str, Any]) -> bool | None:
        return None


def quiet_ray_import() -> None:
    """Imported in a kernel (by a job, or by a restore re-importing what the kernel had), Ray logs a line
    about ipywidgets for rich displays, which jobs do not use."""
    logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)


def settings(parent: Any = None) -> SpotJobs:
    return SpotJobs(parent=parent)


def get(name: str | None, store: Store, config: SpotJobs | None = None) -> Engine:
    """The engine called ``name`` (default: ``c.SpotJobs.engine``), ready to start a job on ``store``.

    ValueError, in one line, if it cannot: an unknown engine, a store the cluster
    cannot reach, Ray not installed, no cluster reachable.
    """
    config = config or SpotJobs()
    name = name or config.engine
    if name == "local":
        return LocalEngine()
    if name not in ENGINES:
        raise ValueError(f"--engine {name}: unknown engine; one of {', '.join(ENGINES)}")
    if store.kind != "s3" and not (store.kind == "local" and config.shared_store):
        raise ValueError(
            f"--engine {name} runs the job on other machines, which cannot reach this notebook's {store.kind} store "
            f"{store.url}: use an s3:// store (c.SpotSettings.store / $JUPYTER_SPOT_STORE), or set "
            "c.SpotJobs.shared_store = True if that directory is a mount every node shares")
    quiet_ray_import()
    try:
        from . import ray_engine
    except ImportError as error:
        raise ValueError(f"--engine ray needs Ray, which is not installed here ({error}): {RAY_INSTALL}") from None
    return ray_engine.RayEngine.connect(config.resolved_ray_address(), config.ray_num_cpus)

"""The Ray engine: each job's runner under a detached actor that Ray restarts on another node.

The actor (``jupyter-spot-<job id>`` in namespace ``jupyter_spot``) is
``lifetime="detached"``, so it outlives the kernel that submitted it, and has
unlimited restarts, so when its node dies Ray starts it again on a node with a
free CPU. The actor starts the ordinary runner as a child process and waits for
it; the runner dies with the actor (it watches its parent), and the restarted
actor's runner resumes from the job's checkpoint in the store. When the runner
has finished the job the actor ends itself for good.

Nothing secret travels through Ray: the runner opens the store by its URL, so
every node needs the store's credentials and the signing key, as any machine
that restores the session does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import ray

from ..store import open_store
from . import record, submit
from .runner import PARENT_ENV

NAMESPACE = "jupyter_spot"
_START_ONE = "start one (`ray start --head`) or set c.SpotJobs.ray_address / $JUPYTER_SPOT_RAY_ADDRESS"


def actor_name(job_id: str) -> str:
    return f"jupyter-spot-{job_id}"


def _unreachable(address: str, timeout: float = 3.0) -> str | None:
    """Why nothing answers at a ``host:port`` or ``ray://host:port`` address (None if it answers, or for 'auto')."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None  # 'auto', or a form ray.init judges itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        return f"{error.strerror or error}"
    return None


class JobActor:
    """Runs one job's runner on whichever node Ray placed (or re-placed) it."""

    def __init__(self, store_url: str, job_id: str) -> None:
        self.store_url, self.job_id = store_url, job_id
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        threading.Thread(target=self._run, args=(restarted,), name="jupyter-spot-runner", daemon=True).start()

    def _run(self, restarted: bool) -> None:
        store = open_store(self.store_url)
        node = ray.get_runtime_context().get_node_id()
        job = record.read(store, self.job_id)
        if job["state"] in record.ACTIVE:
            if restarted:  # its node died: say so, then run it again from the checkpoint
                job = record.update(store, self.job_id, state="queued", attempt=job.get("attempt", 1) + 1, pid=None,
                                    host=record.host(), runner=None, ray_node=node,
                                    error=f"restarted by Ray after losing node {job.get('ray_node')}")
            else:
                job = record.update(store, self.job_id, ray_node=node)
            process = submit.launch(self.store_url, self.job_id, None, extra_env={PARENT_ENV: str(os.getpid())})
            exit_code = process.wait()
            now = record.read(store, self.job_id)
            if now["state"] in record.ACTIVE and now.get("attempt") == job.get("attempt"):
                # the runner died without a word (killed, out of memory), and no later attempt took over
                record.update(store, self.job_id, state="failed", finished=record.now(),
                              error=f"the runner ended without finishing (exit code {exit_code}) on {record.host()}")
        # finished (or found finished after a restart: nothing to run again): this actor's work is over
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class RayEngine:
    """Starts, finds and stops job actors on one Ray cluster."""

    name = "ray"

    def __init__(self, num_cpus: float) -> None:
        self.num_cpus = num_cpus

    @classmethod
    def connect(cls, address: str, num_cpus: float = 1.0) -> RayEngine:
        """Join the cluster at ``address`` as a driver (once per kernel); ValueError in one line if none answers."""
        if not ray.is_initialized():
            unreachable = _unreachable(address)
            if unreachable:  # ray.init would retry an address nobody answers at for minutes
                raise ValueError(f"--engine ray: no Ray cluster reachable at {address!r} ({unreachable}); {_START_ONE}")
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                message = f"--engine ray: no Ray cluster reachable at {address!r} ({reason}); {_START_ONE}"
                raise ValueError(message) from None
        return cls(num_cpus)

    def start(self, store_url: str, job: dict[str, Any], cwd: str | None) -> None:
        remote = ray.remote(JobActor).options(
            name=actor_name(job["id"]), namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            num_cpus=self.num_cpus, get_if_exists=True)
        remote.remote(store_url, job["id"])
        return None

    def _actor(self, job_id: str) -> Any:
        try:
            return ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
        except ValueError:
            return None

    def alive(self, job: dict[str, Any]) -> bool | None:
        return self._actor(job["id"]) is not None

    def cancel(self, job: dict[str, Any]) -> bool:
        actor = self._actor(job["id"])
        if actor is not None:
            ray.kill(actor, no_restart=True)  # the runner watches the actor's process and ends with it
        return True


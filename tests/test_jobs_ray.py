"""--engine ray: jobs on a Ray cluster outlive a lost worker node and the notebook's kernel.

A real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with
no CPUs, so jobs go to workers, and worker nodes of 1 CPU each), on loopback
only, no dashboard, usage stats off, and moto's S3 server as the store. Nodes
are removed without grace (their raylet and workers SIGKILLed), as a spot
worker is taken. Marked ``ray``: ``pytest -m ray`` runs these alone,
``-m "not ray"`` leaves them out.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kernel, free_port, until
from harness.jobs import jobs_kernel
from harness.jobs import shell_cell as _cell
from harness.jobs import synced_state as _synced_state
from harness.jobs import uninterrupted_result as _uninterrupted_result

from jupyter_spot.jobs.shell import group_members  # live (not zombie) processes of a process group
from jupyter_spot.store import open_store

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SESSION = "ray.ipynb"
DEADLINE = 180.0  # a node's death is noticed by health checks, and a restarted actor needs a new worker process


Kernels = Callable[..., Kernel]


@pytest.fixture
def s3_store(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket (on the run's moto server) as the store: for this process, its kernels, the cluster's nodes."""
    for name, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray turns 127.0.0.1 in an address into this machine's own IP unless told it runs on one machine
        # (the variable's name says Windows/macOS; it is the switch for "loopback only" everywhere)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    return s3_url


NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}


@pytest.fixture
def cluster(s3_store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    head = {**NODE, "num_cpus": 0, "include_dashboard": False,
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                               "health_check_failure_threshold": 4}}
    ray_cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        monkeypatch.setenv("JUPYTER_SPOT_RAY_ADDRESS", ray_cluster.address)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def _records(store_url: str) -> list[dict[str, Any]]:
    store = open_store(store_url)
    return [store.get_record(name) for name in store.list_records()
            if name.startswith("job-") and not name.endswith(".checkpoint")]


def _job(store_url: str, name: str) -> dict[str, Any]:
    (job,) = [job for job in _records(store_url) if job["name"] == name]
    return job


def _kernel(kernels: Kernels, cwd: Path) -> Kernel:
    return jobs_kernel(kernels, cwd, SESSION)


def _lines(path: Path) -> list[int]:
    return [int(step) for step in path.read_text().split()] if path.exists() else []


def _node_of(cluster: Any, job: dict[str, Any]) -> Any:
    (node,) = [node for node in cluster.worker_nodes if node.node_id == job.get("ray_node")]
    return node


PY_JOB = (
    "%%spot_job --engine ray --name py\n"
    "import os, time\n"
    "from jupyter_spot.jobs import checkpoint\n"
    "total = 0\n"
    "for i in checkpoint.range(12, keep=('total',)):\n"
    "    with open(py_steps, 'a') as f:\n"
    "        f.write(f'{i}\\n')\n"
    "    while i == 4 and not os.path.exists(py_gate):\n"
    "        time.sleep(0.02)\n"
    "    total += i * x\n"
)


def test_jobs_resume_on_another_node_and_a_new_kernel_collects_them(cluster: Any, s3_store: str,
                                                                   tmp_path: Path, kernels: Kernels) -> None:
    py_steps, py_gate, sh_gate = tmp_path / "py-steps", tmp_path / "py-gate", tmp_path / "sh-gate"
    first, second = cluster.add_node(num_cpus=1, **NODE), cluster.add_node(num_cpus=1, **NODE)
    cluster.wait_for_nodes()
    kernel = _kernel(kernels, tmp_path / "machine-1")
    kernel.run(f"x = 21\npy_steps = {str(py_steps)!r}\npy_gate = {str(py_gate)!r}")
    started = kernel.execute(PY_JOB)
    assert started.error is None and "started on the ray cluster" in started.text, started
    started = kernel.execute(_cell("sh", 8, sh_gate, "--engine ray --sync-every 0.5"))
    assert started.error is None and "started on the ray cluster" in started.text, started
    sh = _job(s3_store, "sh")
    # each runs on a worker node, and each waits at its gate with its checkpoint in the store
    until(lambda: _lines(py_steps)[-1:] == [4], DEADLINE, "the py job at step 4")
    until(lambda: (_synced_state(s3_store, sh["id"], SESSION) or "").startswith("8 "),
          DEADLINE, "the sh job's sync after step 7")
    py_node, sh_node = _node_of(cluster, _job(s3_store, "py")), _node_of(cluster, _job(s3_store, "sh"))
    assert {py_node, sh_node} == {first, second}
    kernel.wait_until_durable()
    kernel.kill()  # the notebook's machine goes too: nothing depends on it any more
    shutil.rmtree(tmp_path / "machine-1")  # and its disk with it
    # the py job's node is taken without grace; a replacement joins (a spot pool replaces its nodes)
    py_runner = _job(s3_store, "py")["pid"]
    cluster.remove_node(py_node, allow_graceful=False)
    third = cluster.add_node(num_cpus=1, **NODE)
    # the runner ends with its actor's worker process, as it would with the machine; only then may the job go on
    until(lambda: not group_members(py_runner), DEADLINE, "the lost node's runner to end")
    py_gate.touch()
    until(lambda: _job(s3_store, "py")["state"] == "done", DEADLINE, "the py job to finish")
    assert _job(s3_store, "py")["attempt"] == 2 and _job(s3_store, "py")["ray_node"] == third.node_id
    # now the sh job's node: it resumes on the node the py job freed
    sh_runner = _job(s3_store, "sh")["pid"]
    cluster.remove_node(sh_node, allow_graceful=False)

    def survivors() -> str:  # which processes survived the node
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
        return (f"members {group_members(sh_runner)} of {sh_runner}; record {_job(s3_store, 'sh')}\n"
                + "\n".join(line for line in tree.splitlines() if "ray" in line or "steps" in line
                             or "bash" in line or "runner" in line))

    until(lambda: not group_members(sh_runner), DEADLINE, "the lost node's runner and program to end",
          describe=survivors)
    sh_gate.touch()
    until(lambda: _job(s3_store, "sh")["state"] == "done", DEADLINE, "the sh job to finish")
    assert _job(s3_store, "sh")["attempt"] == 2 and _job(s3_store, "sh")["ray_node"] == third.node_id
    # py: resumed after its last finished step (4 was in flight), none skipped
    assert _lines(py_steps) == [*range(5), *range(4, 12)]
    # a new notebook machine: a fresh kernel in another directory restores and collects both
    machine_2 = tmp_path / "machine-2"
    with _kernel(kernels, machine_2) as fresh:
        report = fresh.execute("%spot restore latest")
        assert report.error is None, report
        assert "job py done in" in report.text and ", total, i now in the namespace" in report.text, report
        assert "job sh done in" in report.text and str(machine_2 / "out" / "result.txt") in report.text, report
        assert fresh.execute("print(total)").text.strip() == str(21 * sum(range(12)))
    binary = Path(_job(s3_store, "sh")["log"]).with_suffix(".work") / "steps"
    assert (machine_2 / "out" / "result.txt").read_text() == _uninterrupted_result(binary, tmp_path)
    steps = _lines(Path(_job(s3_store, "sh")["log"]).with_suffix(".work") / "steps.txt")
    assert steps == [*range(9), *range(8, 20)]


def test_bad_setups_fail_in_one_line_and_start_nothing(s3_store: str, tmp_path: Path, kernels: Kernels,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nobody listens there
    with _kernel(kernels, tmp_path / "work") as kernel:
        unreachable = kernel.execute("%%spot_job --engine ray --shell\necho hi")
        assert "no Ray cluster reachable at '127.0.0.1:" in unreachable.stderr, unreachable
        assert kernel.execute("import ray\nprint(ray.is_initialized())").text.strip() == "False"  # it never joined one
    with _kernel(kernels, tmp_path / "work") as kernel:
        kernel.run("import sys\nsys.modules['ray'] = None")  # as if Ray were not installed
        missing = kernel.execute("%%spot_job --engine ray\ny = 1")
        assert 'pip install "jupyter-spot[ray]"' in missing.stderr, missing
    for refusal in (unreachable, missing):
        assert len(refusal.stderr.strip().splitlines()) == 1 and "Nothing was started" in refusal.stderr
    local_store = tmp_path / "local-store"
    monkeypatch.setenv("JUPYTER_SPOT_STORE", str(local_store))
    with _kernel(kernels, tmp_path / "work") as kernel:
        local = kernel.execute("%%spot_job --engine ray --shell\necho hi")
        assert "cannot reach this notebook's local store" in local.stderr and "s3://" in local.stderr, local
        assert len(local.stderr.strip().splitlines()) == 1
        assert "no jobs" in kernel.execute("%spot_job list").text
    assert _records(s3_store) == []  # nothing was submitted, so no runner or actor can have started

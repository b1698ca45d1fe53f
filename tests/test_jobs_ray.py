"""--engine ray: jobs on a Ray cluster outlive a lost worker node and the notebook's kernel.

A real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with
no CPUs, so jobs go to workers, and worker nodes of 1 CPU each), on loopback
only, no dashboard, usage stats off, and moto's S3 server as the store. Nodes
are removed without grace (their raylet and workers SIGKILLed), as a spot
worker is taken. Marked ``ray``: ``pytest -m ray`` runs these alone,
``-m "not ray"`` leaves them out.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from notebook_harness import Kernel
from s3_server import MotoServer, free_port
from test_jobs import _until
from test_jobs_shell import _cell, _synced_state, _uninterrupted_result

from jupyter_spot.jobs.shell import group_members  # live (not zombie) processes of a process group
from jupyter_spot.store import open_store

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SESSION = "ray.ipynb"
DEADLINE = 180.0  # a node's death is noticed by health checks, and a restarted actor needs a new worker process


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_store(moto: MotoServer, spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket as the store, for this process, its kernels and the cluster's nodes."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto.url, "AWS_CONFIG_FILE": str(spot_env.parent / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(spot_env.parent / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true", "RAY_USAGE_STATS_ENABLED": "0",
        # Ray turns 127.0.0.1 in an address into this machine's own IP unless told it runs on one machine
        # (the variable's name says Windows/macOS; it is the switch for "loopback only" everywhere)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("JUPYTER_SPOT_CACHE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bucket = f"spot-{secrets.token_hex(6)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/spot"
    monkeypatch.setenv("JUPYTER_SPOT_STORE", url)
    return url


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


def _kernel(cwd: Path) -> Kernel:
    kernel = Kernel(cwd, SESSION)
    result = kernel.run("%load_ext jupyter_spot")
    assert result.error is None, result
    return kernel


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
                                                                   tmp_path: Path) -> None:
    py_steps, py_gate, sh_gate = tmp_path / "py-steps", tmp_path / "py-gate", tmp_path / "sh-gate"
    first, second = cluster.add_node(num_cpus=1, **NODE), cluster.add_node(num_cpus=1, **NODE)
    cluster.wait_for_nodes()
    kernel = _kernel(tmp_path / "machine-1")
    kernel.run(f"x = 21\npy_steps = {str(py_steps)!r}\npy_gate = {str(py_gate)!r}")
    started = kernel.run(PY_JOB)
    assert started.error is None and "started on the ray cluster" in started.text, started
    started = kernel.run(_cell("sh", 8, sh_gate, "--engine ray --sync-every 0.5"))
    assert started.error is None and "started on the ray cluster" in started.text, started
    sh = _job(s3_store, "sh")
    # each runs on a worker node, and each waits at its gate with its checkpoint in the store
    _until("the py job at step 4", lambda: _lines(py_steps)[-1:] == [4], DEADLINE)
    _until("the sh job's sync after step 7",
           lambda: (_synced_state(s3_store, sh["id"], SESSION) or "").startswith("8 "), DEADLINE)
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
    _until("the lost node's runner to end", lambda: not group_members(py_runner), DEADLINE)
    py_gate.touch()
    _until("the py job to finish", lambda: _job(s3_store, "py")["state"] == "done", DEADLINE)
    assert _job(s3_store, "py")["attempt"] == 2 and _job(s3_store, "py")["ray_node"] == third.node_id
    # now the sh job's node: it resumes on the node the py job freed
    sh_runner = _job(s3_store, "sh")["pid"]
    cluster.remove_node(sh_node, allow_graceful=False)
    try:
        _until("the lost node's runner and program to end", lambda: not group_members(sh_runner), DEADLINE)
    except AssertionError:  # say which processes survived the node
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
        raise AssertionError(f"members {group_members(sh_runner)} of {sh_runner}; record {_job(s3_store, 'sh')}\n"
                             + "\n".join(line for line in tree.splitlines() if "ray" in line or "steps" in line
                                          or "bash" in line or "runner" in line)) from None
    sh_gate.touch()
    _until("the sh job to finish", lambda: _job(s3_store, "sh")["state"] == "done", DEADLINE)
    assert _job(s3_store, "sh")["attempt"] == 2 and _job(s3_store, "sh")["ray_node"] == third.node_id
    # py: resumed after its last finished step (4 was in flight), none skipped
    assert _lines(py_steps) == [*range(5), *range(4, 12)]
    # a new notebook machine: a fresh kernel in another directory restores and collects both
    machine_2 = tmp_path / "machine-2"
    with contextlib.closing(_kernel(machine_2)) as fresh:
        report = fresh.run("%spot restore latest")
        assert report.error is None, report
        assert "job py done in" in report.text and ", total, i now in the namespace" in report.text, report
        assert "job sh done in" in report.text and str(machine_2 / "out" / "result.txt") in report.text, report
        assert fresh.run("print(total)").text.strip() == str(21 * sum(range(12)))
    binary = Path(_job(s3_store, "sh")["log"]).with_suffix(".work") / "steps"
    assert (machine_2 / "out" / "result.txt").read_text() == _uninterrupted_result(binary, tmp_path)
    steps = _lines(Path(_job(s3_store, "sh")["log"]).with_suffix(".work") / "steps.txt")
    assert steps == [*range(9), *range(8, 20)]


def test_bad_setups_fail_in_one_line_and_start_nothing(s3_store: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nobody listens there
    with contextlib.closing(_kernel(tmp_path / "work")) as kernel:
        unreachable = kernel.run("%%spot_job --engine ray --shell\necho hi")
        assert "no Ray cluster reachable at '127.0.0.1:" in unreachable.stderr, unreachable
        assert kernel.run("import ray\nprint(ray.is_initialized())").text.strip() == "False"  # it never joined one
    with contextlib.closing(_kernel(tmp_path / "work")) as kernel:
        kernel.run("import sys\nsys.modules['ray'] = None")  # as if Ray were not installed
        missing = kernel.run("%%spot_job --engine ray\ny = 1")
        assert 'pip install "jupyter-spot[ray]"' in missing.stderr, missing
    for refusal in (unreachable, missing):
        assert len(refusal.stderr.strip().splitlines()) == 1 and "Nothing was started" in refusal.stderr
    local_store = tmp_path / "local-store"
    monkeypatch.setenv("JUPYTER_SPOT_STORE", str(local_store))
    with contextlib.closing(_kernel(tmp_path / "work")) as kernel:
        local = kernel.run("%%spot_job --engine ray --shell\necho hi")
        assert "cannot reach this notebook's local store" in local.stderr and "s3://" in local.stderr, local
        assert len(local.stderr.strip().splitlines()) == 1
        assert "no jobs" in kernel.run("%spot_job list").text
    assert _records(s3_store) == []  # nothing was submitted, so no runner or actor can have started

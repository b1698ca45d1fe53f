"""The harness's pytest fixtures and hooks (loaded by tests/conftest.py).

Every fixture that starts a process stops it at teardown, whether the test passed
or an assert failed half-way.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from jupyter_spot.notice.simulator import Simulator

from . import servers
from .browser import chromium, page  # noqa: F401 - fixtures
from .kernel import Kernel
from .s3 import MotoServer
from .servers import JupyterServer


@pytest.fixture
def kernels() -> Iterator[Callable[..., Kernel]]:
    """``kernels(cwd=None, session=None, load=False, extra_arguments=(), env=None)`` starts a kernel;
    every kernel it started is shut down (or was killed) when the test ends."""
    started: list[Kernel] = []

    def start(*args: Any, **kwargs: Any) -> Kernel:
        kernel = Kernel(*args, **kwargs)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.close()


@pytest.fixture
def jupyter_servers(tmp_path: Path) -> Iterator[Callable[..., JupyterServer]]:
    """``jupyter_servers(name, root, **options)`` configures a :class:`JupyterServer` homed in
    ``tmp_path/name`` (call ``.start()``); each is stopped, then killed with its kernels, at the end."""
    made: list[JupyterServer] = []

    def make(name: str, root: Path, **options: Any) -> JupyterServer:
        server = JupyterServer(tmp_path / name, root, **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
        server.kill()  # what a clean stop left behind


@pytest.fixture
def simulators() -> Iterator[Callable[..., Simulator]]:
    """``simulators("aws", **options)`` starts a cloud metadata simulator; all are stopped at the end."""
    started: list[Simulator] = []

    def start(cloud: str, **options: Any) -> Simulator:
        simulator = Simulator(cloud, **options).start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One moto S3 server for the whole run (each test gets its own bucket from ``s3_url``)."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_url(moto: MotoServer, spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; credentials and endpoint come from the environment, as boto3 reads them."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_CONFIG_FILE": str(spot_env.parent / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(spot_env.parent / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("JUPYTER_SPOT_CACHE", raising=False)
    bucket = f"spot-{secrets.token_hex(6)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team/spot"


@pytest.fixture(autouse=True)
def _server_logs() -> Iterator[None]:
    servers.SERVER_LOGS.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the tail of every server log it made (the files stay in tmp_path)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for log in servers.SERVER_LOGS:
            tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no log written)"
            report.sections.append((f"server log {log}", tail))

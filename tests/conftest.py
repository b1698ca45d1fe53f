"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# jp_fetch, jp_serverapp, jp_server_config, … for the server extension's tests; the harness's
# kernels, jupyter_servers, simulators, moto/s3_url, chromium/page fixtures.
pytest_plugins = ["pytest_jupyter.jupyter_server", "harness.plugin"]


@pytest.fixture
def spot_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store and a fixed signing key, seen by this process and the kernels it starts."""
    store = tmp_path / "store"
    monkeypatch.setenv("JUPYTER_SPOT_STORE", str(store))
    monkeypatch.setenv("JUPYTER_SPOT_SIGNING_KEY", "test-key-" + os.urandom(16).hex())
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.delenv("JUPYTER_SPOT_SESSION", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return store


@pytest.fixture(autouse=True)
def no_cloud_probe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that watches for notices itself detects its cloud, which may probe
    169.254.169.254 — not an address tests may send to. Tests that want a cloud point
    it at the simulator on 127.0.0.1 (the notice tests do that themselves)."""
    if not request.module.__name__.startswith("test_notice"):
        monkeypatch.setenv("JUPYTER_SPOT_CLOUD", "none")

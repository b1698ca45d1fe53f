"""Kernel-only clients (issue 11): `jupyter spot enable --kernel` loads the extension through IPython's config.

Kernels run by nbclient, as VS Code, papermill or `jupyter console` would start
them: no server, no ``--ext``, no ``%load_ext``. ``$IPYTHONDIR`` points the
command and the kernels at a temporary profile, so the machine is left as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_spot.store import open_store

pytestmark = pytest.mark.timeout(240)
SESSION = "kernel-only.ipynb"
LOADED = "print('loaded:', 'jupyter_spot' in get_ipython().extension_manager.loaded)"


@pytest.fixture
def ipython_dir(spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ipython"
    monkeypatch.setenv("IPYTHONDIR", str(directory))
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return directory


def spot(*args: str) -> str:
    """``jupyter spot …`` as a user types it; its output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-c", "from jupyter_spot.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_plain_kernel(*cells: str) -> list[str]:
    """Run ``cells`` in a fresh kernel started by nbclient; each cell's text output."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in cells])
    NotebookClient(notebook, kernel_name="python3", timeout=120).execute()
    return ["".join(out.get("text", "") for out in cell.outputs) for cell in notebook.cells]


def test_enable_kernel_snapshots_a_plain_kernel_and_the_next_one_is_told(ipython_dir: Path, spot_env: Path) -> None:
    config = ipython_dir / "profile_default" / "ipython_kernel_config.py"
    said = spot("enable", "--kernel", "--user")
    assert f"enabled: created {config}" in said, said
    assert spot("enable", "--kernel", "--user").startswith("already enabled"), "enabling twice must change nothing"
    assert config.read_text().count("jupyter_spot") == 1

    first = run_plain_kernel(LOADED, "x = 42")
    assert first[0].strip() == "loaded: True", first
    store = open_store(os.environ["JUPYTER_SPOT_STORE"])
    snapshots = store.list_snapshots(SESSION)
    assert snapshots, "a plain kernel with the extension enabled must snapshot after a cell"
    assert "x" in store.load_manifest(SESSION, snapshots[-1])["variables"]

    # A second kernel in that session (nobody restored or discarded the first's line) says so in its first cell.
    second = run_plain_kernel("y = 1", "%spot restore")
    assert "has state this kernel did not restore" in second[0] and snapshots[-1] in second[0], second
    assert "%spot restore" in second[0], second
    assert "x" in second[1], second


def test_disable_kernel_removes_only_its_own_lines(ipython_dir: Path) -> None:
    config = ipython_dir / "profile_default" / "ipython_kernel_config.py"
    config.parent.mkdir(parents=True)
    config.write_text("c.InteractiveShell.colors = 'NoColor'\n")
    assert "enabled: added to" in spot("enable", "--kernel", "--user")
    assert run_plain_kernel(LOADED)[0].strip() == "loaded: True"

    assert f"disabled: removed jupyter-spot's lines from {config}" in spot("disable", "--kernel", "--user")
    assert config.read_text() == "c.InteractiveShell.colors = 'NoColor'\n", "the user's own config must stay as it was"
    assert run_plain_kernel(LOADED)[0].strip() == "loaded: False"
    assert "not enabled" in spot("enable", "--kernel", "--disable", "--user")

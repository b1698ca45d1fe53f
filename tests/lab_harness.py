"""A real ``jupyter lab`` subprocess and Debian's Chromium, for the browser tests.

Each server gets its own root dir, port, token, settings and workspace dirs, and
runs in its own process group so a test can kill it *with its kernels* the way a
reclaimed machine dies (SIGKILL, no goodbye).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import psutil

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = Path(__file__).parent / "screenshots"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_notebook(path: Path, *sources: str) -> None:
    """A notebook on disk with these code cells and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def notebook_outputs(path: Path) -> str:
    """Every text output saved in a notebook on disk, joined."""
    nb = nbformat.read(path, as_version=4)
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or json.dumps(output.get("data", {})))
    return "\n".join(texts)


class Lab:
    """One ``jupyter lab`` on 127.0.0.1 serving ``root`` with jupyter-spot on ``store``."""

    def __init__(self, base: Path, root: Path, store: Path, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.root = root
        self.store = store
        self.extra_env = env or {}
        self.token = os.urandom(12).hex()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def lab_url(self, notebook: str) -> str:
        """Opens Lab on one notebook, in a fresh workspace (nothing restored from an earlier run)."""
        return f"{self.url}lab/tree/{notebook}?reset&token={self.token}"

    def start(self, timeout: float = 90.0, spot_settings: dict[str, Any] | None = None) -> Lab:
        """Start the server and return once both Jupyter's and jupyter-spot's APIs answer.

        ``spot_settings``: the user's settings of the jupyter-spot Lab plugin.
        """
        self.runs += 1
        self.port = free_port()
        config_dir = self.base / "jupyter-config"
        settings_dir = self.base / "lab-settings"
        # No autosave: the notice must be what saves the notebook.
        docmanager = settings_dir / "@jupyterlab" / "docmanager-extension"
        docmanager.mkdir(parents=True, exist_ok=True)
        (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
        apputils = settings_dir / "@jupyterlab" / "apputils-extension"
        apputils.mkdir(parents=True, exist_ok=True)
        (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
        spot = settings_dir / "jupyter-spot"
        spot.mkdir(parents=True, exist_ok=True)
        (spot / "plugin.jupyterlab-settings").write_text(json.dumps(spot_settings or {}))
        config_dir.mkdir(exist_ok=True)
        (config_dir / "jupyter_server_config.json").write_text(
            json.dumps(
                {
                    "ServerApp": {"jpserver_extensions": {"jupyter_spot": True}},
                    "SpotApp": {"notice_sources": ["aws"], "notice_poll_interval": 0.5, "gc_interval": 0},
                }
            )
        )
        env = {
            **os.environ,
            "JUPYTER_SPOT_STORE": str(self.store),
            "JUPYTER_CONFIG_DIR": str(config_dir),
            "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.base / "workspaces"),
            **self.extra_env,
        }
        env.pop("JUPYTER_SPOT_SESSION", None)
        env.pop("JPY_SESSION_NAME", None)
        self.log_path = self.base / f"lab-{self.runs}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--ServerApp.token={self.token}",
                f"--ServerApp.root_dir={self.root}",
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.api("api/status")
                self.api("jupyter-spot/api/status")
                return self
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"jupyter lab did not answer in {timeout} s:\n{self.log()}") from None
                time.sleep(0.25)

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """The machine is gone: SIGKILL the server and its kernels (own sessions), no shutdown hooks."""
        if self.proc is None:
            return
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """A clean shutdown (kernels included), falling back to kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)  # the second ^C skips the "shut down?" prompt
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

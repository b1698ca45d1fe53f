"""``jupyter server`` and ``jupyter lab`` subprocesses with jupyter-spot, on 127.0.0.1.

Each server gets its own home (config, runtime, Lab settings and workspaces), port,
token and log file, and runs in its own process group, so a test can kill it *with
its kernels* the way a reclaimed machine dies (SIGKILL, no goodbye). The logs of
the servers a test started are attached to its report when it fails (see
``harness.plugin``) and stay under its ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
from jupyter_client import AsyncKernelClient, BlockingKernelClient
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .ports import free_port
from .wait import until

#: Log files of the servers the running test started (the plugin resets it per test).
SERVER_LOGS: list[Path] = []


class HTTPError(AssertionError):
    """A request the test expected to succeed did not."""


class JupyterServer:
    """One server serving ``root`` with jupyter-spot on ``store`` (default: ``$JUPYTER_SPOT_STORE``).

    ``lab``: ``jupyter lab`` (for the browser tests), else a plain ``jupyter server``.
    ``sources``/``poll``: the notice sources and how often they poll. ``options``: more
    command-line options (``--SpotApp.heartbeat_interval=1``). ``spot_settings``: the
    user's settings of the jupyter-spot Lab plugin.
    """

    def __init__(
        self,
        home: Path,
        root: Path,
        *,
        lab: bool = False,
        store: Path | str | None = None,
        env: dict[str, str] | None = None,
        sources: Iterable[str] = ("aws",),
        poll: float = 0.2,
        options: Iterable[str] = (),
        spot_settings: dict[str, Any] | None = None,
    ) -> None:
        self.home, self.root, self.lab = home, root, lab
        self.store = store
        self.extra_env = env or {}
        self.sources, self.poll = list(sources), poll
        self.options = list(options)
        self.spot_settings = spot_settings or {}
        self.runtime = home / "runtime"
        self.token = os.urandom(12).hex()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = home / "server-0.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def lab_url(self, notebook: str) -> str:
        """Opens Lab on one notebook, in a fresh workspace (nothing restored from an earlier run)."""
        return f"{self.url}lab/tree/{notebook}?reset&token={self.token}"

    def _configure(self) -> dict[str, str]:
        config_dir = self.home / "jupyter-config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"jupyter_spot": True}}})
        )
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(config_dir),
            "JUPYTER_RUNTIME_DIR": str(self.runtime),
            **({"JUPYTER_SPOT_STORE": str(self.store)} if self.store is not None else {}),
            **self.extra_env,
        }
        env.pop("JUPYTER_SPOT_SESSION", None)
        env.pop("JPY_SESSION_NAME", None)
        if self.lab:
            settings = self.home / "lab-settings"
            for plugin, values in {
                # No autosave: the notice must be what saves the notebook.
                "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
                "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"},
                "jupyter-spot/plugin": self.spot_settings,
            }.items():
                folder, name = plugin.rsplit("/", 1)
                (settings / folder).mkdir(parents=True, exist_ok=True)
                (settings / folder / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
            env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
            env["JUPYTERLAB_WORKSPACES_DIR"] = str(self.home / "workspaces")
        return env

    def spawn(self) -> JupyterServer:
        """Start the process (a second call starts a fresh one: a restarted machine)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        self.port = free_port()
        env = self._configure()
        self.log_path = self.home / f"{'lab' if self.lab else 'server'}-{self.runs}.log"
        SERVER_LOGS.append(self.log_path)
        app = ["-m", "jupyterlab"] if self.lab else ["-m", "jupyter_server"]
        lab_only = ["--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *app,
                    "--no-browser",
                    "--allow-root",
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={self.port}",
                    "--ServerApp.port_retries=0",
                    f"--IdentityProvider.token={self.token}",
                    f"--ServerApp.root_dir={self.root}",
                    f"--SpotApp.notice_sources={','.join(self.sources)}",
                    f"--SpotApp.notice_poll_interval={self.poll}",
                    *(lab_only if self.lab else []),
                    *self.options,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 120) -> JupyterServer:
        """Until both Jupyter's and jupyter-spot's APIs answer; fails the test if the server dies or never does."""

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.api("api/status")
                self.api("jupyter-spot/api/status")
                return True
            except (urllib.error.URLError, ConnectionError, HTTPError):
                return False

        until(answers, timeout, f"the server on port {self.port} to answer", interval=0.25, describe=self.log)
        return self

    def start(self, timeout: float = 120) -> JupyterServer:
        return self.spawn().wait_ready(timeout)

    # -- talking to it ------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 120) -> Any:
        """A REST call (sync); its JSON answer. A status >= 300 fails the test."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            headers=self._headers(),
            data=None if body is None else json.dumps(body).encode(),
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise HTTPError(f"{method} {path}: {error.code} {error.read()[:2000]!r}") from None

    async def fetch(self, path: str, method: str = "GET", body: Any = None, *, ok: bool = True) -> Any:
        """A REST call on the test's event loop; its JSON answer, or ``(code, body)`` with ``ok=False``."""
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers=self._headers(),
            body=None if body is None else json.dumps(body),
            request_timeout=120,
            allow_nonstandard_methods=True,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if not ok:
            return response.code, response.body
        if response.code >= 300:
            raise HTTPError(f"{method} {path}: {response.code} {response.body[:2000]!r}")
        return json.loads(response.body) if response.body else None

    def _connection_file(self, kernel_id: str) -> str:
        return str(self.runtime / f"kernel-{kernel_id}.json")

    async def kernel_client(self, kernel_id: str) -> AsyncKernelClient:
        """A client on one of the server's kernels (its connection file in the server's runtime dir)."""
        client = AsyncKernelClient(connection_file=self._connection_file(kernel_id))
        client.load_connection_file()
        client.start_channels(hb=False)  # a heartbeat not yet beating on a busy machine reads as "dead"
        await client.wait_for_ready(timeout=90)
        return client

    def run_in_kernel(self, kernel_id: str, code: str) -> str:
        """Execute ``code`` in one of the server's kernels; its stdout. A cell error fails the test."""
        client = BlockingKernelClient(connection_file=self._connection_file(kernel_id))
        client.load_connection_file()
        client.start_channels(hb=False)
        try:
            client.wait_for_ready(timeout=90)
            chunks: list[str] = []

            def hook(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream":
                    chunks.append(msg["content"]["text"])

            reply = client.execute_interactive(code, timeout=120, output_hook=hook)
            assert reply["content"]["status"] == "ok", reply["content"]
            return "".join(chunks)
        finally:
            client.stop_channels()

    def kernel_pid(self, kernel_id: str) -> int:
        """The pid the kernel wrote for the server's notice hand-off."""
        return int((self.runtime / "jupyter_spot" / f"notice-{kernel_id}.json.ready").read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    # -- ending it ---------------------------------------------------------------------
    def kill(self) -> None:
        """The machine is gone: SIGKILL the server and its kernels, no shutdown hooks."""
        if self.proc is None:
            return
        try:
            parent = psutil.Process(self.proc.pid)
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> None:
        """A clean stop (SIGTERM: the server shuts its kernels down), falling back to kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

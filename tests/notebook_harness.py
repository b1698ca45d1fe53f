"""Real kernels for the interruption tests: run cells, snapshot, SIGKILL, restore.

Kernels are plain ipykernel processes started by jupyter_client with the test's
environment (store, signing key, session name), so they behave exactly as the
kernels a user's notebook server would start. ``kill`` is a real SIGKILL of the
kernel's whole process group — nothing in the kernel gets to clean up, as when a
spot VM is taken away.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

#: The kernel's answer to ``%spot status`` when no write is in flight.
PENDING_RE = re.compile(r"pending:\s*(\d+)")
#: The cell (execution count) whose state the restore report says it loaded.
RESTORED_COUNT_RE = re.compile(r"state after cell (\d+)")


@dataclass
class CellResult:
    """What a cell showed: stdout, results and errors (stderr kept for diagnostics only)."""

    text: str
    execution_count: int | None
    error: str | None = None
    stderr: str = ""


@dataclass
class Notebook:
    """A notebook's code cells plus the test annotations kept in its metadata.

    ``unstorable`` maps a variable that cannot be snapshotted to the (1-based) code
    cell that creates it; ``uses[i]`` lists such variables cell ``i`` reads.
    """

    name: str
    cells: list[str]
    unstorable: dict[str, int] = field(default_factory=dict)
    uses: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Notebook:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        meta = nb.metadata.get("jupyter_spot_test", {})
        uses = {
            i: list(c.metadata["jupyter_spot_test"]["uses"])
            for i, c in enumerate(code, start=1)
            if "jupyter_spot_test" in c.metadata
        }
        return cls(path.stem, [c.source for c in code], dict(meta.get("unstorable", {})), uses)

    def unstorable_at(self, cut: int) -> set[str]:
        """Variables that could not be stored in a snapshot taken after cell ``cut``."""
        return {name for name, cell in self.unstorable.items() if cell <= cut}


class Kernel:
    """One ipykernel process with a blocking client (use it with ``contextlib.closing``).

    The process is spawned at once but waited for only on first use, so a test
    can boot the next kernel while the current one works (kernel start-up is
    most of the cost of a kill/restore cycle).
    """

    def __init__(self, cwd: Path, session: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "JUPYTER_SPOT_SESSION": session}
        # Unix sockets, not TCP: no free-port race with the other kernels and servers
        # the suite (and anything else on the machine) starts at the same moment.
        self._sockets = tempfile.mkdtemp(prefix="spot-kernel-")
        self.km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(self._sockets, "k"))
        self.km.start_kernel(cwd=str(cwd), env=env)
        self._kc: BlockingKernelClient | None = None
        self._closed = False

    @property
    def kc(self) -> BlockingKernelClient:
        """The client, once the kernel answers."""
        if self._kc is None:
            kc = self.km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            self._kc = kc
        return self._kc

    def run(self, code: str, *, store_history: bool = True, timeout: float = 180) -> CellResult:
        """Execute ``code`` as a cell and collect what it displayed."""
        stdout: list[str] = []
        stderr: list[str] = []
        error: list[str] = []

        def on_output(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (stdout if content["name"] == "stdout" else stderr).append(content["text"])
            elif kind in ("execute_result", "display_data"):
                stdout.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                error.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(
            code, store_history=store_history, output_hook=on_output, timeout=timeout
        )
        text = "".join(stdout) + "".join(f"!{e}\n" for e in error)
        return CellResult(
            text, reply["content"].get("execution_count"), error[0] if error else None, "".join(stderr)
        )

    def spot(self, line: str, *, timeout: float = 180) -> str:
        """Run ``%spot <line>`` outside the history (execution counts stay as in the notebook)."""
        result = self.run(f"%spot {line}", store_history=False, timeout=timeout)
        assert result.error is None, f"%spot {line} failed: {result.error}\n{result.stderr}"
        return result.text + result.stderr

    def wait_until_durable(self, timeout: float = 120) -> str:
        """Poll ``%spot status`` until no snapshot write is pending; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.spot("status")
            match = PENDING_RE.search(status)
            assert match, f"%spot status does not say what is pending:\n{status}"
            if int(match.group(1)) == 0:
                return status
            assert time.monotonic() < deadline, f"snapshot writes still pending after {timeout}s:\n{status}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the kernel and everything it started; nothing gets to flush."""
        provisioner = self.km.provisioner
        assert provisioner is not None and provisioner.pgid
        os.killpg(provisioner.pgid, signal.SIGKILL)
        provisioner.process.wait(timeout=30)
        self.close()

    def close(self) -> None:
        """Shut the kernel down if it still runs, and let go of its ports and files."""
        if self._closed:
            return
        self._closed = True
        if self._kc is not None:
            self._kc.stop_channels()
        if self.km.has_kernel and self.km.is_alive():
            self.km.shutdown_kernel(now=True)
        else:
            self.km.cleanup_resources()
        shutil.rmtree(self._sockets, ignore_errors=True)



def restored_execution_count(report: str) -> int:
    """The execution count the restore report says it brought back."""
    match = RESTORED_COUNT_RE.search(report)
    assert match, f"the restore report does not say which execution count it restored:\n{report}"
    return int(match.group(1))

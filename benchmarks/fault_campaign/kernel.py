"""A real ipykernel driven over IPC, with cells that can be sent, watched and cut short by a SIGKILL.

tests/spot_kernel.py waits for each cell; a fault campaign also needs to send a
cell and kill the kernel while it runs, to see output that arrives while a cell
is still running (a notice flush), and to notice that the kernel died instead
of waiting for a reply that will never come.
"""

from __future__ import annotations

import os
import queue
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Cell:
    """One execute request: what it printed so far and how it ended."""

    msg_id: str
    code: str
    output: list[str] = field(default_factory=list)
    error: str | None = None
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.output)


class KernelDied(RuntimeError):
    pass


class CellTimeout(RuntimeError):
    pass


class TrialKernel:
    """A kernel process started with ``env``; ``%load_ext jupyter_spot`` is run by :meth:`load`."""

    def __init__(self, name: str, env: dict[str, str], arguments: list[str] | None = None) -> None:
        self.name = name
        self._sockets = tempfile.TemporaryDirectory(prefix="spot-campaign-")
        self.manager = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(self._sockets.name, "k"))
        self.manager.start_kernel(env=env, extra_arguments=arguments or [])
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.cells: dict[str, Cell] = {}
        #: Output of no request of ours: what an idle kernel prints (a notice handled between cells).
        self.stray = Cell("", "")
        self.dead = False

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid  # type: ignore[union-attr]

    def alive(self) -> bool:
        return not self.dead and self.manager.provisioner.process.poll() is None  # type: ignore[union-attr]

    def send(self, code: str, store_history: bool = True) -> Cell:
        msg_id = self.client.execute(code, store_history=store_history, allow_stdin=False)
        cell = self.cells[msg_id] = Cell(msg_id, code)
        return cell

    def _pump(self, timeout: float) -> None:
        """Route iopub and shell messages that arrive within ``timeout`` to their cells."""
        try:
            msg = self.client.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            msg = None
        while msg is not None:
            cell = self.cells.get(msg.get("parent_header", {}).get("msg_id", ""))
            kind, content = msg["msg_type"], msg["content"]
            if cell is None and kind == "stream":
                cell = self.stray
            if cell is not None:
                if kind == "stream":
                    cell.output.append(content["text"])
                elif kind in ("execute_result", "display_data"):
                    cell.output.append(content["data"].get("text/plain", "") + "\n")
                elif kind == "error":
                    cell.error = f"{content['ename']}: {content['evalue']}"
                    cell.output.append(cell.error + "\n")
                elif kind == "status" and content["execution_state"] == "idle":
                    cell.done = True
            try:
                msg = self.client.get_iopub_msg(timeout=0)
            except queue.Empty:
                msg = None
        while True:
            try:
                self.client.get_shell_msg(timeout=0)
            except queue.Empty:
                break

    def wait(self, cell: Cell, timeout: float, until: Any = None) -> Cell:
        """Until the cell is done (or, if given, until ``until(cell)`` holds); KernelDied / CellTimeout otherwise."""
        deadline = time.monotonic() + timeout
        while not (until(cell) if until is not None else cell.done):
            if not self.alive():
                self._pump(0.05)  # what it said before it died
                self.dead = True
                raise KernelDied(f"kernel {self.name} died during {cell.code[:60]!r}")
            if time.monotonic() > deadline:
                raise CellTimeout(f"kernel {self.name}: {cell.code[:60]!r} did not finish in {timeout:.0f}s")
            self._pump(0.02)
        return cell

    def run(self, code: str, timeout: float = 30, store_history: bool = True) -> Cell:
        return self.wait(self.send(code, store_history), timeout)

    def kill(self) -> None:
        """SIGKILL, as when the cloud takes the machine back."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.manager.provisioner.process.wait()  # type: ignore[union-attr]
        self.dead = True

    def wait_dead(self, timeout: float) -> bool:
        try:
            self.manager.provisioner.process.wait(timeout)  # type: ignore[union-attr]
        except Exception:
            return False
        self.dead = True
        return True

    def close(self) -> None:
        try:
            self.client.stop_channels()
            if self.alive():
                self.kill()
            self.manager.cleanup_resources()
        finally:
            self._sockets.cleanup()


class KernelPool:
    """Kernels started ahead of time, one after another in the background, while trials run.

    A kernel spends ~2 s starting (imports), most of a trial's time otherwise. A
    pooled kernel is started with the campaign's environment; :meth:`take` adds the
    trial's own variables (store, session, faults, …) to ``os.environ`` inside it
    before anything reads them — ``%load_ext jupyter_spot`` comes later — so it
    runs as if it had been started with them.
    """

    def __init__(self, env: dict[str, str], size: int = 3) -> None:
        self.env = env
        self.size = size
        self._ready: queue.Queue[TrialKernel | BaseException] = queue.Queue()
        self._wanted = threading.Semaphore(size)
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="kernel-pool", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        count = 0
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            count += 1
            try:
                self._ready.put(TrialKernel(f"pool-{count}", self.env))
            except BaseException as error:  # handed to the taker
                self._ready.put(error)

    def take(self, name: str, env: dict[str, str], config: list[str] | None = None) -> TrialKernel:
        """A started kernel, named ``name``, whose environment now is ``env``."""
        got = self._ready.get(timeout=180)
        self._wanted.release()
        if isinstance(got, BaseException):
            raise got
        got.name = name
        changed = {key: value for key, value in env.items() if self.env.get(key) != value}
        removed = [key for key in self.env if key not in env]
        got.run(f"__import__('os').environ.update({changed!r}); "
                f"[__import__('os').environ.pop(k, None) for k in {removed!r}]", store_history=False)
        for line in config or []:
            got.run(f"%config {line}", store_history=False)
        return got

    def close(self) -> None:
        self._closed = True
        self._wanted.release()
        self._thread.join(timeout=180)
        while not self._ready.empty():
            got = self._ready.get()
            if isinstance(got, TrialKernel):
                got.close()

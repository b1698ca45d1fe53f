"""A real ipykernel driven the way a notebook drives it, on IPC sockets.

Kernels are plain ipykernel processes started by jupyter_client with the test's
environment (store, signing key, session name), so they behave exactly as the
kernels a user's notebook server would start. ``kill`` is a real SIGKILL of the
kernel's whole process group: nothing in the kernel gets to clean up, as when a
spot VM is taken away. Use the ``kernels`` fixture (or ``with Kernel(...)``) so a
kernel is shut down even when an assert fails early.
"""

from __future__ import annotations

import ast
import os
import queue
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .wait import until

#: The line ``%spot snapshot`` prints when the snapshot worked (``snapshot failed: …`` otherwise).
SNAPSHOT_LINE = re.compile(
    r"^snapshot (?P<id>\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{4}): (?P<stored>\d+) stored, (?P<unchanged>\d+) unchanged, "
    r"(?P<skipped>\d+) skipped; [\d.]+ [KMG]?B written in [\d.]+s"
    r"(?P<pending> \([\d.]+ [KMG]?B still being written\))?"
    r"(?:; (?P<not_replicated>\d+) snapshot\(s\) not yet in S3)?$"
)
#: ``%spot status``: how many snapshot writes are in flight.
PENDING_RE = re.compile(r"pending:\s*(\d+)")
#: The cell (execution count) whose state a restore report says it loaded.
RESTORED_COUNT_RE = re.compile(r"state after cell (\d+)")


def snapshot_line(text: str) -> re.Match[str]:
    """The success line of ``%spot snapshot`` in ``text``; fails the test on ``snapshot failed`` or anything else."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    match = SNAPSHOT_LINE.match(line)
    assert match, f"%spot snapshot did not report a snapshot:\n{text}"
    return match


def restored_execution_count(report: str) -> int:
    """The execution count the restore report says it brought back."""
    match = RESTORED_COUNT_RE.search(report)
    assert match, f"the restore report does not say which execution count it restored:\n{report}"
    return int(match.group(1))


class CellError(AssertionError):
    """A cell raised; the message carries the kernel's traceback."""


@dataclass
class CellResult:
    """What a cell showed: stdout and results, errors (``!Name: value`` lines), stderr apart."""

    text: str
    execution_count: int | None
    error: str | None = None
    stderr: str = ""
    traceback: str = ""


class Kernel:
    """One ipykernel process with a blocking client.

    ``session`` sets ``$JUPYTER_SPOT_SESSION`` for this kernel only; ``load`` runs
    ``%load_ext jupyter_spot`` as its first cell (execution count 1). Without
    ``load`` the process is spawned at once but waited for only on first use, so a
    test can boot the next kernel while the current one works.
    """

    def __init__(
        self,
        cwd: Path | None = None,
        session: str | None = None,
        *,
        load: bool = False,
        extra_arguments: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        kernel_env = {**os.environ, **(env or {})}
        if session is not None:
            kernel_env["JUPYTER_SPOT_SESSION"] = session
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        # Unix sockets, not TCP: no free-port race with the other kernels and servers
        # the suite (and anything else on the machine) starts at the same moment.
        self._sockets = tempfile.mkdtemp(prefix="spot-kernel-")
        self.km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(self._sockets, "k"))
        self._kc: BlockingKernelClient | None = None
        self._closed = False
        self.last_execution_count: int | None = None
        self.km.start_kernel(cwd=str(cwd) if cwd else None, env=kernel_env, extra_arguments=list(extra_arguments))
        if load:
            self.run("%load_ext jupyter_spot")

    @property
    def kc(self) -> BlockingKernelClient:
        """The client, once the kernel answers."""
        if self._kc is None:
            kc = self.km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=90)
            self._kc = kc
        return self._kc

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def execute(self, code: str, *, store_history: bool = True, timeout: float = 180) -> CellResult:
        """Execute ``code`` as a cell and collect what it displayed (an error does not raise)."""
        stdout: list[str] = []
        stderr: list[str] = []
        errors: list[str] = []
        tracebacks: list[str] = []

        def on_output(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (stdout if content["name"] == "stdout" else stderr).append(content["text"])
            elif kind in ("execute_result", "display_data"):
                stdout.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")
                tracebacks.append("\n".join(content["traceback"]))

        reply = self.kc.execute_interactive(code, store_history=store_history, output_hook=on_output, timeout=timeout)
        count = reply["content"].get("execution_count")
        self.last_execution_count = count
        text = "".join(stdout) + "".join(f"!{e}\n" for e in errors)
        return CellResult(text, count, errors[0] if errors else None, "".join(stderr), "\n".join(tracebacks))

    def run(self, code: str, *, allow_error: bool = False, store_history: bool = True, timeout: float = 180) -> str:
        """Execute one cell; everything it printed (stdout, stderr, errors) as text. A cell error fails the test."""
        result = self.execute(code, store_history=store_history, timeout=timeout)
        if result.error and not allow_error:
            raise CellError(f"cell failed:\n{code}\n---\n{result.error}\n{result.traceback}")
        return result.text + result.stderr

    def spot(self, line: str, *, timeout: float = 180) -> str:
        """Run ``%spot <line>`` outside the history (execution counts stay as in the notebook)."""
        result = self.execute(f"%spot {line}", store_history=False, timeout=timeout)
        assert result.error is None, f"%spot {line} failed: {result.error}\n{result.stderr}"
        return result.text + result.stderr

    def value(self, expression: str) -> Any:
        """A Python literal computed in the kernel (``repr`` round-trip, outside the history)."""
        return ast.literal_eval(self.repr_of(expression))

    def repr_of(self, expression: str) -> str:
        """``repr(expression)`` in the kernel's namespace, outside the history."""
        msg_id = self.kc.execute("", silent=True, store_history=False, user_expressions={"v": expression})
        reply = self._shell_reply(msg_id, 60)
        result = reply["content"]["user_expressions"]["v"]
        assert result["status"] == "ok", f"{expression}: {result}"
        return str(result["data"]["text/plain"])

    def start(self, code: str, *, store_history: bool = True) -> str:
        """Send a cell without waiting for it (it may run for long); its message id."""
        return str(self.kc.execute(code, store_history=store_history))

    def output_of(
        self, msg_id: str, *, until_idle: bool = True, until_printed: str | None = None, timeout: float = 60
    ) -> str:
        """What cell ``msg_id`` printed: until it finished, or until it printed ``until_printed``
        (either failing the test after ``timeout``); with ``until_idle=False`` and nothing to wait
        for, whatever a still-running cell printed within ``timeout``."""
        text: list[str] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text.append(msg["content"]["text"])
                if until_printed is not None and until_printed in "".join(text):
                    return "".join(text)
            elif msg["msg_type"] == "error":
                text.append("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" and until_idle:
                self._shell_reply(msg_id, 30)
                return "".join(text)
        waited = "to print " + repr(until_printed) if until_printed is not None else "to finish" if until_idle else ""
        assert not waited, f"the cell did not {waited[3:] if waited.startswith('to ') else waited} in {timeout} s; it printed:\n{''.join(text)}"
        return "".join(text)

    def _shell_reply(self, msg_id: str, timeout: float) -> dict[str, Any]:
        """The shell reply to ``msg_id``, skipping replies to earlier requests."""
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            assert remaining > 0, f"no reply from the kernel in {timeout} s"
            try:
                reply = self.kc.get_shell_msg(timeout=remaining)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def pending_writes(self) -> int:
        status = self.spot("status")
        match = PENDING_RE.search(status)
        assert match, f"%spot status does not say what is pending:\n{status}"
        return int(match.group(1))

    def wait_until_durable(self, timeout: float = 120) -> None:
        """Until no snapshot write is pending; fails the test after ``timeout``."""
        until(lambda: self.pending_writes() == 0, timeout, "the kernel's snapshot writes to be durable")

    def kill(self) -> None:
        """SIGKILL the kernel and everything it started; nothing gets to flush."""
        provisioner = self.km.provisioner
        assert provisioner is not None and provisioner.pgid
        try:
            os.killpg(provisioner.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        provisioner.process.wait(timeout=30)  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        """Shut the kernel down if it still runs, and let go of its sockets and files."""
        if self._closed:
            return
        self._closed = True
        if self._kc is not None:
            self._kc.stop_channels()
        try:
            if self.km.has_kernel and self.km.is_alive():
                self.km.shutdown_kernel(now=True)
            else:
                self.km.cleanup_resources()
        finally:
            shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

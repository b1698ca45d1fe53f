"""A real ipykernel process driven the way a notebook drives it (helper for the kernel tests)."""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

from jupyter_client.manager import KernelManager


class CellError(AssertionError):
    """A cell raised; the message carries the kernel's traceback."""


class SpotKernel:
    """A fresh kernel that inherits this process's environment (store, key, session)."""

    def __init__(self, load: bool = True, extra_arguments: list[str] | None = None) -> None:
        # IPC sockets: no TCP port races with the other kernels the suite runs at once.
        self._sockets = tempfile.TemporaryDirectory(prefix="spot-kernel-")
        self.manager = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(self._sockets.name, "k"))
        self.manager.start_kernel(extra_arguments=extra_arguments or [])
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        if load:
            self.run("%load_ext jupyter_spot")

    def run(self, code: str, allow_error: bool = False, timeout: float = 120) -> str:
        """Execute one cell; its stdout, stderr and results as text."""
        out: list[str] = []
        errors: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                errors.append(f"{content['ename']}: {content['evalue']}\n" + "\n".join(content["traceback"]))

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=timeout)
        self.last_execution_count: int = reply["content"]["execution_count"]
        if errors and not allow_error:
            raise CellError(f"cell failed:\n{code}\n---\n{errors[0]}")
        return "".join(out) + "".join(errors)

    def value(self, expression: str) -> Any:
        """A Python literal computed in the kernel (repr round-trip)."""
        import ast

        return ast.literal_eval(self.run(f"print(repr({expression}))").strip())

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid  # type: ignore[union-attr]

    def kill(self) -> None:
        """SIGKILL, like the cloud taking the VM back."""
        os.kill(self.pid, signal.SIGKILL)
        self.manager.provisioner.process.wait()  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)
        self._sockets.cleanup()

    def __enter__(self) -> SpotKernel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

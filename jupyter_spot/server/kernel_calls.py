"""Python the server evaluates inside a kernel (restore, rename), as silent requests.

Silent ``user_expressions`` requests add nothing to the user's namespace or
history and trigger no post-cell snapshot.
"""

from __future__ import annotations

import ast
from typing import Any


class KernelRestoreError(Exception):
    """The kernel could not load the snapshot; the message is the kernel's error."""


def restore_expression(snapshot: str, session: str) -> str:
    """Python evaluated inside the kernel: restore and return the report as JSON.

    Sent as a silent ``user_expressions`` request, so it adds nothing to the
    user's namespace or history and triggers no post-cell snapshot.
    """
    return (
        "__import__('json').dumps(__import__('jupyter_spot').restore("
        f"{snapshot!r}, session={session!r}).to_dict(), default=str)"
    )


def rename_expression(session: str) -> str:
    """Python evaluated inside the kernel: snapshot under ``session`` from now on."""
    return f"__import__('jupyter_spot.kernel.extension', fromlist=['_']).rename_session({session!r})"


async def evaluate(client: Any, expression: str, timeout: float | None) -> Any:
    """Evaluate one expression through a started async kernel client; its value as a Python literal."""
    reply = await client.execute_interactive(
        "",
        silent=True,
        store_history=False,
        user_expressions={"value": expression},
        timeout=timeout,
        output_hook=lambda msg: None,
    )
    content = reply["content"]
    result = content.get("user_expressions", {}).get("value", {})
    if content.get("status") != "ok" or result.get("status") != "ok":
        detail = result if result.get("status") == "error" else content
        raise KernelRestoreError(f"{detail.get('ename', 'Error')}: {detail.get('evalue', 'no details')}")
    return ast.literal_eval(result["data"]["text/plain"])


async def evaluate_in_kernel(kernel: Any, expression: str, timeout: float) -> Any:
    """:func:`evaluate` in a kernel of the server's kernel manager, over a client of its own."""
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        return await evaluate(client, expression, timeout)
    finally:
        client.stop_channels()

"""The one way tests wait: poll a condition until it holds, and fail the test if it never does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: Seconds between polls: frequent enough not to slow a test, rare enough not to load the machine.
INTERVAL = 0.05


def _fail(what: str, timeout: float, last: Any, describe: Callable[[], Any] | None) -> None:
    detail = f"\nlast seen: {last!r}" if last not in (None, False) else ""
    if describe is not None:
        detail += f"\n{describe()}"
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}{detail}", pytrace=False)


def until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = INTERVAL,
    describe: Callable[[], Any] | None = None,
) -> T:
    """``condition()``'s first truthy value; the test FAILS (naming ``what``) if none comes in ``timeout`` s.

    ``describe`` adds context to the failure (a server's log, the store's listing).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            _fail(what, timeout, value, describe)
        time.sleep(interval)


async def until_async(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    *,
    interval: float = INTERVAL,
    describe: Callable[[], Any] | None = None,
) -> T:
    """:func:`until` for tests on an event loop: ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            _fail(what, timeout, value, describe)
        await asyncio.sleep(interval)

"""Running a list of store calls a few at a time, on plain threads.

Plain threads, not a concurrent.futures pool: those refuse work once the
interpreter begins to exit, and the kernel's exit flush (and a restore) still
run then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

Task = TypeVar("Task")


def run_in_threads(
    do: Callable[[Task], None],
    tasks: Iterable[Task],
    workers: int,
    name: str,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """``do(task)`` for each task, ``workers`` at a time (this thread is one); raise the first failure.

    After a failure, or once ``stop()`` is true, no task is started.
    """
    tasks = list(tasks)
    pending = iter(tasks)
    lock = threading.Lock()
    failures: list[Exception] = []

    def work() -> None:
        while True:
            with lock:
                task = None if failures or stop() else next(pending, None)
            if task is None:
                return
            try:
                do(task)
            except Exception as error:
                failures.append(error)
                return

    helpers = [threading.Thread(target=work, name=name, daemon=True) for _ in range(min(workers, len(tasks)) - 1)]
    for helper in helpers:
        helper.start()
    try:
        work()
    finally:
        for helper in helpers:
            helper.join()
    if failures:
        raise failures[0]

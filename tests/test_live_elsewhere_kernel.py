"""A kernel opened on a notebook whose kernel runs live under another server sharing the store.

Real `jupyter server` subprocesses on 127.0.0.1, real ipykernel kernels, one
directory store. The server already treats such a line as owned (its fresh
heartbeat in the session record); the kernel must too: its first-cell hint must
not call the live state interrupted, and ``%spot restore`` must not take over
the live line — an explicit snapshot id copies it as a line of its own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest
from harness import JupyterServer, Kernel, until
from harness.servers import HTTPError

from jupyter_spot.store import open_store
from jupyter_spot.store.holders import session_record_name
from jupyter_spot.store.lines import LineIndex, load_decisions

pytestmark = pytest.mark.timeout(240)
Servers = Callable[..., JupyterServer]
OPENING = {"path": "shared.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
INTERRUPTED_HINT = "has state this kernel did not restore"


def notebook_root(tmp_path: Path, notebook: str) -> Path:
    """A server root holding one empty notebook."""
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), root / notebook)
    return root


@pytest.mark.servers
def test_a_kernel_on_another_server_is_live_not_interrupted_until_that_server_is_gone(
    jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    root = notebook_root(tmp_path, "shared.ipynb")
    store = open_store(str(spot_env))
    a = jupyter_servers("a", root, sources=["signal"], options=["--SpotApp.heartbeat_interval=1"]).spawn()
    b = jupyter_servers("b", root, sources=["signal"]).spawn()
    a.wait_ready()
    b.wait_ready()
    on_a = a.api("api/sessions", "POST", OPENING)["kernel"]["id"]
    a.run_in_kernel(on_a, "x = 41")
    until(lambda: store.list_snapshots("shared.ipynb"), 60, "A's snapshot after its cell")
    (a_line,) = LineIndex(store).lines("shared.ipynb").values()
    newest = a_line.newest_id

    def holders() -> list[str]:
        record = store.get_record(session_record_name("shared.ipynb")) or {}
        return [holder.get("kernel_id") for holder in (record.get("holders") or {}).values()]

    until(lambda: on_a in holders(), 60, "A's heartbeat in the session record")
    on_b = b.api("api/sessions", "POST", OPENING)["kernel"]["id"]
    until(lambda: on_b in holders() and on_a in holders(), 60, "B's entry beside A's in the session record")

    first = b.run_in_kernel(on_b, "print('hello')")  # binds nothing: no snapshot, B has no line yet
    assert INTERRUPTED_HINT not in first, first
    assert f"live in kernel {on_a}" in first and a.url.rstrip("/") in first, first
    assert f"%spot restore {newest}" in first and "copy its newest state here" in first, first

    # `latest` would continue A's line here while A keeps writing it: refused, with the way to copy.
    refused = b.run_in_kernel(on_b, "%spot restore")
    assert f"live in kernel {on_a}" in refused and f"%spot restore {newest}" in refused, refused
    assert b.run_in_kernel(on_b, "print('x' in globals())").strip() == "False"
    assert a_line.id not in load_decisions(store, "shared.ipynb")
    # So does the server's Restore into B's kernel: 409, with the kernel's words.
    with pytest.raises(HTTPError, match=f"409.*live in kernel {on_a}"):
        b.api("jupyter-spot/api/sessions/shared.ipynb/restore", "POST", {"snapshot": "latest", "kernel_id": on_b})
    assert a_line.id not in load_decisions(store, "shared.ipynb")

    listed = b.run_in_kernel(on_b, "%spot list")
    assert f"live in kernel {on_a}" in listed and "interrupted line" not in listed, listed

    # An explicit id copies A's state: A's line is not marked restored, B writes a line of its own.
    copied = b.run_in_kernel(on_b, f"%spot restore {newest}")
    assert "copied" in copied and a_line.id in copied, copied
    assert b.run_in_kernel(on_b, "print(x)").strip() == "41"
    assert a_line.id not in load_decisions(store, "shared.ipynb")
    before = set(store.list_snapshots("shared.ipynb"))
    b.run_in_kernel(on_b, "x = 42")
    until(lambda: set(store.list_snapshots("shared.ipynb")) - before, 60, "B's snapshot after its next cell")
    (after,) = set(store.list_snapshots("shared.ipynb")) - before
    assert store.load_manifest("shared.ipynb", after)["line"] != a_line.id
    assert a.run_in_kernel(on_a, "print(x)").strip() == "41"  # A's kernel kept its state and its line
    a_newest = LineIndex(store).lines("shared.ipynb")[a_line.id].newest_id

    a.kill()  # the machine is gone: its heartbeat is young, but its server process is not there
    b.api(f"api/sessions/{b.api('api/sessions')[0]['id']}", "DELETE")  # B's user closes the notebook
    reopened = b.api("api/sessions", "POST", OPENING)["kernel"]["id"]
    hint = b.run_in_kernel(reopened, "z = 1")
    assert INTERRUPTED_HINT in hint and a_newest in hint and "is live in" not in hint, hint


def test_another_kernel_of_the_session_under_the_same_server_is_live_and_this_kernel_is_not(spot_env: Path) -> None:
    """Two kernels on one notebook: the other one's holder entry means live, whichever server it is
    under; an entry naming this kernel itself is not "elsewhere". The entries are what a server
    writes (server/kernels.py), for a server that is this test's process."""
    store = open_store(str(spot_env))
    kernel_id = "__import__('jupyter_spot.kernel.identity', fromlist=['kernel_id']).kernel_id()"

    def hold(*kernels: str) -> None:
        beat = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        holders = {
            f"server-{n}": {"kernel_id": kernel, "host": socket.gethostname(), "server": "http://127.0.0.1:8888/",
                            "server_pid": os.getpid(), "heartbeat": beat, "heartbeat_interval": 600.0}
            for n, kernel in enumerate(kernels)
        }
        store.put_record(session_record_name("two.ipynb"),
                         {"session": "two.ipynb", "state": "live", "holders": holders})

    with Kernel(session="two.ipynb", load=True) as first:
        first.run("x = 41")
        first.wait_until_durable()
        first_id = first.value(kernel_id)
        newest = store.list_snapshots("two.ipynb")[-1]
        with Kernel(session="two.ipynb") as second:
            hold(first_id, second.value(kernel_id))
            said = second.run("%load_ext jupyter_spot")
            assert f"live in kernel {first_id}" in said and f"%spot restore {newest}" in said, said
            assert INTERRUPTED_HINT not in said, said
        with Kernel(session="two.ipynb") as third:
            hold(third.value(kernel_id))  # only itself: the first kernel's line has no live holder
            said = third.run("%load_ext jupyter_spot")
            assert INTERRUPTED_HINT in said and newest in said and "is live in" not in said, said


@pytest.mark.servers
def test_two_kernels_of_one_notebook_under_one_server_each_keep_their_holder_entry(
    jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    """JupyterLab names a session after its notebook at a placeholder path, so one server can run two
    kernels of one notebook. Each keeps its own entry in the session record: with one entry per
    server, whichever kernel beat last hid the other, and its line looked interrupted to the kernel
    beside it — `%spot restore` would have taken over a line another kernel is still writing."""
    root = notebook_root(tmp_path, "two.ipynb")
    store = open_store(str(spot_env))
    server = jupyter_servers("a", root, sources=["signal"], options=["--SpotApp.heartbeat_interval=1"]).spawn()
    server.wait_ready()

    def open_kernel(placeholder: str) -> str:
        opening = {"path": placeholder, "name": "two.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        return server.api("api/sessions", "POST", opening)["kernel"]["id"]

    def holders() -> list[str]:
        record = store.get_record(session_record_name("two.ipynb")) or {}
        return [holder.get("kernel_id") for holder in (record.get("holders") or {}).values()]

    first = open_kernel("work/first")
    server.run_in_kernel(first, "x = 41")
    until(lambda: store.list_snapshots("two.ipynb"), 60, "the first kernel's snapshot after its cell")
    (line,) = LineIndex(store).lines("two.ipynb").values()
    second = open_kernel("work/second")
    until(lambda: {first, second} <= set(holders()), 60, "both kernels' entries in the session record")
    server.run_in_kernel(second, "y = 1")  # the second kernel's heartbeats go on beside the first's
    until(lambda: len(store.list_snapshots("two.ipynb")) >= 2, 60, "the second kernel's snapshot")
    listed = server.run_in_kernel(second, "%spot list")
    assert f"live in kernel {first}" in listed and "interrupted line" not in listed, listed
    refused = server.run_in_kernel(second, "%spot restore")
    assert f"live in kernel {first}" in refused, refused
    assert line.id not in load_decisions(store, "two.ipynb")
    assert {first, second} <= set(holders())

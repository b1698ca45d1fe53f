"""End to end: a notebook on server A, a simulated AWS notice, A SIGKILLed, restore on server B.

Everything is real: `jupyter server` subprocesses on 127.0.0.1, the AWS
metadata simulator, ipykernel kernels, the events websocket, one store.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import time
import urllib.parse
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import JupyterServer, until, until_async
from jupyter_client import AsyncKernelClient
from tornado.websocket import websocket_connect

from jupyter_spot.notice.simulator import Simulator
from jupyter_spot.server import catalog
from jupyter_spot.store import holders, open_store

pytestmark = [pytest.mark.timeout(240), pytest.mark.servers]
NOTEBOOK = "work/analysis.ipynb"


async def run_cell(client: AsyncKernelClient, code: str) -> str:
    """Execute ``code`` and return its stdout; fail on an error."""
    chunks: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])

    reply = await client.execute_interactive(code, timeout=90, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(chunks)


async def start_endless_cell(client: AsyncKernelClient, code: str) -> None:
    """Start ``code``, a cell that never ends, and return once it runs (it prints ``looping`` first)."""
    msg_id = client.execute("print('looping', flush=True)\n" + code)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            message = await client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "stream":
            if "looping" in message["content"]["text"]:
                return
    pytest.fail("the endless cell did not start within 90 s")


Servers = Callable[..., JupyterServer]


def aws_env(simulator: Simulator) -> dict[str, str]:
    return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": simulator.url, "JUPYTER_SPOT_CLOUD": "aws"}


async def test_notice_flush_kill_and_restore_on_a_fresh_server(
    simulators: Callable[..., Simulator], jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    simulator = simulators("aws")
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), root / NOTEBOOK)
    store = open_store(str(spot_env))

    a = jupyter_servers("a", root, env=aws_env(simulator))
    try:
        await asyncio.to_thread(a.start)
        events = await websocket_connect(f"ws://127.0.0.1:{a.port}/api/events/subscribe?token={a.token}")
        session = await a.fetch(
            "api/sessions",
            "POST",
            {"path": NOTEBOOK, "name": "analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        )
        kernel_id = session["kernel"]["id"]
        client = await a.kernel_client(kernel_id)
        # The kernel was started with the extension, the notebook path as its session, and the server watching.
        settings = await run_cell(
            client,
            "import os, jupyter_spot\nenv = os.environ\n"
            "print(env['JUPYTER_SPOT_SESSION'], env['JUPYTER_SPOT_SERVER_WATCHES'], jupyter_spot.status()['session'])",
        )
        assert settings.split() == [NOTEBOOK, "1", NOTEBOOK]
        await run_cell(client, "import numpy as np\nx = 41\narr = np.arange(10) ** 2")
        await until_async(lambda: store.list_snapshots(NOTEBOOK), 60, "an auto snapshot after the cell")
        clean = store.list_snapshots(NOTEBOOK)[-1]

        # A busy kernel: the notice must flush it mid-cell.
        await start_endless_cell(client, "counter = 0\nimport time\nwhile True:\n    counter += 1\n    time.sleep(0.001)")
        simulator.fire("terminate", lead_time=60)

        seen: dict[str, list[dict[str, Any]]] = {"notice": [], "flush": []}
        deadline = time.monotonic() + 60
        while not any(e["status"] in ("done", "failed") for e in seen["flush"]):
            assert time.monotonic() < deadline, seen
            message = await asyncio.wait_for(events.read_message(), timeout=60)
            event = json.loads(message)
            for name in seen:
                if event.get("schema_id") == f"https://events.jupyter.org/jupyter_spot/{name}/v1":
                    seen[name].append(event)
        (notice,) = seen["notice"]
        assert (notice["kind"], notice["action"], notice["source"]) == ("interruption", "terminate", "aws")
        assert 0 < notice["seconds_left"] <= 60
        assert [e["status"] for e in seen["flush"]] == ["started", "done"], seen["flush"]
        done = seen["flush"][-1]
        assert (done["kernel_id"], done["session"]) == (kernel_id, NOTEBOOK)
        flushed = store.load_manifest(NOTEBOOK, done["snapshot_id"])  # durable, signed, in the store
        assert flushed["kind"] == "mid-cell" and flushed["during_cell"] is not None
        assert done["snapshot_id"] > clean

        status = await a.fetch("jupyter-spot/api/status")
        assert status["watcher"] == {"running": True, "provider": "aws", "sources": ["aws"]}
        assert status["last_notice"]["action"] == "terminate"
        await until_async(lambda: [r for r in store.list_records() if r.startswith("notice-")], 30, "the notice record")
        (record_name,) = [r for r in store.list_records() if r.startswith("notice-")]
        record = store.get_record(record_name)
        (entry,) = record["kernels"]
        assert entry["session"] == NOTEBOOK and entry["snapshot_id"] == done["snapshot_id"]
        assert entry["kernel_spec"]["name"] == "python3" and entry["cwd"] == str(root / "work")
        assert record["jobs"] == []
        # New work is refused on a machine being reclaimed.
        code, body = await a.fetch("api/kernels", "POST", {}, ok=False)
        assert code == 503 and b"reclaimed" in body
        client.stop_channels()
        events.close()
    finally:
        a.kill()  # the machine is gone: its kernels with it

    replacement = simulators("aws")  # the new machine's metadata service: no notice standing
    b = jupyter_servers("b", root, env=aws_env(replacement))
    try:
        await asyncio.to_thread(b.start)
        listed = (await b.fetch(f"jupyter-spot/api/sessions?path={urllib.parse.quote(NOTEBOOK)}"))["sessions"]
        (found,) = listed
        assert found["id"] == NOTEBOOK and found["interrupted"] is True and found["live_kernel"] is None
        assert "aws interruption notice (terminate)" in found["reason"]
        assert found["latest"]["id"] == done["snapshot_id"] and found["latest"]["kind"] == "mid-cell"

        restored = await b.fetch(
            f"jupyter-spot/api/sessions/{urllib.parse.quote(NOTEBOOK, safe='')}/restore", "POST", {"snapshot": "latest"}
        )
        report = restored["report"]
        assert {"x", "arr", "counter"} <= set(report["restored"])
        assert report["snapshot"]["id"] == done["snapshot_id"]
        client = await b.kernel_client(restored["kernel_id"])
        out = await run_cell(client, "print(x + 1, int(arr.sum()), counter > 0, np.__name__)")
        assert out.split() == ["42", "285", "True", "numpy"]
        client.stop_channels()
        after = (await b.fetch("jupyter-spot/api/sessions"))["sessions"]
        assert [(s["id"], s["interrupted"], s["live_kernel"]) for s in after] == [
            (NOTEBOOK, False, restored["kernel_id"])
        ]
    finally:
        b.stop()


async def test_sigterm_flushes_every_kernel_before_the_server_stops(
    jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    """Kubernetes eviction / systemd stop: SIGTERM is a notice; the server's own shutdown comes after the flush."""
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), root / "job.ipynb")
    store = open_store(str(spot_env))
    server = jupyter_servers("server", root, sources=["signal"])
    try:
        await asyncio.to_thread(server.start)
        session = await server.fetch(
            "api/sessions", "POST", {"path": "job.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        )
        client = await server.kernel_client(session["kernel"]["id"])
        await run_cell(client, "step = 0")
        await until_async(lambda: store.list_snapshots("job.ipynb"), 60, "an auto snapshot")
        await start_endless_cell(client, "import time\nwhile True:\n    step += 1\n    time.sleep(0.001)")
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.proc.wait, 90)
        client.stop_channels()
    finally:
        server.kill()
    (record_name,) = [r for r in store.list_records() if r.startswith("notice-")]
    record = store.get_record(record_name)
    assert record["notice"]["source"] == "signal"
    (entry,) = record["kernels"]
    assert (entry["session"], entry["status"]) == ("job.ipynb", "done")
    flushed = store.load_manifest("job.ipynb", entry["snapshot_id"])
    assert flushed["kind"] == "mid-cell" and flushed["during_cell"] is not None
    # The server shut the kernel down while stopping: that is not the user closing the notebook.
    (described,) = catalog.describe_sessions(store, live=[])
    assert described["interrupted"] is True and described["cause"] == "server-stopped", described
    assert described["reason"] == "the server was stopped (SIGTERM)"


async def test_servers_sharing_a_store_do_not_offer_each_others_live_sessions(
    jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    """Two servers on one store (one EFS): B lists A's running notebook as live elsewhere, until A is killed."""
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), root / "shared.ipynb")
    store = open_store(str(spot_env))
    record_name = holders.session_record_name("shared.ipynb")
    a = jupyter_servers("a", root, sources=["signal"], options=["--SpotApp.heartbeat_interval=0.5"]).spawn()
    b = jupyter_servers("b", root, sources=["signal"]).spawn()
    try:
        await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
        session = await a.fetch(
            "api/sessions", "POST", {"path": "shared.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        )
        client = await a.kernel_client(session["kernel"]["id"])
        await run_cell(client, "x = 1")
        client.stop_channels()
        await until_async(lambda: store.list_snapshots("shared.ipynb"), 60, "an auto snapshot")

        def beats() -> list[str]:
            return [h["heartbeat"] for h in store.get_record(record_name)["holders"].values()]

        first_beats = beats()
        await until_async(lambda: beats() != first_beats, 30, "server A to refresh its heartbeat")

        (listed,) = (await b.fetch("jupyter-spot/api/sessions?path=shared.ipynb"))["sessions"]
        assert listed["interrupted"] is False and listed["reason"] is None
        assert listed["live_elsewhere"]["host"] == socket.gethostname()
        assert listed["live_elsewhere"]["kernel_id"] == session["kernel"]["id"]
        (from_cli,) = catalog.describe_sessions(store, live=[])
        assert from_cli["interrupted"] is False and from_cli["live_elsewhere"] is not None

        # B opens the same notebook: its own kernel's record entry does not hide A's.
        opened = await b.fetch(
            "api/sessions", "POST", {"path": "shared.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        )
        (listed,) = (await b.fetch("jupyter-spot/api/sessions?path=shared.ipynb"))["sessions"]
        assert (listed["interrupted"], listed["live_kernel"]) == (False, opened["kernel"]["id"])
        assert listed["live_elsewhere"]["kernel_id"] == session["kernel"]["id"]
    finally:
        a.kill()  # no clean shutdown, no notice, a heartbeat that is still fresh
    try:
        (listed,) = (await b.fetch("jupyter-spot/api/sessions?path=shared.ipynb"))["sessions"]
        assert listed["interrupted"] is True and listed["live_elsewhere"] is None
        assert opened["kernel"]["id"] not in listed["reason"], listed["reason"]  # B's kernel did not stop
    finally:
        b.stop()


def test_auto_restore_skips_a_session_another_server_runs_and_restores_it_once_that_server_is_gone(
    jupyter_servers: Servers, spot_env: Path, tmp_path: Path
) -> None:
    """B restores interrupted notebooks as they open (``auto_restore``), but not one whose kernel A
    still runs (A's fresh heartbeat holds it): that would fork the notebook. Once A is gone, B's
    next open restores it. B decides, and logs a restore it starts, before the open answers, so
    every wait here is for an answer (bounded; a timeout fails the test)."""
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), root / "shared.ipynb")
    store = open_store(str(spot_env))
    opening = {"path": "shared.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    listing = "jupyter-spot/api/sessions?path=shared.ipynb"
    restoring = "restoring interrupted session 'shared.ipynb'"
    a = jupyter_servers("a", root, sources=["signal"], options=["--SpotApp.heartbeat_interval=1"]).spawn()
    b = jupyter_servers("b", root, sources=["signal"], options=["--SpotApp.auto_restore=True"]).spawn()
    a.wait_ready()
    b.wait_ready()
    on_a = a.api("api/sessions", "POST", opening)["kernel"]["id"]
    a.run_in_kernel(on_a, "x = 41")
    until(lambda: store.list_snapshots("shared.ipynb"), 60, "A's snapshot after its cell")

    on_b = b.api("api/sessions", "POST", opening)["kernel"]["id"]
    assert restoring not in b.log_path.read_text(), b.log()
    (listed,) = b.api(listing)["sessions"]
    assert (listed["interrupted"], listed["live_elsewhere"]["kernel_id"]) == (False, on_a), listed
    # (the kernel's first-cell announcement comes first: it says the session is live on A)
    assert b.run_in_kernel(on_b, "print('x' in globals())").splitlines()[-1] == "False"

    a.kill()  # the machine is gone: its heartbeat is young, but its server process is not there
    b.api(f"api/sessions/{b.api('api/sessions')[0]['id']}", "DELETE")  # B's user closes the notebook
    reopened = b.api("api/sessions", "POST", opening)["kernel"]["id"]
    assert restoring in b.log_path.read_text(), b.log()
    until(lambda: not b.api(listing)["sessions"][0]["interrupted"], 60, "B's auto-restore to finish")
    assert b.run_in_kernel(reopened, "print(x)").strip() == "41"


def test_a_heartbeat_from_another_host_counts_until_it_is_stale(spot_env: Path) -> None:
    """Another machine's server cannot be asked directly: its heartbeat's age decides, and a notice overrides it."""
    now = catalog.utcnow()
    holder = {"kernel_id": "k1", "host": "other-machine.internal", "server": "http://10.0.0.7:8888/",
              "server_pid": 1, "heartbeat_interval": 30.0}

    def beat(seconds_ago: float, **changes: Any) -> dict[str, Any]:
        entry = {**holder, "heartbeat": catalog.isoformat(now - timedelta(seconds=seconds_ago)), **changes}
        return {"session": "nb.ipynb", "state": "live", "holders": {"their-server": entry}}

    assert holders.holders_elsewhere(beat(5), "my-server", [], now)[0]["host"] == "other-machine.internal"
    assert holders.holders_elsewhere(beat(69), "my-server", [], now) != []
    assert holders.holders_elsewhere(beat(71), "my-server", [], now) == []  # two intervals + 10 s slack
    assert holders.holders_elsewhere(beat(5), "their-server", [], now) == []  # our own kernel: not "elsewhere"
    same_host_dead = beat(5, host=socket.gethostname(), server_pid=2**22 + 7)
    assert holders.holders_elsewhere(same_host_dead, "my-server", [], now) == []  # its server process is gone
    told_to_go = [{"notice": {"source": "aws", "action": "terminate"}, "at": catalog.isoformat(now),
                   "kernels": [{"session": "nb.ipynb", "kernel_id": "k1", "status": "done"}]}]
    assert holders.holders_elsewhere(beat(5), "my-server", told_to_go, now) == []

"""Kernels lost without the user asking (issue 11): OOM kill, crash, idle culling, a stopped server — on a real
jupyter_server.

A SIGKILLed kernel is restarted by jupyter_server under the same id; the sessions
API must offer the lost process's state back, with the cause from its exit
status. A restart the user asked for is a clean end. A culled kernel is offered
back with the reason "culled". A server stopped by SIGTERM (JupyterHub's idle
culler stops the whole single-user server that way) offers its sessions back on
the next server, saying so.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import JupyterServer, until, until_async, write_notebook

from jupyter_spot.server.losses import server_stop_cause
from jupyter_spot.store import open_store
from jupyter_spot.store.lines import load_decisions

pytestmark = pytest.mark.timeout(240)
NOTEBOOK = "death.ipynb"
#: What a JupyterHub spawner puts in a single-user server's environment (the parts jupyter-spot reads).
HUB_ENV = {
    "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    "JUPYTERHUB_SERVICE_PREFIX": "/user/ada/",
    "JUPYTERHUB_USER": "ada",
}


@pytest.fixture
def km_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})


@pytest.fixture
def jp_server_config(spot_env: Path, km_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_spot": True}},
        "SpotApp": {"notice_sources": []},
        "MappingKernelManager": km_config,
    }


@pytest.fixture
def notebook(jp_root_dir: Path) -> str:
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / NOTEBOOK)
    return NOTEBOOK


async def execute(km: Any, kernel_id: str, code: str) -> str:
    """Run ``code`` in one of the server's kernels; its stdout."""
    client = km.get_kernel(kernel_id).client()
    client.start_channels()
    chunks: list[str] = []
    try:
        await client.wait_for_ready(timeout=90)
        reply = await client.execute_interactive(
            code, timeout=90, output_hook=lambda m: chunks.append(m["content"].get("text", ""))
        )
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(chunks)


async def open_notebook(jp_fetch: Any) -> str:
    body = {"path": NOTEBOOK, "name": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    return json.loads(response.body)["kernel"]["id"]


async def session(jp_fetch: Any) -> dict[str, Any] | None:
    response = await jp_fetch("jupyter-spot", "api", "sessions", params={"path": NOTEBOOK})
    sessions = json.loads(response.body)["sessions"]
    return sessions[0] if sessions else None


async def snapshotted(store: Any, names: set[str]) -> None:
    """Wait until the session's newest snapshot holds ``names``."""

    async def check() -> bool:
        ids = store.list_snapshots(NOTEBOOK)
        return bool(ids) and names <= set(store.load_manifest(NOTEBOOK, ids[-1])["variables"])

    await until_async(check, 90, f"a snapshot holding {names}", interval=0.2)


def restore_path() -> tuple[str, ...]:
    return ("jupyter-spot", "api", "sessions", urllib.parse.quote(NOTEBOOK, safe=""), "restore")


async def test_an_oom_killed_kernel_is_offered_back_with_the_cause_and_its_largest_variables(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    km = jp_serverapp.kernel_manager
    kernel_id = await open_notebook(jp_fetch)
    await execute(km, kernel_id, "x = 42\nbig = bytes(3_000_000)\nsmall = 'a'")
    await snapshotted(store, {"x", "big", "small"})
    pid = km.get_kernel(kernel_id).provisioner.pid
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does

    async def interrupted() -> dict[str, Any] | None:
        described = await session(jp_fetch)
        return described if described and described["interrupted"] else None

    described = await until_async(interrupted, 90, "the session to be offered back after the kill", interval=0.2)
    assert described["reason"] == "the kernel was killed (signal 9) — most likely out of memory", described
    assert described["cause"] == "oom"
    assert [v["name"] for v in described["largest_variables"]][0] == "big", described["largest_variables"]
    # jupyter_server restarted it under the same id: the restore goes into that kernel.
    await until_async(
        lambda: kernel_id in km and km.get_kernel(kernel_id).provisioner.pid != pid, 90, "the automatic restart",
        interval=0.2,
    )
    # The restarted kernel's first cell says what it did not restore; running it does not end the offer.
    hint = await execute(km, kernel_id, "z = 1")
    assert "has state this kernel did not restore" in hint and described["latest"]["id"] in hint, hint
    assert (await session(jp_fetch))["interrupted"] is True
    response = await jp_fetch(*restore_path(), method="POST", body=json.dumps({"snapshot": "latest"}))
    restored = json.loads(response.body)
    assert restored["kernel_id"] == kernel_id and "x" in restored["report"]["restored"], restored
    assert (await execute(km, kernel_id, "print(x)")).strip() == "42"
    assert (await session(jp_fetch))["interrupted"] is False


async def test_a_crashed_kernel_is_offered_back_as_a_crash(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    km = jp_serverapp.kernel_manager
    kernel_id = await open_notebook(jp_fetch)
    await execute(km, kernel_id, "x = 42")
    await snapshotted(store, {"x"})
    os.kill(km.get_kernel(kernel_id).provisioner.pid, signal.SIGSEGV)  # a segfault in native code

    async def interrupted() -> dict[str, Any] | None:
        described = await session(jp_fetch)
        return described if described and described["interrupted"] else None

    described = await until_async(interrupted, 90, "the session to be offered back after the crash", interval=0.2)
    assert (described["reason"], described["cause"]) == ("the kernel crashed (signal 11)", "crash"), described
    assert described["largest_variables"] == []  # named only after an OOM


async def test_a_restart_the_user_asked_for_is_a_clean_end(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    km = jp_serverapp.kernel_manager
    kernel_id = await open_notebook(jp_fetch)
    await execute(km, kernel_id, "x = 42")
    await snapshotted(store, {"x"})
    line = store.load_manifest(NOTEBOOK, store.list_snapshots(NOTEBOOK)[-1])["line"]
    await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="")

    async def closed() -> bool:
        decision = load_decisions(store, NOTEBOOK).get(line)
        return decision is not None and decision.decision == "closed"

    await until_async(closed, 90, "the restarted kernel's old line to be closed", interval=0.2)
    described = await session(jp_fetch)
    assert described is not None and described["interrupted"] is False, described
    snapshots = await jp_fetch("jupyter-spot", "api", "sessions", urllib.parse.quote(NOTEBOOK, safe=""), "snapshots")
    assert json.loads(snapshots.body)["snapshots"], "a clean end keeps the snapshots listed"


@pytest.mark.parametrize("km_config", [{"cull_idle_timeout": 8, "cull_interval": 1}], indirect=True)
async def test_a_culled_kernel_is_offered_back_with_the_reason_culled(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    km = jp_serverapp.kernel_manager
    kernel_id = await open_notebook(jp_fetch)
    await execute(km, kernel_id, "x = 42")
    await snapshotted(store, {"x"})
    await until_async(lambda: kernel_id not in km, 120, "the idle culler", interval=0.2)
    km._culler_callback.stop()  # the kernel the restore starts must not be culled in turn

    described = await until_async(lambda: session(jp_fetch), 90, "the culled session", interval=0.2)
    assert described["interrupted"] is True, described
    assert described["reason"].startswith("culled after ") and described["reason"].endswith(" idle"), described
    assert described["cause"] == "culled" and described["largest_variables"] == []
    response = await jp_fetch(*restore_path(), method="POST", body=json.dumps({"snapshot": "latest"}))
    restored = json.loads(response.body)
    assert restored["kernel_id"] != kernel_id and "x" in restored["report"]["restored"], restored
    assert (await execute(km, restored["kernel_id"], "print(x)")).strip() == "42"


@pytest.mark.servers
@pytest.mark.parametrize("hub", [True, False], ids=["jupyterhub", "plain"])
def test_a_server_stopped_by_sigterm_offers_its_sessions_back_with_the_reason(
    jupyter_servers: Callable[..., JupyterServer], tmp_path: Path, spot_env: Path, hub: bool
) -> None:
    """JupyterHub's idle culler asks the hub to stop the server: SIGTERM to the single-user server process."""
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, "x = 42")
    env = HUB_ENV if hub else {}
    first = jupyter_servers("first", root, env=env, sources=["signal"]).start()
    body = {"path": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}}
    kernel_id = first.api("api/sessions", "POST", body)["kernel"]["id"]
    first.run_in_kernel(kernel_id, "x = 42")
    store = open_store(str(spot_env))
    until(lambda: store.list_snapshots(NOTEBOOK), 90, "the cell's snapshot", interval=0.2, describe=first.log)
    first.stop()  # SIGTERM, and wait for the process to end
    assert first.proc is not None and first.proc.returncode == 0, first.log()

    second = jupyter_servers("second", root, env=env, sources=["signal"]).start()
    (described,) = second.api(f"jupyter-spot/api/sessions?path={urllib.parse.quote(NOTEBOOK)}")["sessions"]
    assert described["interrupted"] is True and described["cause"] == "server-stopped", described
    expected = "the server was stopped by JupyterHub" if hub else "the server was stopped (SIGTERM)"
    assert described["reason"] == expected, described  # idle a few seconds: too short to be the hub's culler
    restored = second.api(
        f"jupyter-spot/api/sessions/{urllib.parse.quote(NOTEBOOK, safe='')}/restore", "POST", {"snapshot": "latest"}
    )
    assert "x" in restored["report"]["restored"], restored


def test_an_idle_hub_server_stop_is_named_the_idle_culler() -> None:
    """The hub stops a server idle this long for its idle culler; an active one was stopped by someone."""
    culled = server_stop_cause(hub=True, idle_seconds=45 * 60, signalled=True)
    assert culled["text"] == "the server was stopped by JupyterHub (idle culler) after 45 min idle", culled
    assert (culled["kind"], culled["idle_seconds"]) == ("server-stopped", 2700)
    assert server_stop_cause(hub=False, idle_seconds=45 * 60, signalled=False)["text"] == "the server was stopped"


async def test_the_extensions_polling_does_not_keep_a_server_active_for_the_hubs_idle_culler(
    jp_fetch: Any, jp_serverapp: Any, notebook: str
) -> None:
    """Lab's status item polls every few seconds, even in a background tab: that must not count as activity."""

    async def last_activity() -> str:
        return json.loads((await jp_fetch("api", "status")).body)["last_activity"]

    await jp_fetch("api", "contents", NOTEBOOK)  # the user opening the notebook: activity
    before = await last_activity()
    for path in (("status",), ("sessions",)):
        await jp_fetch("jupyter-spot", "api", *path, params={"path": NOTEBOOK})
    assert await last_activity() == before

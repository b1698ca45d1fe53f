"""The server's kernels: launch settings, clean shutdowns, restore and auto-restore — real kernels."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import FaultPause, snapshot_line, until_async
from jupyter_client.manager import AsyncKernelManager
from tornado.httpclient import HTTPClientError

from jupyter_spot.store import open_store
from jupyter_spot.store.holders import session_record_name

pytestmark = pytest.mark.timeout(180)
NOTEBOOK = "work/model.ipynb"


@pytest.fixture
def spot_config() -> dict[str, Any]:
    return {"notice_sources": []}


@pytest.fixture
def jp_server_config(spot_env: Path, spot_config: dict[str, Any]) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_spot": True}}, "SpotApp": spot_config}


@pytest.fixture
def notebook(jp_root_dir: Path) -> str:
    (jp_root_dir / "work").mkdir()
    nbformat.write(nbformat.v4.new_notebook(), jp_root_dir / NOTEBOOK)
    return NOTEBOOK


async def execute(km: Any, kernel_id: str, code: str) -> str:
    """Run ``code`` in one of the server's kernels; its stdout."""
    client = km.get_kernel(kernel_id).client()
    client.start_channels()
    chunks: list[str] = []
    try:
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive(
            code, timeout=60, output_hook=lambda m: chunks.append(m["content"].get("text", ""))
        )
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(chunks)


async def open_notebook(jp_fetch: Any, path: str) -> str:
    body = {"path": path, "name": Path(path).name, "type": "notebook", "kernel": {"name": "python3"}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    return json.loads(response.body)["kernel"]["id"]


async def wait_for_snapshots(store: Any, session: str, count: int = 1) -> list[str]:
    return await until_async(
        lambda: len(ids := store.list_snapshots(session)) >= count and ids, 60, f"{count} snapshot(s) of {session}"
    )


async def snapshot_outside_the_server(session: str, code: str) -> None:
    """A kernel on "the old machine": the extension loaded by hand, stopped without a clean goodbye.

    (The harness's blocking Kernel cannot run beside this test's event loop: same process, IPC too.)"""
    with tempfile.TemporaryDirectory(prefix="spot-kernel-") as sockets:
        km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "k"))
        await km.start_kernel(env={**os.environ, "JUPYTER_SPOT_SESSION": session}, extra_arguments=["--ext=jupyter_spot"])
        client = km.client()
        client.start_channels()
        printed: list[str] = []
        try:
            await client.wait_for_ready(timeout=90)
            for cell in (code, "%spot snapshot"):
                printed.clear()
                reply = await client.execute_interactive(
                    cell, timeout=120, output_hook=lambda m: printed.append(m["content"].get("text", ""))
                )
                assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
            await km.shutdown_kernel(now=True)
    snapshot_line("".join(printed))


def api_path(session: str, *rest: str) -> str:
    return "/".join(["jupyter-spot/api/sessions", urllib.parse.quote(session, safe=""), *rest])


@pytest.fixture
def spot_fetch(jp_serverapp: Any, http_server_client: Any, jp_auth_header: dict[str, str], jp_base_url: str) -> Any:
    """Like jp_fetch, but the path goes out as written: a session id keeps its %2F."""

    def fetch(path: str, method: str = "GET", body: str | None = None) -> Any:
        return http_server_client.fetch(
            f"{jp_base_url}{path}", method=method, body=body, headers=jp_auth_header, request_timeout=120
        )

    return fetch


async def test_kernels_get_the_extension_and_a_clean_shutdown_is_not_an_interruption(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    kernel_id = await open_notebook(jp_fetch, notebook)
    km = jp_serverapp.kernel_manager
    out = await execute(
        km,
        kernel_id,
        "import os\nprint(os.environ['JUPYTER_SPOT_SESSION'], os.environ['JUPYTER_SPOT_STORE'], "
        "'jupyter_spot' in get_ipython().extension_manager.loaded)",
    )
    assert out.split() == [notebook, str(spot_env.resolve()), "True"]
    record = store.get_record(session_record_name(notebook))
    assert (record["state"], record["kernel_id"], record["kernel"]["kernel_spec"]["name"]) == (
        "live",
        kernel_id,
        "python3",
    )
    await execute(km, kernel_id, "weights = [1, 2, 3]")
    await wait_for_snapshots(store, notebook)
    (listed,) = json.loads((await jp_fetch("jupyter-spot/api/sessions")).body)["sessions"]
    assert (listed["interrupted"], listed["live_kernel"]) == (False, kernel_id)  # its own kernel wrote it

    sessions = json.loads((await jp_fetch("api", "sessions")).body)
    await jp_fetch("api", "sessions", sessions[0]["id"], method="DELETE")
    await until_async(
        lambda: store.get_record(session_record_name(notebook))["state"] == "closed",
        30,
        "a closed record after the user shut the kernel down",
    )
    (listed,) = json.loads((await jp_fetch("jupyter-spot/api/sessions")).body)["sessions"]
    assert (listed["interrupted"], listed["live_kernel"], listed["reason"]) == (False, None, None)


async def test_restore_into_a_new_kernel_the_live_one_or_a_named_one(
    jp_fetch: Any, spot_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    await snapshot_outside_the_server(
        notebook, "model = {'alpha': 0.5}\nfrom fractions import Fraction\nf = Fraction(1, 3)"
    )
    old = store.list_snapshots(notebook)[-1]
    # The old machine's next kernel restored and went on (one line of descent), then was lost too.
    await snapshot_outside_the_server(notebook, "%spot restore\nmodel = {'alpha': 0.9}")
    (listed,) = json.loads((await jp_fetch("jupyter-spot/api/sessions")).body)["sessions"]
    assert listed["interrupted"] is True and listed["live_kernel"] is None

    # No kernel for the notebook yet: the server starts one (same spec, the notebook's directory).
    reply = json.loads((await spot_fetch(api_path(notebook, "restore"), method="POST", body="{}")).body)
    new_kernel = reply["kernel_id"]
    assert set(reply["report"]["restored"]) == {"model", "Fraction", "f"} and reply["report"]["snapshot"]["id"] != old
    km = jp_serverapp.kernel_manager
    out = await execute(km, new_kernel, "import os\nprint(model['alpha'], os.environ['JUPYTER_SPOT_SESSION'])")
    assert out.split() == ["0.9", notebook]  # and it snapshots into the notebook's session from now on
    (listed,) = json.loads((await jp_fetch("jupyter-spot/api/sessions")).body)["sessions"]
    assert (listed["interrupted"], listed["live_kernel"]) == (False, new_kernel)

    # An explicit older snapshot, into the session's live kernel.
    body = json.dumps({"snapshot": old})
    reply = json.loads((await spot_fetch(api_path(notebook, "restore"), method="POST", body=body)).body)
    assert reply["kernel_id"] == new_kernel and reply["report"]["snapshot"]["id"] == old
    assert {"f", "model"} <= set(reply["report"]["restored"])
    assert (await execute(km, new_kernel, "print(model['alpha'], f)")).split() == ["0.5", "1/3"]

    # A named kernel that is not the session's (e.g. the one a notebook already has).
    other = json.loads((await jp_fetch("api", "kernels", method="POST", body="{}")).body)["id"]
    reply = json.loads(
        (await spot_fetch(api_path(notebook, "restore"), method="POST", body=json.dumps({"kernel_id": other}))).body
    )
    assert reply["kernel_id"] == other
    # "latest" is now the live kernel's own snapshot after its last cell (alpha 0.5), not the old machine's.
    assert (await execute(km, other, "print(model['alpha'])")).strip() == "0.5"


async def test_restore_of_a_tampered_snapshot_falls_back_and_says_so(
    spot_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    store = open_store(str(spot_env))
    await snapshot_outside_the_server(notebook, "a = 1")
    good = set(store.list_snapshots(notebook))
    await snapshot_outside_the_server(notebook, "a = 2")
    newest = store.list_snapshots(notebook)[-1]
    for snapshot_id in set(store.list_snapshots(notebook)) - good:  # every snapshot holding a = 2
        (manifest,) = (spot_env / "sessions").glob(f"*/{snapshot_id}.json")
        envelope = json.loads(manifest.read_text())
        envelope["body"] = envelope["body"].replace('"a"', '"b"')  # still JSON, no longer signed
        manifest.write_text(json.dumps(envelope))
    reply = json.loads((await spot_fetch(api_path(notebook, "restore"), method="POST", body="{}")).body)
    assert reply["report"]["snapshot"]["id"] != newest
    assert any(newest in note and note.startswith("fallback") for note in reply["report"]["notes"])
    assert (await execute(jp_serverapp.kernel_manager, reply["kernel_id"], "print(a)")).strip() == "1"

    with pytest.raises(HTTPClientError) as caught:
        await spot_fetch(api_path(notebook, "restore"), method="POST", body=json.dumps({"snapshot": newest}))
    assert caught.value.code == 409
    assert "not signed" in json.loads(caught.value.response.body)["message"]


@pytest.mark.parametrize("spot_config", [{"notice_sources": [], "auto_restore": True}])
async def test_auto_restore_when_the_interrupted_notebook_opens(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    await snapshot_outside_the_server(notebook, "import numpy as np\nresult = np.arange(4) * 3")
    kernel_id = await open_notebook(jp_fetch, notebook)

    async def restored() -> bool:
        (listed,) = json.loads((await jp_fetch("jupyter-spot/api/sessions")).body)["sessions"]
        return not listed["interrupted"]

    await until_async(restored, 60, "the auto-restore (the session no longer interrupted)")
    out = await execute(jp_serverapp.kernel_manager, kernel_id, "print(result.tolist(), np.__name__)")
    assert out.split() == ["[0,", "3,", "6,", "9]", "numpy"]


@pytest.fixture
def simulator(monkeypatch: pytest.MonkeyPatch) -> Any:
    from jupyter_spot.notice.simulator import Simulator

    with Simulator("aws") as sim:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", sim.url)
        yield sim


@pytest.mark.parametrize("spot_config", [{"notice_sources": ["aws"], "notice_poll_interval": 0.1}])
async def test_rebalance_takes_one_snapshot_and_keeps_the_machine_open(
    simulator: Any, jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path
) -> None:
    flushes: list[dict[str, Any]] = []

    async def listen(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        flushes.append(dict(data))

    jp_serverapp.event_logger.add_listener(
        schema_id="https://events.jupyter.org/jupyter_spot/flush/v1", listener=listen
    )
    store = open_store(str(spot_env))
    kernel_id = await open_notebook(jp_fetch, notebook)
    await execute(jp_serverapp.kernel_manager, kernel_id, "z = 1")
    before = await wait_for_snapshots(store, notebook)
    simulator.rebalance()
    await until_async(lambda: [f for f in flushes if f["status"] != "started"], 60, "the rebalance flush to end")
    # A repeat of the recommendation would be handed to the server by the poll that saw it, and
    # its flush would start at once: none does in two more polls and the moment after.
    polls = len(simulator.requests)
    await until_async(lambda: len(simulator.requests) >= polls + 4, 60, "two more polls of the metadata service")
    await asyncio.sleep(0.5)
    assert [f["status"] for f in flushes] == ["started", "done"]
    assert len(store.list_snapshots(notebook)) == len(before) + 1
    status = json.loads((await jp_fetch("jupyter-spot/api/status")).body)
    assert status["last_notice"]["kind"] == "rebalance" and status["last_notice"]["deadline"] is None
    started = await jp_fetch("api", "kernels", method="POST", body="{}")  # not an interruption: work goes on
    assert started.code == 201


@pytest.mark.parametrize("spot_config", [{"notice_sources": [], "auto_load_kernel_extension": False}])
async def test_auto_load_can_be_turned_off(jp_fetch: Any, jp_serverapp: Any, notebook: str) -> None:
    kernel_id = await open_notebook(jp_fetch, notebook)
    out = await execute(
        jp_serverapp.kernel_manager,
        kernel_id,
        "import os\nloaded = get_ipython().extension_manager.loaded\n"
        "print('jupyter_spot' in loaded, os.environ['JUPYTER_SPOT_SESSION'])",
    )
    assert out.split() == ["False", notebook]  # no extension, but %load_ext would still snapshot to the notebook


async def latest_variables(store: Any, session: str, wanted: set[str]) -> set[str]:
    """Wait until the session's latest snapshot holds ``wanted``; its variable names."""

    def holding() -> set[str] | None:
        ids = store.list_snapshots(session)
        names = set(store.load_manifest(session, ids[-1])["variables"]) if ids else set()
        return names if wanted <= names else None

    return await until_async(holding, 60, f"{session}'s latest snapshot to hold {sorted(wanted)}")


async def test_a_renamed_notebook_snapshots_under_its_new_path(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path, spot_fetch: Any
) -> None:
    store = open_store(str(spot_env))
    kernel_id = await open_notebook(jp_fetch, notebook)
    km = jp_serverapp.kernel_manager
    await execute(km, kernel_id, "x = 41")
    await wait_for_snapshots(store, notebook)

    renamed = "work/renamed.ipynb"
    await jp_fetch("api", "contents", "work", "model.ipynb", method="PATCH", body=json.dumps({"path": renamed}))
    await latest_variables(store, renamed, {"x"})  # the state so far, under the new name at once
    # The kernel switches first; the server then closes the old name's record and opens the new one.
    await until_async(
        lambda: store.get_record(session_record_name(renamed)), 60, "the server to record the renamed session"
    )
    await execute(km, kernel_id, "y = x + 1")
    await latest_variables(store, renamed, {"x", "y"})
    sessions = {s["id"]: s for s in json.loads((await spot_fetch("jupyter-spot/api/sessions")).body)["sessions"]}
    assert (sessions[renamed]["interrupted"], sessions[renamed]["live_kernel"]) == (False, kernel_id)
    assert (sessions[notebook]["interrupted"], sessions[notebook]["live_kernel"]) == (False, None)
    old_record = store.get_record(session_record_name(notebook))
    assert (old_record["state"], old_record["renamed_to"]) == ("closed", renamed)

    # A restart keeps the new name (the kernel comes back with the environment it was launched with).
    await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")

    async def session_is_renamed() -> bool:
        return renamed in await execute(km, kernel_id, "print(__import__('jupyter_spot').status()['session'])")

    await until_async(session_is_renamed, 60, "the restarted kernel to keep the renamed session")

    # Moving the folder that holds the notebook moves the session too.
    await execute(km, kernel_id, "z = 3")
    await latest_variables(store, renamed, {"z"})
    await jp_fetch("api", "contents", "work", method="PATCH", body=json.dumps({"path": "project"}))
    await latest_variables(store, "project/renamed.ipynb", {"z"})


def server_events(jp_serverapp: Any, kind: str = "flush") -> list[dict[str, Any]]:
    """Every event of ``kind`` (flush, notice) the server emits from now on, as they come."""
    events: list[dict[str, Any]] = []

    async def listen(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        events.append(dict(data))

    jp_serverapp.event_logger.add_listener(schema_id=f"https://events.jupyter.org/jupyter_spot/{kind}/v1", listener=listen)
    return events


async def kernel_whose_next_snapshot_sticks(
    jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path, tmp_path: Path
) -> tuple[str, FaultPause]:
    """The notebook's kernel, with one snapshot stored, and the next held at `manifest-commit`
    until released. Automatic snapshots are off, so the next is a notice's."""
    pause = FaultPause(tmp_path / "faults", "manifest-commit")
    kernel_id = await open_notebook(jp_fetch, notebook)
    await execute(jp_serverapp.kernel_manager, kernel_id, "z = 1")
    await wait_for_snapshots(open_store(str(spot_env)), notebook)
    faults = pause.env["JUPYTER_SPOT_FAULTS"]
    await execute(
        jp_serverapp.kernel_manager, kernel_id, f"%spot off\nimport os\nos.environ['JUPYTER_SPOT_FAULTS'] = {faults!r}"
    )
    return kernel_id, pause


@pytest.mark.faults
@pytest.mark.parametrize(
    "spot_config", [{"notice_sources": ["aws"], "notice_poll_interval": 0.1, "flush_timeout": 2.0}]
)
async def test_a_flush_that_misses_flush_timeout_is_reported_failed(
    simulator: Any, jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path, tmp_path: Path
) -> None:
    """A notice without a deadline (a rebalance) waits `flush_timeout` for the kernel's snapshot;
    a kernel whose snapshot is stuck (held at `manifest-commit`) gets a `failed` event, not silence."""
    kernel_id, pause = await kernel_whose_next_snapshot_sticks(jp_fetch, jp_serverapp, notebook, spot_env, tmp_path)
    events = server_events(jp_serverapp)
    simulator.rebalance()
    await until_async(lambda: [e for e in events if e["status"] != "started"], 60, "the flush to end")
    assert [e["status"] for e in events] == ["started", "failed"], events
    assert events[-1]["message"] == "no new snapshot before the deadline"
    assert (events[-1]["kernel_id"], events[-1]["session"]) == (kernel_id, notebook)
    await asyncio.to_thread(pause.reached, "manifest-commit")  # it was stuck writing, as arranged


@pytest.mark.faults
@pytest.mark.parametrize(
    "spot_config", [{"notice_sources": ["aws"], "notice_poll_interval": 0.1, "flush_timeout": 120.0}]
)
async def test_the_interruption_is_seen_at_once_while_the_rebalance_snapshot_is_still_written(
    simulator: Any, jp_fetch: Any, jp_serverapp: Any, notebook: str, spot_env: Path, tmp_path: Path
) -> None:
    """AWS often recommends a rebalance shortly before it interrupts. The rebalance's snapshot
    has no deadline and may take long (here it is held at `manifest-commit`); the metadata
    service must still be polled meanwhile, or the interruption's two minutes pass unseen."""
    kernel_id, pause = await kernel_whose_next_snapshot_sticks(jp_fetch, jp_serverapp, notebook, spot_env, tmp_path)
    notices, flushes = server_events(jp_serverapp, "notice"), server_events(jp_serverapp)
    simulator.rebalance()
    await asyncio.to_thread(pause.reached, "manifest-commit")  # the rebalance's snapshot is stuck
    simulator.fire(lead_time=30)
    await until_async(lambda: [n for n in notices if n["kind"] == "interruption"], 10,
                      "the interruption notice, while the rebalance's flush still waits")
    refused = await jp_fetch("api", "kernels", method="POST", body="{}", raise_error=False)
    assert refused.code == 503, refused.body
    pause.release("manifest-commit")
    await until_async(lambda: len([f for f in flushes if f["status"] == "done"]) == 2, 60, "both flushes to land")
    assert [n["kind"] for n in notices] == ["rebalance", "interruption"]
    assert {f["kernel_id"] for f in flushes} == {kernel_id}


@pytest.mark.parametrize(
    "spot_config", [{"notice_sources": ["aws"], "notice_poll_interval": 0.1, "auto_load_kernel_extension": False}]
)
async def test_a_kernel_without_the_notice_handler_is_reported_not_signalled(
    simulator: Any, jp_fetch: Any, jp_serverapp: Any, notebook: str
) -> None:
    """A kernel that never loaded jupyter-spot cannot take a notice (SIGUSR1 would kill it):
    the server says so in a `failed` flush event and leaves the kernel alone."""
    kernel_id = await open_notebook(jp_fetch, notebook)
    km = jp_serverapp.kernel_manager
    await execute(km, kernel_id, "x = 1")
    events = server_events(jp_serverapp)
    simulator.fire("terminate")
    await until_async(lambda: events, 60, "a flush event")
    (event,) = events
    assert (event["status"], event["kernel_id"]) == ("failed", kernel_id)
    assert event["message"].startswith("could not reach the kernel: "), event
    assert (await execute(km, kernel_id, "print(x + 1)")).strip() == "2"  # alive and well

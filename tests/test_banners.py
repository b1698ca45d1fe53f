"""Every banner and the snapshot status in both front ends: Notebook 7's variants of what
test_lab_extension.py shows in Lab, and the culled kernel in both.

A real ``jupyter lab`` (which serves Notebook 7's ``/notebooks/…`` pages too), Chromium
through Playwright. Each test asserts what the banner says, then screenshots it into
tests/screenshots/ (docs/screenshots/ holds the committed set, docs/lab.md shows them).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from harness import FaultPause, JupyterServer, notebook_outputs, until, write_notebook
from harness.browser import shot
from harness.lab_notebook import (  # noqa: F401 - fixtures
    CELLS,
    NOTEBOOK,
    SHOT_SUFFIX,
    SLOW,
    imds,
    lab_factory,
    open_in,
    run_cell,
)
from playwright.sync_api import Locator, Page, expect

from jupyter_spot.notice.simulator import Simulator

pytestmark = [pytest.mark.timeout(420), pytest.mark.browser, pytest.mark.servers]
#: The kernels of the culling test's server are culled after this long without activity or a connection.
CULL_IDLE_SECONDS = 10


def start_lab(jupyter_servers: Callable[..., JupyterServer], name: str, root: Path, **options: object) -> JupyterServer:
    options.setdefault("options", ["--SpotApp.gc_interval=0"])
    return jupyter_servers(name, root, lab=True, poll=0.5, **options).start()


def session(lab: JupyterServer) -> dict | None:
    sessions = lab.api(f"jupyter-spot/api/sessions?path={quote(NOTEBOOK)}")["sessions"]
    return sessions[0] if sessions else None


def notification(page: Page, text: str) -> Locator:
    """Notebook 7's interruption warning: a JupyterLab notification toast."""
    return page.locator(".jp-Notification-Toast-warning, .Toastify__toast").filter(has_text=text).first


def test_notebook7_shows_the_snapshot_status_pending_then_saved_and_the_restore_banner(
    page: Page, jupyter_servers: Callable[..., JupyterServer], imds: Simulator, tmp_path: Path, spot_env: Path
) -> None:
    root = tmp_path / "root"
    # Over the kernel's 8 MB background threshold: the cell ends, then its snapshot is written.
    # Random bytes: zeros would be one repeated chunk, stored once, and too small to go to the background.
    write_notebook(root / NOTEBOOK, CELLS[0] + "\nbig = __import__('os').urandom(9 << 20)", CELLS[1])
    pause = FaultPause(tmp_path / "faults", "manifest-commit")  # that write, held in flight
    lab = start_lab(jupyter_servers, "lab-1", root, env={**imds.env, **pause.env})
    open_in(page, lab, "notebook")
    status = page.locator("#menu-panel .jp-spot-status")  # the menu bar, next to the kernel status
    expect(status).to_have_text("no snapshot yet · local", timeout=30_000)
    expect(status).to_have_attribute("data-state", "none")

    run_cell(page, 0, "hello-from-cell 42")
    pause.reached("manifest-commit")
    expect(status).to_have_attribute("data-state", "pending")
    expect(status).to_have_text("snapshot pending… · local")
    pause.release("manifest-commit")
    expect(status).to_have_attribute("data-state", "saved", timeout=30_000)
    expect(status).to_have_text(re.compile(r"^snapshot \d+ s ago · \d.* · local$"))
    assert status.get_attribute("data-snapshot-id") == session(lab)["newest"]["id"]
    shot(page, "status-notebook7")
    lab.kill()  # the machine is reclaimed: server and kernel die without a word

    fresh = start_lab(jupyter_servers, "lab-2", root, env=imds.env)
    open_in(page, fresh, "notebook")
    banner = page.locator(".jp-spot-restore")
    expect(banner).to_be_visible(timeout=30_000)
    message = banner.locator(".jp-spot-restore-message")
    expect(message).to_contain_text("This notebook's kernel was interrupted")
    expect(message).to_contain_text(re.compile(r"holds .*\d+ variables?"))
    expect(banner.locator(".jp-spot-restore-skipped")).to_contain_text("countdown (")  # a generator
    expect(status).to_have_attribute("data-state", "saved")  # the interrupted snapshot: no cell ran here
    shot(page, "restore-banner-notebook7")
    banner.get_by_role("button", name="Restore").click()
    expect(banner).to_have_attribute("data-state", "restored", timeout=SLOW)
    run_cell(page, 1, "second-cell 3")  # y = [x] * 3 needs the restored x


def test_notebook7_on_an_unwritable_store_shows_read_only_the_rebalance_hint_and_the_failed_flush(
    page: Page, jupyter_servers: Callable[..., JupyterServer], imds: Simulator, tmp_path: Path, spot_env: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, *CELLS)
    lab = start_lab(jupyter_servers, "lab", root, store=blocker / "store", env=imds.env)
    open_in(page, lab, "notebook")
    status = page.locator("#menu-panel .jp-spot-status")
    expect(status).to_have_attribute("data-state", "read-only", timeout=30_000)
    expect(status).to_have_text("no snapshot yet · local (read-only!)")
    run_cell(page, 0, "hello-from-cell 42")
    expect(status).to_have_attribute("data-state", "read-only")  # never "saved": nothing can be
    shot(page, "status-read-only-notebook7")

    imds.rebalance()
    rebalance = notification(page, "rebalance hint")
    expect(rebalance).to_be_in_viewport(ratio=1.0, timeout=30_000)
    expect(rebalance).to_contain_text("The cloud asks to move off this machine soon (rebalance hint)")
    shot(page, "notice-rebalance-notebook7")

    imds.fire(lead_time=10)  # the server waits until 2 s before the end for a snapshot that cannot come
    failed = notification(page, "could NOT be saved")
    expect(failed).to_be_visible(timeout=60_000)
    expect(failed).to_contain_text(re.compile(
        r"This machine (will be reclaimed in 0:0\d|is being reclaimed now) — notebooks saved; "
        r"some kernel state could NOT be saved \(see the snapshot status\)\."
    ))
    expect(status).to_have_attribute("data-state", "failed")
    expect(status).to_have_text("kernel state NOT saved · no snapshot yet · local (read-only!)")
    flush_failed = "jupyter-spot: the final flush failed: no new snapshot before the deadline"
    expect(status).to_have_attribute("title", flush_failed)
    shot(page, "notice-failed-flush-notebook7")


def test_notebook7_with_save_on_notice_off_tells_the_user_to_save(
    page: Page, lab_factory: Callable[..., JupyterServer], imds: Simulator
) -> None:
    """``saveOnNotice: false``: the notification never says the notebooks were saved; it says to save them."""
    lab = lab_factory(saveOnNotice=False)
    open_in(page, lab, "notebook")
    run_cell(page, 0, "hello-from-cell 42")
    imds.fire(lead_time=120)
    warning = notification(page, "Spot interruption")
    expect(warning).to_be_in_viewport(ratio=1.0, timeout=30_000)
    expect(warning).to_contain_text(re.compile(
        r"This machine will be reclaimed in \d:\d\d — kernel state saved; "
        r"your notebooks were not saved automatically: save them now\."
    ), timeout=30_000)
    expect(warning).not_to_contain_text("notebooks saved")
    assert "hello-from-cell" not in notebook_outputs(lab.root / NOTEBOOK)
    shot(page, "notice-save-off-notebook7")


def test_notebook7_notes_a_notebook_running_on_another_server(
    page: Page, lab_factory: Callable[..., JupyterServer], jupyter_servers: Callable[..., JupyterServer]
) -> None:
    lab = lab_factory()
    a = jupyter_servers("a", lab.root, sources=["signal"], options=["--SpotApp.heartbeat_interval=1"]).start()
    try:
        body = {"path": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}}
        kernel_id = a.api("api/sessions", "POST", body)["kernel"]["id"]
        assert "hello-from-cell 42" in a.run_in_kernel(kernel_id, CELLS[0])
        until(lambda: (session(lab) or {}).get("live_elsewhere"), 60, "A's kernel, listed by B as live elsewhere")

        open_in(page, lab, "notebook")
        note = page.get_by_role("status", name="Notebook also running on another server")
        expect(note).to_be_visible(timeout=30_000)
        expect(note).to_contain_text(
            re.compile(rf"This notebook is also open on {re.escape(socket.gethostname())} \({re.escape(a.url)}\), "
                       r"where its kernel last checked in \d+ s ago\. .*the newest one wins\.")
        )
        expect(page.locator(".jp-spot-restore")).to_have_count(0)
        shot(page, "live-elsewhere-notebook7")
        note.get_by_role("button", name="Dismiss").click()
        expect(note).to_have_count(0)
    finally:
        a.stop()


@pytest.mark.parametrize("front_end", ["lab", "notebook"])
def test_a_culled_kernel_is_offered_back_when_the_notebook_returns(
    page: Page, jupyter_servers: Callable[..., JupyterServer], imds: Simulator, tmp_path: Path, spot_env: Path,
    front_end: str,
) -> None:
    """``cull_idle_timeout``: the kernel of a notebook nobody has open is shut down; its state is offered back."""
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, *CELLS)
    culling = [
        "--SpotApp.gc_interval=0",
        f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_SECONDS}",
        "--MappingKernelManager.cull_interval=1",
    ]
    lab = start_lab(jupyter_servers, "lab", root, env=imds.env, options=culling)
    open_in(page, lab, front_end)
    run_cell(page, 0, "hello-from-cell 42")
    until(lambda: (session(lab) or {}).get("latest", {}).get("variable_count", 0) >= 2, 90, "a snapshot of cell 1",
          interval=0.2, describe=lab.log)
    page.goto("about:blank")  # the user leaves: the kernel has no connection and goes idle
    until(lambda: lab.api("api/kernels") == [], 120, "the idle culler", interval=0.5, describe=lab.log)

    open_in(page, lab, front_end)  # a connected kernel is never culled (cull_connected is off)
    banner = page.locator(".jp-spot-restore")
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner).to_have_attribute("data-cause", "culled")
    expect(banner.locator(".jp-spot-restore-message")).to_contain_text(
        re.compile(r"This notebook's kernel was lost: culled after \d+ s idle\. Its last snapshot")
    )
    shot(page, f"culled-{SHOT_SUFFIX[front_end]}")
    banner.get_by_role("button", name="Restore").click()
    expect(banner).to_have_attribute("data-state", "restored", timeout=SLOW)
    run_cell(page, 1, "second-cell 3")


@pytest.mark.parametrize("front_end", ["lab", "notebook"])
def test_a_server_jupyterhub_stopped_offers_its_notebook_back_saying_so(
    page: Page, jupyter_servers: Callable[..., JupyterServer], imds: Simulator, tmp_path: Path, spot_env: Path,
    front_end: str,
) -> None:
    """JupyterHub's idle culler stops the single-user server (SIGTERM); the next one offers the notebook back."""
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, *CELLS)
    hub = {"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api", "JUPYTERHUB_SERVICE_PREFIX": "/user/ada/"}
    lab = start_lab(jupyter_servers, "lab-1", root, env={**imds.env, **hub})
    open_in(page, lab, front_end)
    run_cell(page, 0, "hello-from-cell 42")
    until(lambda: (session(lab) or {}).get("latest", {}).get("variable_count", 0) >= 2, 90, "a snapshot of cell 1",
          interval=0.2, describe=lab.log)
    page.goto("about:blank")
    lab.stop()  # SIGTERM, what the hub's spawner sends its server when the idle culler asks
    assert lab.proc is not None and lab.proc.returncode == 0, lab.log()

    fresh = start_lab(jupyter_servers, "lab-2", root, env={**imds.env, **hub})
    open_in(page, fresh, front_end)
    banner = page.locator(".jp-spot-restore")
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner).to_have_attribute("data-cause", "server-stopped")
    expect(banner.locator(".jp-spot-restore-message")).to_contain_text(
        "This notebook's kernel was lost: the server was stopped by JupyterHub. Its last snapshot"
    )
    shot(page, f"server-stopped-{SHOT_SUFFIX[front_end]}")
    banner.get_by_role("button", name="Restore").click()
    expect(banner).to_have_attribute("data-state", "restored", timeout=SLOW)
    run_cell(page, 1, "second-cell 3")

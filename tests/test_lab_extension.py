"""The JupyterLab extension in a real Lab, driven through Debian's Chromium.

Each test starts its own ``jupyter lab`` (jupyter-spot's server extension on a
temporary store, the AWS notice source pointed at the local IMDS simulator),
opens a notebook and clicks through what a user would see. Screenshots of each
state land in tests/screenshots/ (docs/screenshots/ holds a committed set).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from harness import JupyterServer, notebook_outputs, until, write_notebook
from harness.browser import shot
from harness.lab_notebook import (  # noqa: F401 - fixtures
    CELLS,
    NOTEBOOK,
    SLOW,
    cell,
    count_session_checks,
    imds,
    lab_factory,
    open_notebook,
    run_cell,
    session_checks_done,
)
from playwright.sync_api import Page, expect

from jupyter_spot.notice.simulator import Simulator

pytestmark = [pytest.mark.browser, pytest.mark.servers]


Lab = JupyterServer


def test_notice_shows_countdown_and_saves_the_dirty_notebook(page: Page, lab_factory: Callable[..., Lab], imds: Simulator) -> None:
    lab = lab_factory()
    notebook = lab.root / NOTEBOOK
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    assert "hello-from-cell" not in notebook_outputs(notebook), "autosave is off: only the notice may save"

    imds.fire(lead_time=120)
    banner = page.locator("#jp-spot-notice")
    expect(banner).to_be_in_viewport(ratio=1.0, timeout=30_000)
    message = banner.locator(".jp-spot-notice-message")
    expect(message).to_contain_text(re.compile(r"This machine will be reclaimed in (1:[0-5]\d|2:00) — "))
    first = message.inner_text()
    expect(message).not_to_have_text(first, timeout=5_000)  # the countdown is live

    expect(banner.locator(".jp-spot-notice-documents")).to_have_text("All open notebooks and files are saved.")
    assert "hello-from-cell 42" in notebook_outputs(notebook)
    expect(page.locator(".jp-mod-dirty")).to_have_count(0)
    flush = banner.locator(".jp-spot-notice-kernel")
    expect(flush).to_have_attribute("data-status", "done", timeout=30_000)
    expect(flush).to_contain_text(f"{NOTEBOOK}: kernel state saved in")
    shot(page, "notice")


def test_notice_says_the_notebooks_could_not_be_saved_when_their_save_fails(
    page: Page, lab_factory: Callable[..., Lab], imds: Simulator
) -> None:
    """The notebook's folder was moved away, so the notice's save fails: the warning says so and to
    save now (the documents line says why), never that the notebooks were saved or are still saving."""
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    folder = lab.root / Path(NOTEBOOK).parent
    folder.rename(folder.with_name("moved-away"))  # moved, not deleted: the kernel's working directory

    imds.fire(lead_time=120)
    banner = page.locator("#jp-spot-notice")
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner.locator(".jp-spot-notice-documents")).to_contain_text("Saving documents failed: ", timeout=30_000)
    expect(banner.locator(".jp-spot-notice-kernel")).to_have_attribute("data-status", "done", timeout=30_000)
    expect(banner.locator(".jp-spot-notice-message")).to_contain_text(re.compile(
        r"This machine will be reclaimed in \d:\d\d — kernel state saved; notebooks could NOT be saved: save them now\.$"
    ))


def test_fresh_server_offers_restore_and_restores_variables(page: Page, lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    status = page.locator(".jp-spot-status")
    expect(status).to_have_attribute("data-snapshot-id", re.compile(".+"), timeout=30_000)
    lab.kill()  # the machine is reclaimed: server and kernel die without a word

    fresh = lab_factory()
    open_notebook(page, fresh)
    restore = page.locator(".jp-spot-restore")
    expect(restore).to_be_visible(timeout=30_000)
    expect(restore.locator(".jp-spot-restore-message")).to_contain_text("This notebook's kernel was interrupted")
    expect(restore.locator(".jp-spot-restore-message")).to_contain_text(re.compile(r"\d+ variables?"))
    expect(restore.locator(".jp-spot-restore-skipped")).to_contain_text("countdown (")  # a generator
    restore.get_by_role("button", name="Details").click()
    details = restore.locator(".jp-spot-restore-details")
    expect(details).to_contain_text(NOTEBOOK)
    expect(details).to_contain_text(re.compile(r"countdown \(.*generator.*made in cell \[1\]"))
    shot(page, "restore-banner")

    restore.get_by_role("button", name="Restore").click()
    expect(restore).to_have_attribute("data-state", "restored", timeout=SLOW)
    expect(restore.locator(".jp-spot-report-restored")).to_contain_text("secret")
    expect(restore.locator(".jp-spot-report")).to_contain_text(re.compile(r"Not restored.*countdown", re.DOTALL))
    shot(page, "restored")

    cell(page, 1).locator(".cm-content").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # a new cell below, in command mode
    page.keyboard.press("Enter")
    page.keyboard.type("print(secret, x)")
    page.keyboard.press("Shift+Enter")
    expect(cell(page, 2).locator(".jp-OutputArea-output")).to_have_text("restored-42 42", timeout=SLOW)
    shot(page, "restored-cell")


def test_restore_banner_and_save_on_notice_switched_off(
    page: Page, lab_factory: Callable[..., Lab], imds: Simulator
) -> None:
    """``showRestoreBanner: false``: an interrupted notebook opens with no banner (still offered
    by the server). ``saveOnNotice: false``: a notice leaves the unsaved notebook unsaved, and the
    banner says so — tells the user to save now, never that the notebooks were saved."""
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    expect(page.locator(".jp-spot-status")).to_have_attribute("data-snapshot-id", re.compile(".+"), timeout=30_000)
    lab.kill()

    fresh = lab_factory(showRestoreBanner=False, saveOnNotice=False)
    count_session_checks(page)
    open_notebook(page, fresh)
    session_checks_done(page)
    expect(page.locator(".jp-spot-restore")).to_have_count(0)
    (listed,) = fresh.api(f"jupyter-spot/api/sessions?path={quote(NOTEBOOK, safe='')}")["sessions"]
    assert listed["interrupted"]  # there was something to offer

    notebook = fresh.root / NOTEBOOK
    run_cell(page, 0, "hello-from-cell 42")
    expect(page.locator(".jp-mod-dirty")).not_to_have_count(0)
    imds.fire(lead_time=120)
    banner = page.locator("#jp-spot-notice")
    expect(banner).to_be_visible(timeout=30_000)
    documents = banner.locator(".jp-spot-notice-documents")
    expect(documents).to_have_text("Saving notebooks on a notice is off: save your notebooks now.")
    message = banner.locator(".jp-spot-notice-message")
    flush = banner.locator(".jp-spot-notice-kernel")
    expect(flush).to_have_attribute("data-status", "done", timeout=30_000)
    expect(flush).to_contain_text(f"{NOTEBOOK}: kernel state saved in")
    expect(message).to_contain_text(re.compile(
        r"This machine will be reclaimed in \d:\d\d — kernel state saved; "
        r"your notebooks were not saved automatically: save them now\.$"
    ))
    shot(page, "notice-save-off")
    expect(page.locator(".jp-mod-dirty")).not_to_have_count(0)
    assert "hello-from-cell" not in notebook_outputs(notebook)


def test_auto_restore_setting_restores_without_a_click(page: Page, lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    expect(page.locator(".jp-spot-status")).to_have_attribute("data-snapshot-id", re.compile(".+"), timeout=30_000)
    lab.kill()

    fresh = lab_factory(autoRestore=True, showStatusBar=False)
    open_notebook(page, fresh)
    restore = page.locator(".jp-spot-restore")
    expect(restore).to_have_attribute("data-state", "restored", timeout=SLOW)
    expect(page.locator(".jp-spot-status")).to_be_hidden()  # showStatusBar: false
    run_cell(page, 1, "second-cell 3")  # y = [x] * 3 needs the restored x


def test_status_bar_age_changes_after_running_a_cell(page: Page, lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    open_notebook(page, lab)
    status = page.locator(".jp-spot-status")
    expect(status).to_have_text("no snapshot yet · local", timeout=30_000)

    run_cell(page, 0, "hello-from-cell 42")
    expect(status).to_have_attribute("data-snapshot-id", re.compile(".+"), timeout=30_000)
    first = status.get_attribute("data-snapshot-id")
    expect(status).to_have_text(re.compile(r"^snapshot ([3-9]|\d\d) s ago · .+ · local$"), timeout=15_000)
    shot(page, "status-bar")

    started = time.monotonic()
    run_cell(page, 1, "second-cell 3")
    expect(status).not_to_have_attribute("data-snapshot-id", first or "", timeout=30_000)
    age = re.match(r"snapshot (\d+) s ago", status.inner_text())
    assert age, status.inner_text()
    assert int(age.group(1)) <= time.monotonic() - started + 1, "the age shown is the new snapshot's"

    status.click()
    panel = page.locator("#jp-spot-snapshots")
    expect(panel).to_be_visible()
    expect(panel.locator(".jp-spot-snapshot")).to_have_count(2, timeout=10_000)
    rows = panel.locator(".jp-spot-snapshot")
    expect(rows.first).to_have_attribute("data-snapshot-id", status.get_attribute("data-snapshot-id") or "")
    expect(rows.nth(1)).to_have_attribute("data-snapshot-id", first or "")
    shot(page, "snapshots-panel")

    rows.nth(1).get_by_role("button", name="Restore").click()  # the older one: before y existed
    report = panel.locator(".jp-spot-snapshots-result .jp-spot-report")
    expect(report).to_contain_text("execution count 1", timeout=SLOW)
    expect(report.locator(".jp-spot-report-restored")).to_have_text(re.compile(r"^(?!.*\by\b).*\bsecret\b"))

    rows.first.get_by_role("button", name="Delete").click()
    page.locator(".jp-Dialog").get_by_role("button", name="Delete").click()
    expect(rows).to_have_count(1, timeout=10_000)
    expect(rows.first).to_have_attribute("data-snapshot-id", first or "")
    assert len(lab.api(f"jupyter-spot/api/sessions/{quote(NOTEBOOK, safe='')}/snapshots")["snapshots"]) == 1


def test_notebook_running_on_another_server_is_noted_not_offered(
    page: Page, lab_factory: Callable[..., Lab], jupyter_servers: Callable[..., JupyterServer]
) -> None:
    """Server A (plain `jupyter server`) runs the notebook; Lab on server B, same store, opens it."""
    lab = lab_factory()
    # A beats every second: B's own kernel, started when Lab opens the notebook, writes the
    # session's record as B's until A's next beat (one record per session, last writer wins).
    a = jupyter_servers("a", lab.root, sources=["signal"], options=["--SpotApp.heartbeat_interval=1"]).start()
    try:
        session = a.api("api/sessions", "POST", {"path": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}})
        kernel_id = session["kernel"]["id"]
        assert "hello-from-cell 42" in a.run_in_kernel(kernel_id, CELLS[0])

        listed = until(
            lambda: lab.api(f"jupyter-spot/api/sessions?path={quote(NOTEBOOK, safe='')}")["sessions"],
            60,
            "A's snapshot after its cell, listed by B",
        )
        assert listed[0]["live_elsewhere"]["kernel_id"] == kernel_id and not listed[0]["interrupted"]

        open_notebook(page, lab)
        note = page.get_by_role("status", name="Notebook also running on another server")
        expect(note).to_be_visible(timeout=30_000)
        expect(note).to_contain_text(
            re.compile(rf"This notebook is also open on {re.escape(socket.gethostname())} \({re.escape(a.url)}\), "
                       r"where its kernel last checked in \d+ s ago\. .*the newest one wins\.")
        )
        expect(page.locator(".jp-spot-restore")).to_have_count(0)
        shot(page, "live-elsewhere")

        note.get_by_role("button", name="Dismiss").click()
        expect(note).to_have_count(0)
        expect(page.locator(".jp-spot-restore")).to_have_count(0)
    finally:
        a.stop()  # a clean stop: its kernel goes with it


def test_rebalance_then_a_notice_without_deadline_read_right(
    page: Page, lab_factory: Callable[..., Lab], imds: Simulator
) -> None:
    """A rebalance hint is not an interruption; an interruption without a time says "shortly"."""
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    imds.rebalance()
    banner = page.locator("#jp-spot-notice")
    message = banner.locator(".jp-spot-notice-message")
    expect(message).to_contain_text("The cloud asks to move off this machine soon (rebalance hint)", timeout=30_000)
    shot(page, "notice-rebalance")
    imds.fire("terminate")
    imds.notice = {"action": "terminate", "time": "not-a-time"}  # IMDS gives no usable time
    expect(message).to_contain_text(re.compile(r"This machine will be \w+ shortly — "), timeout=30_000)


def test_unwritable_store_shows_read_only_and_the_failed_flush(
    page: Page, imds: Simulator, jupyter_servers: Callable[..., JupyterServer], tmp_path: Path, spot_env: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, *CELLS)
    lab = jupyter_servers(
        "lab", root, lab=True, store=blocker / "store", env=imds.env, poll=0.5, options=["--SpotApp.gc_interval=0"]
    ).start()
    open_notebook(page, lab)
    expect(page.locator(".jp-spot-status")).to_contain_text("(read-only!)", timeout=30_000)
    run_cell(page, 0, "hello-from-cell 42")
    imds.fire(lead_time=10)  # the server waits until 2 s before the end for a snapshot that cannot come
    banner = page.locator("#jp-spot-notice")
    flush = banner.locator(".jp-spot-notice-kernel")
    expect(flush).to_have_attribute("data-status", "failed", timeout=60_000)
    expect(flush).to_contain_text(f"{NOTEBOOK}: kernel state NOT saved — ")
    expect(banner.locator(".jp-spot-notice-message")).to_contain_text("some kernel state could NOT be saved")
    shot(page, "notice-failed-flush")

"""A kernel lost while its notebook is open, in JupyterLab and Notebook 7 (issue 11).

A real ``jupyter lab`` (which serves Notebook 7's ``/notebooks/…`` pages too, when
``notebook>=7`` is installed), Chromium through Playwright. The kernel process is
SIGKILLed as the OOM killer would; jupyter_server restarts it empty under the same
id, and the notebook must offer its state back at once, with the cause.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from urllib.parse import quote

import psutil
import pytest
from harness import JupyterServer, until
from harness.browser import shot
from harness.lab_notebook import (  # noqa: F401 - fixtures
    NOTEBOOK,
    SHOT_SUFFIX,
    SLOW,
    idle_kernels,
    imds,
    lab_factory,
    open_in,
    run_cell,
)
from playwright.sync_api import Page, expect

from jupyter_spot.notice.simulator import Simulator

pytestmark = [pytest.mark.timeout(420), pytest.mark.browser, pytest.mark.servers]
FRONT_ENDS = ["lab", "notebook"]
Lab = JupyterServer


def described(lab: Lab) -> dict | None:
    sessions = lab.api(f"jupyter-spot/api/sessions?path={quote(NOTEBOOK)}")["sessions"]
    return sessions[0] if sessions else None


def kernel_pids(lab: Lab) -> list[int]:
    """The server's kernel processes (none for a moment while one restarts)."""
    assert lab.proc is not None
    pids = []
    for process in psutil.Process(lab.proc.pid).children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def kernel_pid(lab: Lab) -> int:
    (pid,) = until(lambda: kernel_pids(lab), 90, "a kernel process", interval=0.2, describe=lab.log)
    return pid


def dismiss_restart_dialog(page: Page) -> None:
    """Lab's own "Kernel Restarting … appears to have died" dialog, which the user closes with Ok."""
    dialog = page.get_by_role("dialog", name=re.compile("^Kernel Restarting"))
    expect(dialog).to_be_visible(timeout=SLOW)
    dialog.get_by_role("button", name=re.compile("^ok$", re.I)).click()
    expect(dialog).to_have_count(0)


def snapshot_holds_x(lab: Lab) -> None:
    until(lambda: (described(lab) or {}).get("latest", {}).get("variable_count", 0) >= 2, 90, "a snapshot of cell 1",
          interval=0.2, describe=lab.log)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_an_oom_killed_kernel_offers_its_state_at_once_restore_and_discard(
    page: Page, lab_factory: Callable[..., Lab], front_end: str
) -> None:
    lab = lab_factory()
    open_in(page, lab, front_end)
    run_cell(page, 0, "hello-from-cell 42")
    snapshot_holds_x(lab)
    os.kill(kernel_pid(lab), signal.SIGKILL)  # what the OOM killer does

    banner = page.locator(".jp-spot-restore")
    expect(banner).to_be_visible(timeout=SLOW)  # no reload: the open notebook shows it
    expect(banner).to_have_attribute("data-cause", "oom")
    expect(banner.locator(".jp-spot-restore-message")).to_contain_text(
        "the kernel was killed (signal 9) — most likely out of memory"
    )
    expect(banner.locator(".jp-spot-restore-largest")).to_contain_text("Largest variables: ")
    dismiss_restart_dialog(page)
    shot(page, f"kernel-lost-oom-{SHOT_SUFFIX[front_end]}")
    banner.get_by_role("button", name="Restore").click()
    expect(banner).to_have_attribute("data-state", "restored", timeout=SLOW)
    run_cell(page, 1, "second-cell 3")  # y = [x] * 3: x came back into the restarted kernel

    os.kill(kernel_pid(lab), signal.SIGKILL)  # lost again: a new offer replaces the settled banner
    expect(banner).to_have_attribute("data-cause", "oom", timeout=SLOW)
    expect(banner.get_by_role("button", name="Discard")).to_be_visible(timeout=SLOW)
    dismiss_restart_dialog(page)
    banner.get_by_role("button", name="Discard").click()
    expect(banner).to_have_attribute("data-state", "discarded", timeout=SLOW)
    assert described(lab)["interrupted"] is False

    open_in(page, lab, front_end)  # for good: a reload offers nothing
    until(lambda: described(lab)["interrupted"] is False, 90, "the server to stop offering it", interval=0.2)
    expect(banner).to_have_count(0)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_restart_the_user_asks_for_shows_no_banner(
    page: Page, lab_factory: Callable[..., Lab], front_end: str
) -> None:
    lab = lab_factory()
    open_in(page, lab, front_end)
    run_cell(page, 0, "hello-from-cell 42")
    snapshot_holds_x(lab)
    pid = kernel_pid(lab)
    page.get_by_role("menuitem", name="Kernel", exact=True).click()  # Kernel ▸ Restart Kernel…, as the user would
    page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).first.click()
    page.get_by_role("dialog").get_by_role("button", name="Confirm Kernel Restart").click()
    until(lambda: kernel_pids(lab) not in ([], [pid]), 90, "the restarted kernel", interval=0.2, describe=lab.log)
    until(lambda: idle_kernels(lab), 90, "an idle kernel", interval=0.2, describe=lab.log)
    run_cell(page, 0, "hello-from-cell 42")  # the restarted kernel works and has taken a snapshot of its own
    assert described(lab)["interrupted"] is False
    expect(page.locator(".jp-spot-restore")).to_have_count(0)


def test_notebook7_shows_the_notice_countdown_as_a_notification(
    page: Page, lab_factory: Callable[..., Lab], imds: Simulator
) -> None:
    lab = lab_factory()
    open_in(page, lab, "notebook")
    imds.fire(lead_time=120)
    toast = page.locator(".jp-Notification-Toast-warning, .Toastify__toast").filter(has_text="Spot interruption")
    expect(toast.first).to_be_visible(timeout=30_000)
    expect(toast.first).to_contain_text(re.compile(r"This machine will be reclaimed in (1:[0-5]\d|2:00) — "))
    first = toast.first.inner_text()
    expect(toast.first).not_to_have_text(first, timeout=5_000)  # the countdown is live
    expect(toast.first).to_be_in_viewport(ratio=1.0)  # slid in whole, for the screenshot
    shot(page, "notice-notebook7")


def test_a_notice_with_no_kernel_running_does_not_wait_for_kernel_state(
    page: Page, lab_factory: Callable[..., Lab], imds: Simulator
) -> None:
    lab = lab_factory()
    page.goto(f"{lab.url}lab?reset&token={lab.token}", timeout=SLOW)  # the launcher: no notebook, no kernel
    expect(page.locator(".jp-Launcher").first).to_be_visible(timeout=SLOW)
    assert lab.api("api/kernels") == []
    imds.fire(lead_time=120)
    message = page.locator("#jp-spot-notice .jp-spot-notice-message")
    expect(message).to_contain_text("no kernel was running, so there is no kernel state to save", timeout=30_000)
    assert lab.api("jupyter-spot/api/status")["last_notice"]["kernels"] == 0

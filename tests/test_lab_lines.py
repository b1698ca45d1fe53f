"""The restore banner's Discard button, and a banner that survives the user running cells first (issue 9 §1).

A real ``jupyter lab`` per server, Chromium through Playwright (see tests/harness/lab_notebook.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

import pytest
from harness import JupyterServer
from harness.browser import shot
from harness.lab_notebook import (  # noqa: F401 - fixtures
    NOTEBOOK,
    SLOW,
    count_session_checks,
    imds,
    lab_factory,
    open_notebook,
    run_cell,
    session_checks_done,
)
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.browser, pytest.mark.servers]
Lab = JupyterServer


def sessions(lab: Lab) -> dict:
    (described,) = lab.api(f"jupyter-spot/api/sessions?path={quote(NOTEBOOK)}")["sessions"]
    return described


def test_banner_stays_after_a_cell_and_discard_ends_the_interruption(
    page: Page, lab_factory: Callable[..., Lab]
) -> None:
    lab = lab_factory()
    open_notebook(page, lab)
    run_cell(page, 0, "hello-from-cell 42")
    expect(page.locator(".jp-spot-status")).to_have_attribute("data-snapshot-id", re.compile(".+"), timeout=30_000)
    lost = sessions(lab)["latest"]["id"]
    lab.kill()  # the machine is reclaimed

    fresh = lab_factory()
    open_notebook(page, fresh)
    banner = page.locator(".jp-spot-restore")
    expect(banner).to_be_visible(timeout=30_000)
    run_cell(page, 0, "hello-from-cell 42")  # the user runs a cell before deciding
    status = page.locator(".jp-spot-status")
    expect(status).not_to_have_attribute("data-snapshot-id", lost, timeout=30_000)  # the new kernel snapshotted
    assert sessions(fresh)["interrupted"] is True and sessions(fresh)["latest"]["id"] == lost

    open_notebook(page, fresh)  # a reload: the server still offers the lost state
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner.get_by_role("button", name="Discard")).to_be_visible()
    shot(page, "restore-banner-discard")
    banner.get_by_role("button", name="Discard").click()
    expect(banner).to_have_attribute("data-state", "discarded", timeout=SLOW)
    expect(banner.locator(".jp-spot-restore-message")).to_contain_text("no longer offered")
    described = sessions(fresh)
    assert described["interrupted"] is False and described["latest"]["id"] != lost

    count_session_checks(page)
    open_notebook(page, fresh)
    expect(status).to_have_attribute("data-snapshot-id", described["latest"]["id"], timeout=30_000)
    session_checks_done(page)  # the page's answer about the session is in: a banner would be there
    expect(banner).to_have_count(0)  # nothing left to offer

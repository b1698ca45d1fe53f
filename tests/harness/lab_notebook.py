"""One notebook in a real ``jupyter lab``, driven through Chromium: the Lab extension tests' shared setup.

``lab_factory`` starts Lab servers (each its own home and log) on one root dir and store,
with the AWS notice source pointed at the ``imds`` simulator. Test modules import the
fixtures they use from here (``from harness.lab_notebook import imds, lab_factory``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from jupyter_spot.notice.simulator import Simulator

from .notebooks import write_notebook
from .servers import HTTPError, JupyterServer
from .wait import until

NOTEBOOK = "work/analysis.ipynb"
CELLS = (
    'x = 6 * 7\nsecret = f"restored-{x}"\ncountdown = (i for i in range(3))\nprint("hello-from-cell", x)',
    'y = [x] * 3\nprint("second-cell", len(y))',
)
#: Screenshot names end in the front end: docs/lab.md shows each banner as `<name>-lab` and `<name>-notebook7`.
SHOT_SUFFIX = {"lab": "lab", "notebook": "notebook7"}
SLOW = 60_000  # ms: Lab's first load and a kernel start on a busy 2-core machine
expect.set_options(timeout=15_000)  # every other wait: generous for a loaded CI machine


@pytest.fixture
def imds(simulators: Callable[..., Simulator]) -> Simulator:
    return simulators("aws")


@pytest.fixture
def lab_factory(
    spot_env: Path, tmp_path: Path, imds: Simulator, jupyter_servers: Callable[..., JupyterServer]
) -> Callable[..., JupyterServer]:
    """Starts Lab servers (each its own home and log) on one root dir and store, with these plugin settings."""
    root = tmp_path / "root"
    write_notebook(root / NOTEBOOK, *CELLS)
    count = itertools.count(1)

    def start(**settings: object) -> JupyterServer:
        lab = jupyter_servers(
            f"lab-{next(count)}", root, lab=True, env=imds.env, poll=0.5,
            options=["--SpotApp.gc_interval=0"], spot_settings=settings,
        )
        return lab.start()

    return start


def notebook_url(lab: JupyterServer, front_end: str) -> str:
    """The notebook in Lab (``lab``) or in Notebook 7's notebook page (``notebook``), which Lab's server serves too."""
    return lab.lab_url(NOTEBOOK) if front_end == "lab" else f"{lab.url}notebooks/{NOTEBOOK}?token={lab.token}"


def idle_kernels(lab: JupyterServer) -> list[dict]:
    """The server's idle kernels. jupyter_server answers 500 while it lists a kernel still starting
    (``kernel_model`` reads its ``last_activity`` before it is set): that is "none idle yet"."""
    try:
        kernels = lab.api("api/kernels")
    except HTTPError as error:
        if "GET api/kernels: 500 " in str(error):
            return []
        raise
    return [k for k in kernels if k["execution_state"] == "idle"]


def open_in(page: Page, lab: JupyterServer, front_end: str) -> None:
    """Open the notebook in Lab or Notebook 7 and wait until its kernel is idle (asked of the server)."""
    page.goto(notebook_url(lab, front_end), timeout=SLOW)
    expect(page.locator(".jp-NotebookPanel .jp-Cell").first).to_be_visible(timeout=SLOW)
    until(lambda: idle_kernels(lab), 90, "an idle kernel", interval=0.2, describe=lab.log)


def open_notebook(page: Page, lab: JupyterServer) -> None:
    """Open the notebook and wait until its kernel is idle."""
    page.goto(lab.lab_url(NOTEBOOK), timeout=SLOW)
    expect(page.locator(".jp-NotebookPanel .jp-Cell").first).to_be_visible(timeout=SLOW)
    expect(page.get_by_role("button", name=re.compile(r"\| Idle$"))).to_be_visible(timeout=SLOW)


def cell(page: Page, index: int) -> Locator:
    return page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(index)


def run_cell(page: Page, index: int, expected_output: str) -> None:
    """Run cell ``index`` with Shift+Enter; fails the test unless it shows ``expected_output``."""
    cell(page, index).locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    expect(cell(page, index).locator(".jp-OutputArea-output")).to_contain_text(expected_output, timeout=SLOW)


#: Counts the page's questions about a notebook's session (``GET jupyter-spot/api/sessions?path=…``,
#: what decides the restore banner): how many it sent, and how many it has handled, bumped in a task
#: queued once an answer's body is read, so every ``await`` chained on that answer (the banner's
#: decision included) has run before the count moves. Installed before Lab's own scripts load.
_SESSION_CHECKS = """
(() => {
  const original = window.fetch;
  const checks = (window.__spotSessionChecks = { sent: 0, handled: 0 });
  const handled = () => setTimeout(() => checks.handled++, 0);
  window.fetch = function (input, init) {
    const answer = original.apply(this, arguments);
    if (!String(typeof input === 'string' ? input : input.url).includes('/jupyter-spot/api/sessions?path=')) {
      return answer;
    }
    checks.sent++;
    return answer.then(
      response => {
        const text = response.text.bind(response);
        response.text = () => text().finally(handled);
        return response;
      },
      error => {
        handled();
        throw error;
      }
    );
  };
})();
"""


def count_session_checks(page: Page) -> None:
    """From the next page load on, count the page's session checks (see :func:`session_checks_done`)."""
    page.add_init_script(_SESSION_CHECKS)


def session_checks_done(page: Page) -> None:
    """Once :func:`open_notebook` returned: wait until the page has handled every session check it sent.

    Lab asks about the notebook's session as soon as its file is loaded, before its kernel can
    start, so by then the check that decides the restore banner was sent; once it is handled, a
    banner that is not there will not come (a negative the test can then assert)."""
    sent = page.evaluate("window.__spotSessionChecks.sent")
    assert sent >= 1, "the page never asked the server about the notebook's session"
    page.wait_for_function(f"window.__spotSessionChecks.handled >= {sent}", timeout=SLOW)

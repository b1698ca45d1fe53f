"""``jupyter spot run``: SIGKILLed mid-notebook, run again, it resumes — real kernels, a real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from harness import until

pytestmark = pytest.mark.timeout(180)

SPOT = [sys.executable, "-c", "from jupyter_spot.cli import main; main()"]

CELLS = [
    ("markdown", "# A batch job"),
    (
        "code",
        "import os, random, time\nimport numpy as np\nrandom.seed(7)\nrng = np.random.default_rng(3)\n"
        "data = rng.normal(size=1000)\nlog = lambda name: open('executions.log', 'a').write(name + '\\n')\n"
        "log('load')",
    ),
    ("code", "log('clean')\ntotal = float(data.sum())\nprint(round(total, 6), random.random())"),
    (
        "code",
        "log('train')\nopen('train-started', 'w').close()\ntime.sleep(float(os.environ.get('SLOW', '0')))\n"
        "weights = data[:10] * 2",
    ),
    ("code", "log('report')\nprint(weights.round(4).tolist(), random.random(), rng.integers(100))\ntotal"),
]


def make_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        for kind, src in CELLS
    ]
    nbformat.write(nb, path)


def run(directory: Path, *args: str, slow: float = 0, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "SLOW": str(slow), "JUPYTER_SPOT_CLOUD": "none"}
    return subprocess.Popen(
        [*SPOT, "run", *args],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def spot_list(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPOT, "list", "--json"], cwd=directory, capture_output=True, text=True, timeout=60, check=True)


def outputs(path: Path) -> list[Any]:
    return [(c.get("execution_count"), c.get("outputs")) for c in nbformat.read(path, as_version=4).cells]


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out + err


def kill_during_train(work: Path) -> None:
    """Run job.ipynb in ``work`` into out.ipynb and SIGKILL the run while its train cell sleeps."""
    first = run(work, "job.ipynb", "-o", "out.ipynb", slow=120)
    try:
        until(
            lambda: (work / "train-started").exists() or first.poll() is not None, 120, "the train cell to start"
        )
        assert first.poll() is None, first.communicate()
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)


def test_killed_run_resumes_without_rerunning_finished_cells(spot_env: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    make_notebook(reference / "job.ipynb")
    finish(run(reference, "job.ipynb", "-o", "done.ipynb"))
    assert (reference / "executions.log").read_text().split() == ["load", "clean", "train", "report"]

    work = tmp_path / "work"
    work.mkdir()
    make_notebook(work / "job.ipynb")
    kill_during_train(work)
    progress = nbformat.read(work / "out.ipynb", as_version=4).metadata["jupyter_spot"]
    assert (progress["completed"], progress["status"]) == (3, "running")  # markdown, load, clean
    (listed,) = json.loads(spot_list(work).stdout)["sessions"]
    assert listed["id"] == "job.ipynb" and listed["interrupted"] is True
    assert listed["latest"]["id"] == progress["snapshot"] and "did not finish" in listed["reason"]

    log = finish(run(work, "job.ipynb", "-o", "out.ipynb"))
    assert "resuming job.ipynb at cell 4 of 5" in log
    assert "executed 2 cell(s)" in log
    # Finished cells ran once; the cell that was killed mid-way ran again, as it must.
    assert (work / "executions.log").read_text().split() == ["load", "clean", "train", "train", "report"]
    assert outputs(work / "out.ipynb") == outputs(reference / "done.ipynb")
    final = nbformat.read(work / "out.ipynb", as_version=4).metadata["jupyter_spot"]
    assert (final["completed"], final["status"]) == (5, "done")
    (listed,) = json.loads(spot_list(work).stdout)["sessions"]
    assert (listed["interrupted"], listed["reason"]) == (False, None)  # a finished run is closed cleanly


def test_notebook_changed_since_a_killed_run_starts_over(spot_env: Path, tmp_path: Path) -> None:
    make_notebook(tmp_path / "job.ipynb")
    kill_during_train(tmp_path)
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).metadata["jupyter_spot"]["completed"] == 3
    nb = nbformat.read(tmp_path / "job.ipynb", as_version=4)
    nb.cells[2].source = nb.cells[2].source.replace("log('clean')", "log('clean v2')")  # a finished cell changed
    nbformat.write(nb, tmp_path / "job.ipynb")
    log = finish(run(tmp_path, "job.ipynb", "-o", "out.ipynb"))
    assert "resuming" not in log and "executed 4 cell(s)" in log
    # every cell ran again, the changed one as it is now
    assert (tmp_path / "executions.log").read_text().split() == ["load", "clean", "train", "load", "clean", "v2", "train", "report"]
    final = nbformat.read(tmp_path / "out.ipynb", as_version=4).metadata["jupyter_spot"]
    assert (final["completed"], final["status"]) == (5, "done")


def test_finished_run_starts_over(spot_env: Path, tmp_path: Path) -> None:
    make_notebook(tmp_path / "job.ipynb")
    finish(run(tmp_path, "job.ipynb"))  # in place, as papermill writes outputs into the notebook
    assert nbformat.read(tmp_path / "job.ipynb", as_version=4).metadata["jupyter_spot"]["status"] == "done"
    again = finish(run(tmp_path, "job.ipynb"))
    assert "resuming" not in again and "executed 4 cell(s)" in again
    assert (tmp_path / "executions.log").read_text().split() == ["load", "clean", "train", "report"] * 2


def test_failing_cell_stops_with_outputs_kept(spot_env: Path, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1\nprint('ok')"), nbformat.v4.new_code_cell("1 / 0")]
    nbformat.write(nb, tmp_path / "bad.ipynb")
    proc = run(tmp_path, "bad.ipynb", "-o", "out.ipynb")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "ZeroDivisionError" in err and "out.ipynb" in err
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[0].outputs[0]["text"] == "ok\n"
    assert (out.metadata["jupyter_spot"]["completed"], out.metadata["jupyter_spot"]["status"]) == (1, "failed")
    nb.cells[1].source = "print(x + 1)"  # fixed: the rerun resumes at it, with x restored
    nbformat.write(nb, tmp_path / "bad.ipynb")
    log = finish(run(tmp_path, "bad.ipynb", "-o", "out.ipynb"))
    assert "resuming bad.ipynb at cell 2 of 2" in log
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[1].outputs[0]["text"] == "2\n"
    missing = run(tmp_path, "nope.ipynb")
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 2 and "no notebook nope.ipynb" in err

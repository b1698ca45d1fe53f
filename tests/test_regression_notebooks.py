"""Issue 2's promise, notebook by notebook: cut anywhere, kill -9, restore, continue.

Every cell must print what it printed in one uninterrupted run, and keep its
execution count (shifted by the cells the test itself adds). The only exception:
a cell that uses an object no snapshot can hold (a generator, an open file, a DB
cursor) — and then the restore report must name that object and the cell that
made it.

For every cut k, kernel A runs cells 1..k and is SIGKILLed; a fresh kernel B runs
``%spot restore latest`` and cells k+1..n. Two ways of making A's state durable:

- ``auto``: per-cell snapshots only; A is killed once ``%spot status`` says
  nothing is pending.
- ``explicit``: A turns automatic snapshots off after ``%load_ext`` and runs
  ``%spot snapshot`` after cell k, which must return only once it is durable; A
  is killed right after it returns.

Both ``%spot`` lines run outside the history, so execution counts match the
uninterrupted run's.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import CellResult, FaultPause, Kernel, Notebook, restored_execution_count, snapshot_line

from jupyter_spot.store import open_store

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: Uninterrupted runs, one per notebook per test process (both modes compare with it).
_REFERENCES: dict[str, list[CellResult]] = {}

pytestmark = [pytest.mark.faults]


@dataclass
class Mismatch:
    cut: int
    cell: int
    expected: CellResult
    got: CellResult

    def __str__(self) -> str:
        return (
            f"cut after cell {self.cut}, cell {self.cell} (In [{self.got.execution_count}]):\n"
            f"  expected: {self.expected.text!r}\n  got:      {self.got.text!r}\n  stderr: {self.got.stderr[-800:]!r}"
        )


def reference_run(nb: Notebook, cwd: Path) -> list[CellResult]:
    """The notebook run once without interruption (in this test's store and signing key)."""
    if nb.name not in _REFERENCES:
        with Kernel(cwd, f"{nb.name}-reference") as kernel:
            reference = [kernel.execute(code) for code in nb.cells]
        errors = [(i, r.error) for i, r in enumerate(reference, start=1) if r.error]
        assert not errors, f"the uninterrupted run failed: {errors}"
        assert all(r.text for r in reference[1:]), "every cell after the first prints something to compare"
        _REFERENCES[nb.name] = reference
    return _REFERENCES[nb.name]


def restore(kernel: Kernel) -> str:
    """What a user does in a fresh kernel: load the extension, restore the latest snapshot (two cells)."""
    for code in ("%load_ext jupyter_spot", "%spot restore latest"):
        result = kernel.execute(code)
        assert result.error is None, f"{code}: {result.error}\n{result.stderr}"
    return result.text


def check_named(report: str, name: str, cell: int, cut: int) -> None:
    """The report lists ``name`` as not restored, with the cell that created it."""
    line = next((x for x in report.splitlines() if x.startswith(f"not restored: {name} ")), None)
    assert line, f"cut {cut}: the report does not name {name}:\n{report}"
    assert f"created in cell {cell}" in line, f"cut {cut}: the report does not say cell {cell} made {name}:\n{report}"


def compare(nb: Notebook, number: int, got: CellResult, shift: int, lost: set[str], cut: int) -> list[Mismatch]:
    """Cell ``number``'s output against the reference, unless it uses an object that was lost."""
    if lost & set(nb.uses.get(number, [])):
        return []  # uses an object the report named as not restored
    expected = _REFERENCES[nb.name][number - 1]
    if (got.text, got.execution_count) != (expected.text, expected.execution_count + shift):
        return [Mismatch(cut, number, expected, got)]
    return []


def interrupted_run(nb: Notebook, cut: int, before: Kernel, after: Kernel, mode: str) -> list[Mismatch]:
    """Kill ``before`` after cell ``cut`` once its state is durable; restore in ``after``, run the rest."""
    reference = _REFERENCES[nb.name]
    try:
        ran = [before.execute(nb.cells[0])]
        if mode == "explicit":
            before.spot("off")  # only the explicit snapshot below saves anything
        ran += [before.execute(code) for code in nb.cells[1:cut]]
        assert [r.text for r in ran] == [r.text for r in reference[:cut]], "the run before the cut diverged"
        if mode == "explicit":
            line = before.spot("snapshot")
            assert not snapshot_line(line)["pending"], line
        else:
            before.wait_until_durable()
    finally:
        before.kill()

    report = restore(after)
    if cut == 1 and mode == "auto":
        # only %load_ext ran: an empty namespace is never snapshotted automatically (it
        # would hide a session's real latest snapshot), so there is nothing to restore —
        # and the restore cell itself takes a number.
        assert "has no snapshots" in report, report
        shift = 1
    else:
        assert restored_execution_count(report) == cut, report
        shift = 0
    lost = nb.unstorable_at(cut)
    for name in lost:
        check_named(report, name, nb.unstorable[name], cut)
    mismatches = []
    for number in range(cut + 1, len(nb.cells) + 1):
        mismatches += compare(nb, number, after.execute(nb.cells[number - 1]), shift, lost, cut)
    return mismatches


@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_cut_restores(path: Path, mode: str, spot_env: Path, tmp_path: Path) -> None:
    nb = Notebook.read(path)
    assert 6 <= len(nb.cells) <= 10 and nb.cells[0].strip() == "%load_ext jupyter_spot"
    cuts = range(1, len(nb.cells))

    def pair(cut: int) -> tuple[Kernel, Kernel]:
        """Kernel A and kernel B of one cut: same session and directory, booting now."""
        session, cwd = f"{nb.name}-{mode}-cut{cut}", tmp_path / f"cut{cut}"
        first = kernels.enter_context(Kernel(cwd, session))
        return first, kernels.enter_context(Kernel(cwd, session))

    with ExitStack() as kernels:
        booting = pair(cuts[0])
        reference_run(nb, tmp_path / "reference")
        mismatches = []
        for cut in cuts:
            before, after = booting
            if cut + 1 in cuts:  # the next cut's kernels boot while this one works
                booting = pair(cut + 1)
            mismatches += interrupted_run(nb, cut, before, after, mode)
            after.close()
    assert not mismatches, "\n".join(map(str, mismatches))


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


def test_unchanged_big_arrays_are_not_written_again(spot_env: Path, tmp_path: Path) -> None:
    """After 300 MB of arrays are durable, cells touching small things add only kilobytes."""
    nb = Notebook.read(Path(__file__).parent.parent / "notebooks" / "big_namespace.ipynb")
    with Kernel(tmp_path, "big") as kernel:
        for code in nb.cells[:4]:
            assert kernel.execute(code).error is None
        kernel.wait_until_durable()
        before = store_bytes(spot_env)
        # 300 MB are in the snapshot; the store holds less: `ones` is one 4 MiB chunk repeated, stored once
        assert kernel.value("__import__('jupyter_spot').status()['last_snapshot']['size']") > 300_000_000
        assert 200_000_000 < before < 300_000_000, before
        assert kernel.execute(nb.cells[4]).error is None  # stats["runs"] += 1
        line = kernel.spot("snapshot")
        kernel.wait_until_durable()
        grown = store_bytes(spot_env) - before
    assert grown < 256 * 2**10, f"a small change wrote {grown} bytes: {line}"


#: Cells 3..6 each make 100 MB of new data; the kill comes right after cell 6 returns.
PENDING_CELLS = [
    "%load_ext jupyter_spot",
    "import numpy as np\nmarker = 2\nhistory = [2]\nparts = {2: np.full(1_000, 2.0)}",
    *(
        f"marker = {j}\nhistory.append({j})\nparts[{j}] = np.full(12_500_000, {j}.0)"
        for j in range(3, 7)
    ),
]


def test_kill_with_writes_pending_restores_one_whole_earlier_cell(spot_env: Path, tmp_path: Path) -> None:
    pause = FaultPause(tmp_path / "faults", "blob-write", hit="5")
    # Every write goes through the background writer, which holds at its 5th blob from cell 3 on
    # (in cell 4's snapshot): the kill finds writes pending, on a fast machine as on a slow one.
    with Kernel(tmp_path, "pending", extra_arguments=["--SpotSettings.background_threshold=0"]) as kernel:
        for code in PENDING_CELLS[:2]:
            assert kernel.execute(code).error is None
        kernel.wait_until_durable()
        faults = pause.env["JUPYTER_SPOT_FAULTS"]
        kernel.execute(f"import os\nos.environ['JUPYTER_SPOT_FAULTS'] = {faults!r}", store_history=False)
        for code in PENDING_CELLS[2:]:
            assert kernel.execute(code).error is None
        assert pause.reached("blob-write") == kernel.pid
        assert kernel.pending_writes() > 0
        kernel.kill()

    latest, problems = open_store(str(spot_env)).latest_manifest("pending")
    assert latest is not None and not problems, problems
    with Kernel(tmp_path, "pending") as kernel:
        report = restore(kernel)
        cell = restored_execution_count(report)
        assert latest["id"] in report and latest["execution_count"] == cell, report
        assert 2 <= cell <= 6, report
        state = kernel.execute(
            "print(marker, history, sorted(parts), all(bool((v == k).all()) for k, v in parts.items()))",
            store_history=False,
        )
    print(f"killed with writes pending after cell 6: restored the state after cell {cell}")
    # exactly the namespace after cell `cell`: no later cell's data, no earlier cell's missing
    expected = list(range(2, cell + 1))
    assert state.text == f"{cell} {expected} {expected} True\n", (report, state)

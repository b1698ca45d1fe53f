"""Declare-then-modify: in-place changes made after a variable was first
snapshotted must reach the next incremental (automatic) snapshot.

Kernel A declares each object in one cell and changes it in place in a later
cell — never rebinding the name — with only the automatic per-cell snapshots.
Kernel B, a new process, restores the latest snapshot and must see every change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Kernel, snapshot_line

DECLARE = [
    "import numpy as np\nimport pandas as pd\nfrom dataclasses import dataclass, field\n"
    "from sklearn.linear_model import LinearRegression",
    "arr = np.zeros(50_000)\nview = arr[1000:2000]\nstrided = arr[::10]\nmatrix = np.arange(12.0).reshape(3, 4)",
    "df = pd.DataFrame({'x': np.arange(1000), 'y': np.linspace(0, 1, 1000)})",
    "est = LinearRegression()\nX = np.arange(20.0).reshape(10, 2)\ny = X @ np.array([2.0, -1.0]) + 0.5",
    "d = {'k': [1]}\nlst = [1, 2]\ns = {1}\nnested = [{'deep': {'deeper': []}}]",
    "@dataclass\nclass Point:\n    x: float\n    tags: list = field(default_factory=list)\np = Point(1.0)",
    "counter = []\ndef bump(n):\n    counter.extend(range(n))",
    "shared = np.ones(10)\nalias = shared\nholder = {'a': shared}",
]

MODIFY = [
    "arr[0] = 7.0",
    "arr += 1",
    "view[0] = -5.0  # writes into arr through the view",
    "strided[1] = 42.0",
    "matrix[1, :] = 0",
    "df.loc[3, 'x'] = 999",
    "df['z'] = df['x'] * 2",
    "df.drop(columns=['y'], inplace=True)",
    "est.fit(X, y)",
    "d['k'].append(2)\nd['new'] = 'v'",
    "lst.append(3)",
    "s.add(2)",
    "nested[0]['deep']['deeper'].append('x')",
    "p.x = 5.5",
    "p.tags.append('moved')",
    "bump(3)  # a notebook function mutates a global the cell never names",
    "alias[2] = 9.0  # through one alias; the others see it",
]

SUMMARY = (
    "(float(arr[0]), float(arr[5]), float(arr[1000]), float(arr[10]), float(arr.sum()), "
    "np.shares_memory(arr, view), np.shares_memory(arr, strided), matrix.tolist(), "
    "int(df.loc[3, 'x']), list(df.columns), int(df['z'].sum()), "
    "[round(float(c), 6) for c in est.coef_], round(float(est.intercept_), 6), "
    "d, lst, sorted(s), nested, p.x, p.tags, isinstance(p, Point), counter, "
    "alias is shared, holder['a'] is shared, float(holder['a'][2]))"
)


@pytest.fixture
def session(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "declare-modify.ipynb")
    return "declare-modify.ipynb"


def test_in_place_changes_survive_incremental_snapshots(session: str) -> None:
    with Kernel(load=True) as kernel:
        for cell in DECLARE + MODIFY:
            kernel.run(cell)
        kernel.wait_until_durable()
        kernel.run("%spot off")  # the summary cell must not be what B restores
        expected = kernel.value(SUMMARY)
        listing = kernel.run("%spot list")
    assert "explicit" not in listing  # only automatic, incremental snapshots were taken
    assert expected[0] == 8.0 and expected[2] == -5.0 and expected[3] == 42.0  # the changes happened in A
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert f"state after cell {1 + len(DECLARE) + len(MODIFY)}" in report
        assert fresh.value(SUMMARY) == expected
        # and the restored objects still behave like the originals
        fresh.run("view[1] = 3.0\nstrided[2] = 4.0")
        assert fresh.value("(float(arr[1001]), float(arr[20]))") == (3.0, 4.0)
        assert fresh.value("round(float(est.predict(np.array([[2.0, 3.0]]))[0]), 6)") == 1.5


def test_untouched_groups_are_not_rewritten(session: str) -> None:
    """A cell that changes one small value rewrites only that value's bytes."""
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nbig = np.random.default_rng(0).random(2_000_000)\nsmall = 1")
        kernel.wait_until_durable()
        kernel.run("%spot off")
        kernel.run("small = 2")
        line = kernel.run("%spot snapshot")
        snapshot_line(line)
        assert ": 1 stored, 1 unchanged, 0 skipped;" in line
        written = line.split("skipped; ")[1].split(" written")[0]
        assert written.endswith(" B"), line  # bytes, not the 16 MB array
        kernel.run("big[0] = -1.0")
        line = kernel.run("%spot snapshot")
        # one 4 MiB chunk of the 16 MB array (issue 12); it rewrote the whole array before chunks
        assert ": 1 stored, 1 unchanged, 0 skipped;" in line and "4.2 MB written" in line


def test_changes_made_while_snapshots_were_off_reach_the_next_one(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("items = [1]\nother = 0")
        kernel.run("%spot off")
        kernel.run("items.append(2)")
        kernel.run("%spot on")
        kernel.run("other = 1  # does not mention items")
    with Kernel(load=True) as fresh:
        fresh.run("%spot restore")
        assert fresh.value("(items, other)") == ([1, 2], 1)

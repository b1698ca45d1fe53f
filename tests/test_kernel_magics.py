"""The %spot magics and the Python API, in real kernels sharing one store."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from harness import SNAPSHOT_LINE, Kernel, snapshot_line, until


@pytest.fixture
def session(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "magics.ipynb")
    return "magics.ipynb"


def test_snapshot_status_list_and_restore_in_a_new_kernel(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nimport os.path as osp\nbig = np.arange(200_000)\nnote = 'hello'")
        line = kernel.run("%spot snapshot").strip()
        match = SNAPSHOT_LINE.match(line)
        assert match, line
        assert (match["stored"], match["skipped"]) == ("0", "0")  # the auto snapshot after cell 2 stored both
        assert match["unchanged"] == "2"
        status = kernel.run("%spot status")
        assert f"session: {session}" in status
        assert "auto-snapshot: on" in status
        assert "\npending: 0\n" in status
        listing = kernel.run("%spot list")
        assert match["id"] in listing and "explicit" in listing and "after cell 3" in listing
        kernel.run("note = 'changed after the snapshot'")
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore latest")
        assert "restored snapshot" in report and "state after cell 6" in report
        fresh.run("pass")
        assert fresh.last_execution_count == 7  # continues where the old kernel stopped
        assert fresh.value("(note, int(big.sum()), osp.join('a', 'b'))") == ("changed after the snapshot", 19999900000, "a/b")
        specific = fresh.run(f"%spot restore {match['id']}")
        assert match["id"] in specific and "state after cell 3" in specific
        assert fresh.value("note") == "hello"


def test_snapshot_line_counts_stored_unchanged_and_skipped(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("%spot off")
        kernel.run("a = [1, 2]\nb = {'k': 1}\ngen = (i for i in range(3))")
        first = SNAPSHOT_LINE.match(kernel.run("%spot snapshot").strip())
        assert first and (first["stored"], first["unchanged"], first["skipped"]) == ("2", "0", "1")
        kernel.run("a.append(3)")
        second = SNAPSHOT_LINE.match(kernel.run("%spot snapshot").strip())
        assert second and (second["stored"], second["unchanged"], second["skipped"]) == ("1", "1", "1")
        assert second["id"] > first["id"]


def test_off_on_and_exclude(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("x = 1")
        assert "automatic snapshots off" in kernel.run("%spot off")
        count = kernel.run("%spot list").count("auto")
        kernel.run("x = 2")
        kernel.run("x = 3")
        assert kernel.run("%spot list").count("auto") == count
        assert "auto-snapshot: off" in kernel.run("%spot status")
        kernel.run("%spot on")
        assert "not snapshotting password" in kernel.run("%spot exclude password")
        kernel.run("password = 'hunter2'\nx = 4")
        assert kernel.run("%spot list").count("auto") == count + 1
        assert "excluded: password" in kernel.run("%spot status")
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "not restored: password (str) — excluded with %spot exclude" in report
        assert fresh.value("x") == 4
        assert fresh.value("'password' in globals()") is False
        assert "excluded: password" in fresh.run("%spot status")  # the restored kernel keeps excluding it


def test_gc_keeps_the_newest_snapshots(session: str) -> None:
    with Kernel(load=True) as kernel:
        for value in range(4):
            kernel.run(f"import numpy as np\nv{value} = np.full(100_000, {value})")
        kernel.run("%spot off")
        ids = re.findall(r"^  (\S+)  ", kernel.run("%spot list"), re.M)
        assert len(ids) == 4
        output = kernel.run("%spot gc --keep 2")
        assert output.startswith("deleted 2 snapshot(s)")
        assert re.findall(r"^  (\S+)  ", kernel.run("%spot list"), re.M) == ids[-2:]
        assert "needs N >= 1" in kernel.run("%spot gc --keep 0", allow_error=True)


def test_python_api_and_after_restore_hooks(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run(
            "import jupyter_spot\n"
            "calls = []\n"
            "@jupyter_spot.after_restore\n"
            "def reconnect(report):\n"
            "    global connected_to\n"
            "    connected_to = report.snapshot_id\n"
            "@jupyter_spot.after_restore\n"
            "def reseed():\n"
            "    calls.append('reseed')\n"
        )
        result = kernel.run("r = jupyter_spot.snapshot()\nprint(r.durable, r.kind, r.to_dict()['id'])").split()
        assert result[:2] == ["True", "explicit"]
        status = kernel.value("{k: v for k, v in jupyter_spot.status().items() if k in ('pending_snapshots', 'pending_blobs', 'session')}")
        assert status == {"pending_snapshots": 0, "pending_blobs": 0, "session": session}
    with Kernel() as fresh:
        output = fresh.run("import jupyter_spot\nreport = jupyter_spot.restore()\nprint(report.ok, report.snapshot_id)")
        ok, snapshot_id = output.split()
        assert ok == "True" and snapshot_id >= result[2]
        assert fresh.value("connected_to") == snapshot_id  # the hook is a restored notebook function
        assert fresh.value("calls") == ["reseed"]
        assert fresh.value("sorted(report.to_dict())")[:3] == ["during_cell", "error", "execution_count"]


def test_mid_cell_flush_from_a_signal_handler_and_clean_restore(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run(
            "import os, signal, jupyter_spot\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print(jupyter_spot.flush('test notice')))"
        )
        kernel.run("stage = 'clean'")
        kernel.run("%spot off")  # as if the kernel died right after the flush: no snapshot after the cell
        output = kernel.run("stage = 'half done'\nos.kill(os.getpid(), signal.SIGUSR1)\nstage = 'finished'")
        assert re.search(r"snapshot \S+: .* written", output), output
        listing = kernel.run("%spot list")
        assert "mid-cell  during cell 5" in listing
    with Kernel(load=True) as fresh:
        fresh.run("%spot off")  # the checks below must not add clean snapshots of their own
        report = fresh.run("%spot restore")
        assert "mid-cell" in report and "`%spot restore --clean`" in report
        assert fresh.value("stage") == "half done"
        clean = fresh.run("%spot restore --clean")
        assert "state after cell 3" in clean
        assert fresh.value("stage") == "clean"


def test_mid_cell_flush_then_kill_keeps_what_the_running_cell_changed(session: str) -> None:
    with Kernel(load=True) as kernel:
        kernel.run(
            "import os, signal, time, jupyter_spot\nimport numpy as np\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print(jupyter_spot.flush('test notice'), flush=True))\n"
            "weights = np.zeros(300_000)\nuntouched = list(range(10))"
        )
        cell = kernel.start("weights[:10] = 1.5\nos.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(120)")
        flushed = kernel.output_of(cell, until_idle=False, until_printed="written", timeout=60)
        assert ": 1 stored, 1 unchanged, 0 skipped;" in flushed  # only the running cell's names were re-checked
        kernel.kill()  # while the cell is still sleeping
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "taken while cell 3 was running (mid-cell)" in report
        assert fresh.value("(float(weights.sum()), untouched)") == (15.0, list(range(10)))


def test_restore_continues_random_streams_and_environment(session: str, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    with Kernel(load=True) as kernel:
        kernel.run(
            "import os, sys, random\nimport numpy as np\n"
            f"os.chdir({str(workdir)!r})\n"
            "sys.path.append('/opt/notebook-libs')\n"
            "os.environ['MY_SETTING'] = 'on'\n"
            "random.seed(7); np.random.seed(8)\n"
            "first = (random.random(), float(np.random.rand()))"
        )
        kernel.run("%spot off")  # the latest snapshot is the state before the next draws
        expected = kernel.value("(random.random(), float(np.random.rand()))")
    with Kernel(load=True) as fresh:
        fresh.run("%spot restore")
        assert fresh.value("(random.random(), float(np.random.rand()))") == expected
        assert fresh.value("os.getcwd()") == str(workdir)
        assert fresh.value("'/opt/notebook-libs' in sys.path") is True
        assert fresh.value("os.environ.get('MY_SETTING')") == "on"


def test_restore_without_snapshots_says_so(session: str) -> None:
    with Kernel(load=True) as kernel:
        assert "session 'magics.ipynb' has no snapshots" in kernel.run("%spot restore")
        kernel.run("x = 1")
        assert "session 'magics.ipynb' has no snapshot 'nope'" in kernel.run("%spot restore nope")
        assert "session 'other.ipynb' has no snapshots" in kernel.run("%spot restore --session other.ipynb")
        assert "invalid choice" in kernel.run("%spot frobnicate", allow_error=True)
        assert kernel.value("x") == 1


NOTEBOOK_CODE = '''
import enum, functools
from dataclasses import dataclass
square = lambda x: x * x
def inc(x):
    global calls
    calls = calls + 1
    return x + 1
calls = 0
also_inc = inc
class Box:
    __slots__ = ("v",)
    def __init__(self, v): self.v = v
old_box = Box(1)
class Box:  # redefined: old_box keeps the old class
    def __init__(self, v): self.v = v * 10
new_box = Box(2)
class Color(enum.Enum):
    RED = 1
favourite = Color.RED
def make_adder(n):
    def add(x): return x + n
    return add
add3 = make_adder(3)
@functools.lru_cache
def cached(x): return x * 2
partial_inc = functools.partial(inc, 10)
@dataclass(frozen=True)
class Key:
    a: int
by_key = {Key(1): "one"}
'''

CODE_CHECK = (
    "(square(3), also_inc is inc, inc(1), calls, type(old_box).__name__, old_box.v, new_box.v, "
    "isinstance(new_box, Box), favourite is Color.RED, add3(1), cached(4), partial_inc(), by_key[Key(1)])"
)


def test_notebook_defined_code_survives_restore(session: str) -> None:
    with Kernel(load=True) as kernel:
        output = kernel.run(NOTEBOOK_CODE)
        assert output == ""  # no pickling warnings leak into the cell's output
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "not restored" not in report, report
        # `inc` updates the restored global `calls`; enums and lru_cache come back from their source
        assert fresh.value(CODE_CHECK) == (9, True, 2, 1, "Box", 1, 20, True, True, 4, 8, 11, "one")
        snapshot_line(fresh.run("%spot snapshot"))  # restored definitions snapshot again
    with Kernel(load=True) as third:
        assert "not restored" not in third.run("%spot restore")
        assert third.value("(favourite is Color.RED, cached(5), calls)") == (True, 10, 2)


def test_restore_from_another_session(session: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("shared_result = {'accuracy': 0.93}")
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "other.ipynb")
    with Kernel(load=True) as other:
        assert "auto      after cell 2" in other.run(f"%spot list --session {session}")
        report = other.run(f"%spot restore latest --session {session}")
        assert f"of session '{session}'" in report
        assert other.value("shared_result") == {"accuracy": 0.93}
        other.run("extra = 1")
        assert "session: other.ipynb" in other.run("%spot status")  # it keeps writing its own session
        assert "after cell" in other.run("%spot list")


def test_keep_retention_never_deletes_the_last_clean_snapshot(session: str) -> None:
    """`keep=2` with mid-cell flushes piling up: the two newest stay, and so does the last clean
    snapshot, which `%spot restore --clean` needs."""
    with Kernel(load=True, extra_arguments=["--SpotSettings.keep=2"]) as kernel:
        kernel.run(
            "import os, signal, jupyter_spot\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print(jupyter_spot.flush('test notice')))"
        )
        kernel.run("%spot off")
        kernel.run("stage = 'clean'")
        clean = snapshot_line(kernel.run("%spot snapshot"))["id"]
        flushed = []
        for step in range(3):
            output = kernel.run(f"stage = 'mid {step}'\nos.kill(os.getpid(), signal.SIGUSR1)")
            flushed.append(snapshot_line(output)["id"])
        # retention runs on the writer thread just after each commit
        until(
            lambda: re.findall(r"^  (\S+)  ", kernel.run("%spot list"), re.M) == [clean, *flushed[1:]],
            60,
            "retention to keep the clean snapshot and the two newest",
        )
    with Kernel(load=True) as fresh:
        fresh.run("%spot off")
        assert "mid-cell" in fresh.run("%spot restore")
        assert fresh.value("stage") == "mid 2"
        fresh.run("%spot restore --clean")
        assert fresh.value("stage") == "clean"


def test_without_a_signing_key_setting_a_private_key_file_is_made_and_used(
    session: str, spot_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No $JUPYTER_SPOT_SIGNING_KEY: the first kernel creates the per-user key file (mode 0600,
    under the Jupyter data dir); the next kernel signs and verifies with the same file."""
    monkeypatch.delenv("JUPYTER_SPOT_SIGNING_KEY")
    key_file = Path(os.environ["JUPYTER_DATA_DIR"]) / "jupyter_spot" / "signing.key"
    assert not key_file.exists()
    with Kernel(load=True) as kernel:
        kernel.run("answer = 42")
        snapshot_line(kernel.run("%spot snapshot"))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes().strip()) == 64
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "restored snapshot" in report and "not signed" not in report, report
        assert fresh.value("answer") == 42

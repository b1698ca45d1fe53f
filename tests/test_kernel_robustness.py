"""Bad input loses nothing: unpicklable objects, an unwritable store, damaged
snapshots, manifests signed by someone else, a kill while writes are pending."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from harness import FaultPause, Kernel, snapshot_line

from jupyter_spot import faults
from jupyter_spot.kernel.identity import content_key
from jupyter_spot.kernel.results import SnapshotResult
from jupyter_spot.kernel.writer import Job, Writer
from jupyter_spot.store import FileStore, ManifestSigner, digest_of

SESSION = "robust.ipynb"


@pytest.fixture
def store(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> FileStore:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return FileStore(spot_env)


def test_unpicklable_objects_are_skipped_and_reported_with_their_cell(store: FileStore, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("line 1\nline 2\n")
    with Kernel(load=True) as kernel:
        kernel.run("import sqlite3, threading\nrows = [1, 2, 3]")
        kernel.run("gen = (r * 2 for r in rows)")
        kernel.run(f"handle = open({str(data)!r})\nfirst = handle.readline()")
        kernel.run("conn = sqlite3.connect(':memory:')\nholder = {'conn': conn, 'rows': rows}")
        kernel.run("lock = threading.Lock()")
        assert snapshot_line(kernel.run("%spot snapshot"))["skipped"] == "4"
        assert kernel.value("first") == "line 1\n"  # the file was not touched by the snapshot
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "not restored: gen (generator) — builtins.generator: generator or coroutine" in report
        assert "created in cell 3: gen = (r * 2 for r in rows)" in report
        assert "not restored: handle (_io.TextIOWrapper) — _io.TextIOWrapper: open file or stream" in report
        assert "created in cell 4: handle = open(" in report
        assert "not restored: conn (sqlite3.Connection)" in report and "created in cell 5: conn = sqlite3" in report
        assert "not restored: holder (dict)" in report  # it holds the connection
        assert fresh.value("(rows, first, type(lock).__name__)") == ([1, 2, 3], "line 1\n", "lock")
        assert data.read_text() == "line 1\nline 2\n"  # restoring never reopened (or truncated) the file


def test_unwritable_store_warns_once_and_the_kernel_keeps_working(
    spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("this is a file, so nothing can be created under it, not even by root")
    monkeypatch.setenv("JUPYTER_SPOT_STORE", str(not_a_dir / "store"))
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    with Kernel() as kernel:
        outputs = [kernel.run("%load_ext jupyter_spot")]
        outputs += [kernel.run(f"x = {i}\nprint('ran', x)") for i in range(3)]
        warnings = sum(output.count("jupyter-spot:") for output in outputs)
        assert warnings == 1, outputs
        assert "snapshots cannot be written" in outputs[0] and "Not a directory" in outputs[0]
        assert [o.strip().splitlines()[-1] for o in outputs[1:]] == ["ran 0", "ran 1", "ran 2"]
        explicit = kernel.run("%spot snapshot")
        assert explicit.startswith("snapshot failed: ") and str(not_a_dir) in explicit
        assert "last error: " in kernel.run("%spot status")
        assert kernel.value("x") == 2


def _snapshot_two_states(kernel: Kernel) -> tuple[str, str]:
    kernel.run("%spot off")
    kernel.run("import numpy as np\nx = 1")
    first = snapshot_line(kernel.run("%spot snapshot"))["id"]
    kernel.run("x = 2\nbig = np.arange(300_000)")
    second = snapshot_line(kernel.run("%spot snapshot"))["id"]
    return first, second


def test_corrupt_blob_falls_back_to_the_previous_snapshot(store: FileStore) -> None:
    with Kernel(load=True) as kernel:
        first, second = _snapshot_two_states(kernel)
    only_second = set(store.load_manifest(SESSION, second)["blobs"]) - set(store.load_manifest(SESSION, first)["blobs"])
    victim = max(only_second, key=lambda digest: store._blob_path(digest).stat().st_size)
    path = store._blob_path(victim)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert f"fallback: snapshot {second} cannot be used: blob {victim[:12]}" in report
        assert "is corrupt" in report
        assert f"fell back to snapshot {first} (state after cell 4)" in report
        assert fresh.value("(x, 'big' in globals())") == (1, False)


def test_truncated_manifest_falls_back_to_the_previous_snapshot(store: FileStore) -> None:
    with Kernel(load=True) as kernel:
        first, second = _snapshot_two_states(kernel)
    manifest = store._manifest_path(SESSION, second)
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    with Kernel(load=True) as fresh:
        report = fresh.run(f"%spot restore {second}")
        assert f"snapshot {second} cannot be used: snapshot {second} of session '{SESSION}': manifest is truncated" in report
        assert f"fell back to snapshot {first}" in report
        assert fresh.value("x") == 1


def test_manifest_signed_with_another_key_is_refused(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("secret_plan = 'pickles execute code'")
    monkeypatch.setenv("JUPYTER_SPOT_SIGNING_KEY", "somebody-elses-key")
    with Kernel(load=True) as other:
        report = other.run("%spot restore")
        assert "manifest is not signed by this machine's key ($JUPYTER_SPOT_SIGNING_KEY); refusing to unpickle it" in report
        assert "restore failed: no usable snapshot" in report
        assert other.value("'secret_plan' in globals()") is False


@pytest.mark.faults
def test_kill_with_writes_pending_restores_an_earlier_consistent_snapshot(store: FileStore, tmp_path: Path) -> None:
    pause = FaultPause(tmp_path / "faults", "blob-write")
    # Everything goes through the background writer, as big data does by default.
    with Kernel(load=True, extra_arguments=["--SpotSettings.background_threshold=0"]) as kernel:
        kernel.run("import os\nimport numpy as np\nmarker = 'before'")
        kernel.wait_until_durable()
        # From this cell on, the writer stops at its first blob until the test lets it go: never.
        kernel.run(
            "marker = 'after'\nbig = np.random.default_rng(1).random(40_000_000)\n"
            f"os.environ['JUPYTER_SPOT_FAULTS'] = {pause.env['JUPYTER_SPOT_FAULTS']!r}"
        )
        assert pause.reached("blob-write") == kernel.pid
        status = kernel.run("%spot status")
        assert kernel.pending_writes() > 0 and "MB)" in status, status  # 320 MB still being written
        kernel.kill()
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore")
        assert "state after cell 2" in report
        assert fresh.value("(marker, 'big' in globals())") == ("before", False)


def test_a_blob_failing_beside_others_stops_the_commit_and_is_not_believed_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stores a snapshot's blobs several at a time: one that fails (the disk
    fails on the second) must still leave no manifest behind, and the next snapshot
    must write it again."""
    store = FileStore(tmp_path / "store", signer=ManifestSigner(b"unit-test-key"))
    blobs = [(content_key(data), data) for data in (os.urandom(size) for size in [3 << 20, 2 << 20, 1 << 20, 100, 200])]
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(faults.ENV, "blob-write=raise@2")

    durable: dict[str, str] = {}
    writer = Writer(store, durable, on_commit=lambda manifest: None, parent=None)

    def snapshot(snapshot_id: str) -> SnapshotResult:
        result = SnapshotResult(id=snapshot_id, session="nb", kind="explicit", execution_count=1)
        job = Job(result=result, blobs=list(blobs),
                  build_manifest=lambda known: {"session": "nb", "id": snapshot_id, "blobs": sorted(known.values())})
        writer.submit(job)
        assert writer.wait(job, deadline=time.monotonic() + 60)
        return result

    failed = snapshot("20261129T000001.000000Z-aaaa")
    assert "injected fault at blob-write" in (failed.error or "") and not failed.durable
    assert store.list_snapshots("nb") == [] and len(durable) < len(blobs)
    assert list((store.root / "blobs").rglob("*.tmp")) == []
    assert (writer.pending_blobs, writer.pending_bytes, failed.bytes_pending) == (0, 0, 0)
    stored_before = set(durable)

    monkeypatch.delenv(faults.ENV)
    done = snapshot("20261129T000002.000000Z-bbbb")
    assert done.durable and done.error is None and store.list_snapshots("nb") == ["20261129T000002.000000Z-bbbb"]
    assert durable == {key: digest_of(data) for key, data in blobs}
    assert done.bytes_written == sum(len(data) for key, data in blobs if key not in stored_before)

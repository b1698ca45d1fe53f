"""Chunked buffers in real kernels: a change costs the chunks it touched, and every
boundary case restores exactly — the last partial chunk, sizes that are a multiple of
the chunk size, views across chunk edges, arrays that shrink and grow, big bytes,
a frame gaining a column, a damaged chunk, GC of chunks two snapshots share, and
snapshots written before chunks existed.

The kernels use 128 KiB chunks (``--SpotSettings.chunk_size``) so the data stays small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from harness import FaultPause, Kernel, snapshot_line, until
from harness.store import commit_snapshot

from jupyter_spot.kernel import serialize
from jupyter_spot.kernel.chunks import entry_digests
from jupyter_spot.store import FileStore, StoreError, collect_garbage, digest_of

SESSION = "chunks.ipynb"
CHUNK = 128 << 10
CHUNKED = [f"--SpotSettings.chunk_size={CHUNK}"]
#: 100 000 float64: six full chunks and a last one of 13 568 bytes.
ARRAY = "import numpy as np\nimport pandas as pd\na = np.arange(100_000, dtype=np.float64)"


@pytest.fixture
def store(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> FileStore:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return FileStore(spot_env)


def chunked_kernel(**options: Any) -> Kernel:
    """A kernel with small chunks and automatic snapshots off: the test says when to snapshot."""
    kernel = Kernel(load=True, extra_arguments=options.pop("extra_arguments", CHUNKED), **options)
    kernel.run("%spot off")
    return kernel


def snapshot(kernel: Kernel) -> str:
    return snapshot_line(kernel.run("%spot snapshot"))["id"]


def new_blob_sizes(store: FileStore, before: str, after: str) -> list[int]:
    """Sizes of the buffer blobs (chunks) snapshot ``after`` names that ``before`` did not: what it
    wrote besides its groups' small pickles."""
    old = set(store.load_manifest(SESSION, before)["blobs"])
    groups = store.load_manifest(SESSION, after)["groups"].values()
    new = {digest for group in groups for entry in group["buffers"] for digest in entry_digests(entry)} - old
    return sorted(store._blob_path(digest).stat().st_size for digest in new)


def buffer_entries(store: FileStore, snapshot_id: str, name: str) -> list[Any]:
    groups = store.load_manifest(SESSION, snapshot_id)["groups"].values()
    return next(group["buffers"] for group in groups if name in group["names"])


def numbers(kernel: Kernel, expression: str) -> tuple[float, ...]:
    """A tuple of numbers (numpy scalars included) computed in the kernel, as floats."""
    return tuple(kernel.value(f"tuple(float(x) for x in ({expression}))"))


def restored(snapshot_id: str | None = None, extra_arguments: list[str] = CHUNKED) -> Kernel:
    kernel = Kernel(load=True, extra_arguments=extra_arguments)
    report = kernel.run(f"%spot restore {snapshot_id or ''}")
    assert "restored snapshot" in report and "fallback" not in report, report
    return kernel


def test_a_change_in_the_last_partial_chunk_writes_that_chunk_only(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY)
        first = snapshot(kernel)
        kernel.run("a[-1] = -1")
        second = snapshot(kernel)
    assert buffer_entries(store, first, "a")[0]["size"] == 800_000
    assert len(buffer_entries(store, first, "a")[0]["chunks"]) == 7
    assert new_blob_sizes(store, first, second) == [800_000 - 6 * CHUNK]
    with restored() as fresh:
        assert numbers(fresh, "a[-1], a[-2], a[:-1].sum(), a.flags.writeable") == (-1, 99_998, 4_999_950_000 - 99_999, 1)


def test_an_array_of_whole_chunks_changed_at_a_chunk_edge(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run("import numpy as np\na = np.arange(8 * 16384, dtype=np.float64)")  # exactly 8 chunks
        first = snapshot(kernel)
        kernel.run("a[3 * 16384] = -1")  # the first element of the fourth chunk
        second = snapshot(kernel)
    entry = buffer_entries(store, first, "a")[0]
    assert (entry["size"], entry["chunk_size"], len(entry["chunks"])) == (8 * CHUNK, CHUNK, 8)
    assert new_blob_sizes(store, first, second) == [CHUNK]
    with restored() as fresh:
        assert numbers(fresh, "a[3 * 16384], a[3 * 16384 - 1], a[-1], len(a)") == (-1, 49151, 131071, 131072)


def test_views_across_chunk_edges_still_share_memory_after_restore(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY + "\nv = a[16000:17000]\ngrid = a[:98304].reshape(6, 16384)\ncolumn = grid[:, 16383]")
        snapshot(kernel)
    with restored() as fresh:
        fresh.run("v[384] = -5\ncolumn[2] = -7")  # v[384] is a[16384], the first element of the second chunk
        assert numbers(fresh, "a[16384], a[2 * 16384 + 16383], grid[2, 16383]") == (-5, -7, -7)
        assert fresh.value("bool(np.shares_memory(a, v) and np.shares_memory(a, column))") is True


def test_shrinking_and_growing_arrays_reuse_their_unchanged_chunks(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY)
        full = snapshot(kernel)
        kernel.run("a = a[:50_000].copy()")
        shrunk = snapshot(kernel)
        kernel.run("a = np.concatenate([a, np.arange(50_000, 120_000, dtype=np.float64)])")
        grown = snapshot(kernel)
    # 50 000 float64 = three whole chunks, stored already, and a new last one
    assert new_blob_sizes(store, full, shrunk) == [400_000 - 3 * CHUNK]
    # the first six chunks are the original array's; only the last two are new
    assert new_blob_sizes(store, full, grown) == [960_000 - 7 * CHUNK, CHUNK]
    for snapshot_id, length in ((full, 100_000), (shrunk, 50_000), (grown, 120_000)):
        with restored(snapshot_id) as fresh:
            assert numbers(fresh, "len(a), (a == np.arange(len(a))).all()") == (length, 1)


def test_big_bytes_and_bytearrays_are_chunked_and_keep_their_identity(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run("data = bytes(range(256)) * 2000\nbuf = bytearray(data)\nholder = {'buf': buf, 'again': buf}")
        first = snapshot(kernel)
        kernel.run("buf[-1] = 7")
        second = snapshot(kernel)
    assert [len(entry["chunks"]) for entry in buffer_entries(store, first, "buf")] == [4]
    assert [len(entry["chunks"]) for entry in buffer_entries(store, first, "data")] == [4]
    assert new_blob_sizes(store, first, second) == [512_000 - 3 * CHUNK]
    with restored() as fresh:
        assert fresh.value("(type(data).__name__, type(buf).__name__, holder['buf'] is buf is holder['again'])") == (
            "bytes", "bytearray", True)
        assert fresh.value("(buf[-1], buf[:-1] == data[:-1], data == bytes(range(256)) * 2000)") == (7, True, True)


def test_a_frame_gaining_a_column_writes_about_that_column(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY + "\ndf = pd.DataFrame({f'c{i}': np.arange(40_000, dtype=np.float64) + i for i in range(10)})")
        first = snapshot(kernel)
        kernel.run("df['extra'] = np.arange(40_000, dtype=np.float64) * 3")
        second = snapshot(kernel)
    column = 40_000 * 8
    written = new_blob_sizes(store, first, second)
    assert column <= sum(written) <= column + CHUNK, written  # the new column, rounded up to chunks
    with restored() as fresh:
        assert fresh.value("(list(df.columns)[-1], float(df['extra'].iloc[-1]), float(df['c9'].sum()))") == (
            "extra", 119_997.0, float(sum(range(40_000)) + 9 * 40_000))


def test_equal_buffers_do_not_share_memory_after_restore(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run("import numpy as np\nbig1 = np.zeros(100_000)\nbig2 = np.zeros(100_000)\n"
                   "small1 = np.zeros(10_000)\nsmall2 = np.zeros(10_000)\npair = [np.ones(10_000), np.ones(10_000)]")
        snapshot(kernel)
    with restored() as fresh:
        fresh.run("big1[0] = 1\nbig1[-1] = 1\nsmall1[0] = 1\npair[0][0] = 5")
        assert numbers(fresh, "big2[0], big2[-1], big1[16384], small2[0], pair[1][0]") == (0, 0, 0, 0, 1)


def test_a_corrupt_chunk_is_refused_before_anything_is_unpickled(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY + "\nx = 1")
        first = snapshot(kernel)
        # loud unpickles as a call to print: if any of the second snapshot were unpickled, it would show
        kernel.run("class Loud:\n    def __reduce__(self):\n        return (print, ('UNPICKLED',))\n"
                   "loud = Loud()\nx = 2\na[-1] = -1")
        second = snapshot(kernel)
    (victim,) = set(store.load_manifest(SESSION, second)["blobs"]) & set(buffer_entries(store, second, "a")[0]["chunks"]) - set(
        store.load_manifest(SESSION, first)["blobs"])
    path = store._blob_path(victim)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with Kernel(load=True, extra_arguments=CHUNKED) as fresh:
        report = fresh.run("%spot restore")
        assert f"fallback: snapshot {second} cannot be used: blob {victim[:12]}" in report and "is corrupt" in report
        assert f"fell back to snapshot {first}" in report and "UNPICKLED" not in report
        assert numbers(fresh, "x, a[-1], 'loud' in globals()") == (1, 99_999, 0)
    store.delete_snapshot(SESSION, first)
    with Kernel(load=True, extra_arguments=CHUNKED) as fresh:
        fresh.run("%spot off\nmine = 'kept'")
        report = fresh.run("%spot restore")
        assert "restore failed: no usable snapshot" in report and "is corrupt" in report and "UNPICKLED" not in report
        assert fresh.value("(mine, 'a' in globals(), 'x' in globals())") == ("kept", False, False)


def test_gc_keeps_chunks_another_snapshot_still_names(store: FileStore) -> None:
    with chunked_kernel() as kernel:
        kernel.run(ARRAY)
        first = snapshot(kernel)
        kernel.run("a[0] = -1")
        second = snapshot(kernel)
    first_blobs = set(store.load_manifest(SESSION, first)["blobs"])
    second_blobs = set(store.load_manifest(SESSION, second)["blobs"])
    assert len(first_blobs & second_blobs) >= 6  # the six unchanged chunks (and the array's pickle)
    store.delete_snapshot(SESSION, first)
    report = collect_garbage(store, keep=5, session=SESSION, grace_seconds=0)
    assert report.blobs_deleted == len(first_blobs - second_blobs) == 1  # the old first chunk
    assert all(store.has_blob(digest) for digest in second_blobs)
    with restored() as fresh:
        assert numbers(fresh, "a[0], a[1], a[-1]") == (-1, 1, 99_999)


def test_a_snapshot_written_before_chunks_still_restores(store: FileStore) -> None:
    """A format-1 manifest, as the code before chunks committed it: every buffer one blob."""
    import numpy as np

    pickled = serialize.dump({"old": np.arange(100_000, dtype=np.float64)}, {})
    assert [buffer.nbytes for buffer in pickled.buffers] == [800_000]
    digests = [digest_of(pickled.payload), *(digest_of(buffer) for buffer in pickled.buffers)]
    for digest, data in zip(digests, [pickled.payload, *pickled.buffers]):
        store.put_blob(digest, data)
    group = {"names": ["old"], "serializer": "pickle", "definition": False, "blob": digests[0],
             "buffers": digests[1:], "size": pickled.size}
    commit_snapshot(store, SESSION, 1, groups={"g0": group}, blobs=digests, skipped={},
                    variables={"old": {"group": "g0", "type": "numpy.ndarray", "size": pickled.size, "cell": 1}})
    assert "manifest_format" not in json.loads(json.loads(store._read_manifest(SESSION, store.list_snapshots(SESSION)[0]))["body"])
    with restored() as fresh:
        assert numbers(fresh, "len(old), old[-1], old.flags.writeable") == (100_000, 99_999, 1)


def test_snapshots_with_chunks_off_and_on_restore_in_either_kernel(store: FileStore) -> None:
    with chunked_kernel(extra_arguments=["--SpotSettings.chunk_size=0"]) as kernel:
        kernel.run(ARRAY)
        whole = snapshot(kernel)
    assert [type(entry).__name__ for entry in buffer_entries(store, whole, "a")] == ["str"]
    with restored(extra_arguments=CHUNKED) as fresh:
        assert numbers(fresh, "a.sum(),") == (4_999_950_000,)
        fresh.run("a[5] = -5")
        chunked = snapshot(fresh)
    assert len(buffer_entries(store, chunked, "a")[0]["chunks"]) == 7
    with restored(chunked, extra_arguments=["--SpotSettings.chunk_size=0"]) as fresh:
        assert numbers(fresh, "a[5], a[6]") == (-5, 6)


@pytest.mark.faults
def test_a_notice_flush_goes_before_snapshots_still_being_written(store: FileStore, tmp_path: Path) -> None:
    """A mid-cell flush supersedes a background snapshot held at its first chunk: that one
    writes no further chunk and never commits; the flush commits the newest state after the
    last committed one, writing the chunks it needs, and restores."""
    pause = FaultPause(tmp_path / "faults", "blob-write", "flush-queued")
    with Kernel(load=True, extra_arguments=[*CHUNKED, "--SpotSettings.background_threshold=0"]) as kernel:
        kernel.run("import os, numpy as np\nimport jupyter_spot\nmarker = 'before'")
        kernel.wait_until_durable()
        before = kernel.value("jupyter_spot.status()['last_committed']")
        # this cell's automatic snapshot is written in the background, and held at its first chunk
        kernel.run(f"big = np.arange(1_000_000, dtype=np.float64)\nos.environ['JUPYTER_SPOT_FAULTS'] = "
                   f"{pause.env['JUPYTER_SPOT_FAULTS']!r}")
        assert pause.reached("blob-write") == kernel.pid
        held = kernel.value("jupyter_spot.status()['last_snapshot']['id']")
        cell = kernel.start("big[-1] = -1\nmarker = 'flushed'\nprint(jupyter_spot.flush('test notice'))")
        assert pause.reached("flush-queued") == kernel.pid  # the flush is queued; the held snapshot still holds
        pause.release("blob-write")
        pause.release("flush-queued")
        printed = kernel.output_of(cell, timeout=120)
        flushed = snapshot_line(printed)["id"]
    ids = store.list_snapshots(SESSION)
    assert held not in ids and flushed in ids, (held, flushed, ids)
    manifest = store.load_manifest(SESSION, flushed)
    assert manifest["parent"] == before and manifest["during_cell"] is not None
    # the held snapshot wrote one chunk at most; the flush wrote the rest of the new state
    chunk_blobs = {d for d in store.iter_blobs()} - set(store.load_manifest(SESSION, before)["blobs"])
    assert len(chunk_blobs - set(manifest["blobs"])) <= 1
    with restored() as fresh:
        assert fresh.value("marker") == "flushed"
        assert numbers(fresh, "big[-1], big[-2], len(big)") == (-1, 999_998, 1_000_000)


@pytest.mark.faults
def test_a_background_write_copies_only_the_changed_chunk(store: FileStore, tmp_path: Path) -> None:
    pause = FaultPause(tmp_path / "faults", "blob-write")
    with Kernel(load=True, extra_arguments=[*CHUNKED, "--SpotSettings.background_threshold=0"]) as kernel:
        kernel.run(ARRAY + "\nimport os, jupyter_spot")
        kernel.wait_until_durable()
        kernel.run(f"a[5] = -5\nos.environ['JUPYTER_SPOT_FAULTS'] = {pause.env['JUPYTER_SPOT_FAULTS']!r}")
        assert pause.reached("blob-write") == kernel.pid  # held while writing its copy of the changed chunk
        assert kernel.value("jupyter_spot.status()['pending_bytes']") == CHUNK
        kernel.run("a[6] = -6")  # the copy is the writer's own: changing the array again does not touch it
        pause.release("blob-write")
        kernel.wait_until_durable()
        first_change = store.list_snapshots(SESSION)[-2]
    with restored(first_change) as fresh:
        assert numbers(fresh, "a[5], a[6]") == (-5, 6)


@pytest.mark.parametrize("chunk_size", [8192, 5000])  # whole pages: mapped in place; else read in place
def test_chunks_are_put_in_place_and_verified(store: FileStore, chunk_size: int) -> None:
    from jupyter_spot.kernel.chunks import read_snapshot

    data = os.urandom(3 * chunk_size + 123)
    pieces = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    digests = [store.add_blob(piece)[0] for piece in pieces]
    payload = store.add_blob(b"payload")[0]
    entry = {"size": len(data), "chunk_size": chunk_size, "chunks": digests}
    manifest = {"id": "x", "manifest_format": 2,
                "groups": {"g0": {"blob": payload, "buffers": [entry, entry]}}}
    read = read_snapshot(store, manifest)
    first, second = read.buffers("g0", manifest["groups"]["g0"])
    assert bytes(first) == bytes(second) == data
    memoryview(first)[0] ^= 0xFF  # writable, and the two are not one buffer
    assert bytes(second) == data and store.get_blob(digests[0]) == pieces[0]
    path = store._blob_path(digests[2])
    path.write_bytes(pieces[2][:-1] + bytes([pieces[2][-1] ^ 1]))
    with pytest.raises(StoreError, match=f"blob {digests[2][:12]} .* is corrupt"):
        read_snapshot(store, manifest)
    path.unlink()
    with pytest.raises(StoreError, match=f"blob {digests[2][:12]} is missing"):
        read_snapshot(store, manifest)
    manifest["manifest_format"] = 3
    with pytest.raises(StoreError, match="written by a newer jupyter-spot"):
        read_snapshot(store, manifest)


def test_an_explicit_snapshot_still_finds_a_change_no_cell_named(store: FileStore) -> None:
    """``%spot snapshot`` re-checks every variable: a group whose plain pickle hashes as
    before is not pickled again, and one changed behind the tracking's back is."""
    with chunked_kernel() as kernel:
        kernel.run(ARRAY + "\nrows = [{'i': i, 'name': f'row-{i}'} for i in range(20_000)]\nx = 1")
        assert snapshot_line(kernel.run("%spot snapshot"))["stored"] == "3"
        assert snapshot_line(kernel.run("%spot snapshot"))["unchanged"] == "3"  # fingerprints match
        kernel.run("get_ipython().user_ns['ro' + 'ws'][5]['i'] = -5\nget_ipython().user_ns['a'][7] = -7")  # names neither
        line = snapshot_line(kernel.run("%spot snapshot"))
        assert (line["stored"], line["unchanged"]) == ("2", "1")  # rows and a; x unchanged
    with restored() as fresh:
        assert numbers(fresh, "rows[5]['i'], rows[6]['i'], a[7], x") == (-5, 6, -7, 1)


def test_an_explicit_snapshot_pickles_again_what_a_cell_named(store: FileStore) -> None:
    """A fingerprint sees contents, not sharing: two equal dicts a cell made one object hash as
    before, so a group a cell named since the last snapshot is pickled again, as an automatic
    snapshot would, and comes back shared."""
    with chunked_kernel() as kernel:
        kernel.run("rows = [{'k': 1}, {'k': 1}]\nx = 1")
        assert snapshot_line(kernel.run("%spot snapshot"))["stored"] == "2"
        kernel.run("rows[1] = rows[0]")
        line = snapshot_line(kernel.run("%spot snapshot"))
        assert (line["stored"], line["unchanged"]) == ("1", "1")
    with restored() as fresh:
        assert numbers(fresh, "rows[0] is rows[1], x") == (1, 1)


def test_a_fingerprint_gives_up_on_cycles_and_on_what_sharing_would_blow_up() -> None:
    """A memo-less pickle writes a shared object out each time: past its limit, or on a cycle,
    the fingerprint says it cannot tell (and the group is pickled again) instead of growing."""
    blob = bytes(2 << 20)
    assert serialize.fingerprint({"shared": [blob] * 500}, 16 << 20) is None  # 1 GB written out otherwise
    assert serialize.fingerprint({"shared": [blob] * 5}, 16 << 20) is not None
    cycle: list[Any] = []
    cycle.append(cycle)
    assert serialize.fingerprint({"cycle": cycle}, 16 << 20) is None
    rows = [{"i": i} for i in range(1000)]
    same = serialize.fingerprint({"rows": rows}, 16 << 20)
    assert same == serialize.fingerprint({"rows": [{"i": i} for i in range(1000)]}, 16 << 20)
    rows[999]["i"] = -1
    assert serialize.fingerprint({"rows": rows}, 16 << 20) != same


@pytest.mark.faults
def test_a_flush_past_its_deadline_never_stores_what_the_cell_changed_after(store: FileStore, tmp_path: Path) -> None:
    """A notice's flush that misses its deadline returns, and the interrupted cell goes on changing
    an array the writer has not read yet. No snapshot may then hold a state that never was, and no
    chunk may be believed stored under content it no longer has: the next snapshot of that very
    content would name the wrong bytes, and restore them without a word."""
    pause = FaultPause(tmp_path / "faults", "blob-write")
    with chunked_kernel() as kernel:
        kernel.run("import os, hashlib, numpy as np, jupyter_spot\nfrom datetime import datetime, timedelta, timezone\n"
                   "a = np.random.default_rng(0).integers(0, 1 << 40, 2_000_000)  # 123 chunks: two of the store's batches\n"
                   "def digest():\n    return hashlib.sha256(a.tobytes()).hexdigest()")
        snapshot(kernel)
        kernel.run(f"a += 1\nflushed_state = digest()\nos.environ['JUPYTER_SPOT_FAULTS'] = "
                   f"{pause.env['JUPYTER_SPOT_FAULTS']!r}")
        flushed_state = kernel.value("flushed_state")
        cell = kernel.start("r = jupyter_spot.flush('test notice', datetime.now(timezone.utc) + timedelta(seconds=2))\n"
                            "a += 1\nprint('flush:', r.id, r.durable, r.error)")
        assert pause.reached("blob-write") == kernel.pid
        printed = kernel.output_of(cell, timeout=60)  # back after its deadline, the write still held
        assert "deadline passed" in printed, printed
        flush_id = printed.split("flush: ")[1].split()[0]
        pause.release("blob-write")
        kernel.run("os.environ.pop('JUPYTER_SPOT_FAULTS')")
        kernel.wait_until_durable()
        kernel.run("a -= 1\nassert digest() == flushed_state")  # the state the flush saw, once more
        latest = snapshot(kernel)
    with restored(latest) as fresh:
        assert fresh.value("digest()") == flushed_state
    assert flush_id not in store.list_snapshots(SESSION)  # abandoned, not committed from changed memory


@pytest.mark.faults
def test_an_array_another_thread_changes_while_it_is_written_is_never_stored_under_its_old_content(
    store: FileStore, tmp_path: Path
) -> None:
    """A thread of the user's changes a chunk after the snapshot hashed it and before the writer
    read it. That chunk's bytes are not what its content key says: believing them stored under
    it would let every later chunk with the old content (zeros, a value set back) name them."""
    pause = FaultPause(tmp_path / "faults", "blob-write")
    meddled = tmp_path / "meddled"
    with chunked_kernel() as kernel:
        kernel.run("import os, time, hashlib, threading, pathlib, numpy as np\n"
                   "a = np.random.default_rng(0).integers(0, 1 << 40, 2_000_000)  # two of the store's batches\n"
                   "original = a[1_500_000:1_500_010].copy()  # in a chunk of the second batch\n"
                   "def digest():\n    return hashlib.sha256(a.tobytes()).hexdigest()\n"
                   "def meddle():\n"
                   f"    while not pathlib.Path({str(pause.folder)!r}, 'blob-write.reached').exists():\n"
                   "        time.sleep(0.01)\n"
                   "    a[1_500_000:1_500_010] = -7\n"
                   f"    pathlib.Path({str(meddled)!r}).touch()\n"
                   "threading.Thread(target=meddle, daemon=True).start()\n"
                   f"os.environ['JUPYTER_SPOT_FAULTS'] = {pause.env['JUPYTER_SPOT_FAULTS']!r}")
        cell = kernel.start("%spot snapshot")
        assert pause.reached("blob-write") == kernel.pid
        until(meddled.exists, 30, "the kernel's thread to change the array")
        pause.release("blob-write")
        printed = kernel.output_of(cell, timeout=60)
        assert "changed while it was being written" in printed, printed
        kernel.run("os.environ.pop('JUPYTER_SPOT_FAULTS')\na[1_500_000:1_500_010] = original")
        state = kernel.value("digest()")
        latest = snapshot(kernel)
    with restored(latest) as fresh:
        assert fresh.value("digest()") == state

"""GC and commits never disagree about which blobs exist, on every store (issue 9 §2).

Real parts only: kernels through tests/harness (``harness.Kernel``), moto's standalone server
for S3 (the run's ``moto``/``s3_url`` fixtures), collectors run as they run in production
(``collect_garbage``), and faults.py points to stop a writer or a collector at an exact step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import FaultPause, Kernel, snapshot_line, until
from harness.s3 import RequestLog

from jupyter_spot.store import FileStore, Store, StoreError, collect_garbage, digest_of, open_store
from jupyter_spot.store.s3 import S3Store

SESSION = "consistency.ipynb"
BIG_LIST = "list(range(100000))"


@pytest.fixture(params=["dir", "s3", "tiered"])
def kernel_store(request: pytest.FixtureRequest, spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """The store a kernel of this test writes to (through the environment), opened here as a collector."""
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    if request.param == "dir":
        yield FileStore(spot_env)
        return
    url = request.getfixturevalue("s3_url")
    monkeypatch.setenv("JUPYTER_SPOT_STORE", url)
    if request.param == "s3":
        store = S3Store(url)
        yield store
        store.close()
        return
    cache = spot_env.parent / "cache"
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(cache))
    store = open_store(url, cache=str(cache))
    yield store
    store.close()  # type: ignore[attr-defined]


def dangling(store: Store) -> list[str]:
    """Committed snapshots that name a blob the store lacks (for a tiered store: either tier)."""
    tiers = [store.fast, store.durable] if hasattr(store, "fast") else [store]
    found = []
    for tier in tiers:
        for session in tier.list_sessions():
            for snapshot_id in tier.list_snapshots(session):
                blobs = tier.load_manifest(session, snapshot_id)["blobs"]
                missing = [digest[:12] for digest in blobs if not tier.has_blob(digest)]
                if missing:
                    found.append(f"{tier.url} {session}/{snapshot_id} lacks {missing}")
    return found


def settle(kernel: Kernel) -> None:
    """The kernel's tiered store has sent every snapshot to S3 (nothing to wait for on the others)."""
    out = kernel.run(
        "print('not replicated:', getattr(__import__('jupyter_spot.kernel.extension', fromlist=['x']).current().store, "
        "'flush_replication', lambda deadline: [])(__import__('time').time() + 60))"
    )
    assert "not replicated: []" in out, out


def restores_big_list() -> None:
    with Kernel(load=True) as fresh:
        report = fresh.run("%spot restore latest")
        assert "restored snapshot" in report and "fallback" not in report, report
        assert fresh.value(f"data == {BIG_LIST}") is True


# -- 1. a kernel's known blobs and a collection in between ----------------------------
def test_value_that_comes_back_after_gc_is_written_again(kernel_store: Store) -> None:
    with Kernel(load=True) as kernel:
        kernel.run("%spot off")
        kernel.run(f"import numpy as np\nsteady = np.arange(2_000_000, dtype='float64')\ndata = {BIG_LIST}")
        snapshot_line(kernel.run("%spot snapshot"))
        kernel.run("data = 0")
        snapshot_line(kernel.run("%spot snapshot"))
        settle(kernel)
        report = collect_garbage(kernel_store, keep=1, grace_seconds=0)
        assert report.blobs_deleted > 0  # the list's blob went: nothing referenced it any more
        kernel.run(f"data = {BIG_LIST}")  # the same value comes back; the kernel believes it is stored
        snapshot_line(kernel.run("%spot snapshot"))  # no error for the user: the blob is written again
        settle(kernel)
        assert dangling(kernel_store) == []
    restores_big_list()
    with Kernel(load=True) as fresh:
        fresh.run("%spot restore latest")
        assert fresh.value("float(steady[-1])") == 1_999_999.0  # what the collection left alone is still there


def test_collection_between_blob_writes_and_commit_is_repaired(
    kernel_store: Store, tmp_path: Path
) -> None:
    """A collector deletes a blob the kernel relies on while its snapshot is on its way:
    the commit notices, the blob is written again, and the snapshot still commits."""
    # A tiered kernel's replication commits to S3 too: each snapshot is settled before
    # the next, so its third own commit is the fifth time the point is reached.
    third_commit = 5 if kernel_store.kind == "tiered" else 3
    # the kernel alone is held at its third commit (this process's collector is not)
    pause = FaultPause(tmp_path / "pauses", "manifest-commit", hit=str(third_commit))
    with Kernel(load=True, env=pause.env) as kernel:
        kernel.run("%spot off")
        kernel.run(f"data = {BIG_LIST}")
        snapshot_line(kernel.run("%spot snapshot"))
        settle(kernel)
        kernel.run("data = 0")
        snapshot_line(kernel.run("%spot snapshot"))
        settle(kernel)
        for snapshot_id in kernel_store.list_snapshots(SESSION)[:-1]:
            kernel_store.delete_snapshot(SESSION, snapshot_id)
        kernel.run(f"data = {BIG_LIST}")
        outcome: list[str] = []
        cell = threading.Thread(target=lambda: outcome.append(kernel.run("%spot snapshot")))
        cell.start()
        assert pause.reached("manifest-commit", 60) == kernel.pid, "the third commit never started"
        report = collect_garbage(kernel_store, keep=1, grace_seconds=0)
        pause.release("manifest-commit")
        cell.join(120)
        assert outcome and "failed" not in outcome[0], outcome
        snapshot_line(outcome[0])
        # S3 defers to the writer's lease; a directory store collects and the commit repairs.
        assert report.blobs_deferred or report.blobs_deleted > 0
        settle(kernel)
        assert dangling(kernel_store) == []
    restores_big_list()


def test_collection_after_the_commit_check_never_leaves_a_dangling_manifest(
    kernel_store: Store, tmp_path: Path
) -> None:
    """The commit checked its blobs; then, before the manifest is written, a collection
    deletes one: the commit notices the collection, and the snapshot is repaired."""
    third_commit = 5 if kernel_store.kind == "tiered" else 3
    # the kernel alone is held at its third commit (this process's collector is not)
    pause = FaultPause(tmp_path / "pauses", "manifest-write", hit=str(third_commit))
    with Kernel(load=True, env=pause.env) as kernel:
        kernel.run("%spot off")
        kernel.run(f"data = {BIG_LIST}")
        snapshot_line(kernel.run("%spot snapshot"))
        settle(kernel)
        kernel.run("data = 0")
        snapshot_line(kernel.run("%spot snapshot"))
        settle(kernel)
        for snapshot_id in kernel_store.list_snapshots(SESSION)[:-1]:
            kernel_store.delete_snapshot(SESSION, snapshot_id)
        kernel.run(f"data = {BIG_LIST}")
        outcome: list[str] = []
        cell = threading.Thread(target=lambda: outcome.append(kernel.run("%spot snapshot")))
        cell.start()
        assert pause.reached("manifest-write", 60) == kernel.pid, "the third commit never got past its check"
        report = collect_garbage(kernel_store, keep=1, grace_seconds=0)
        pause.release("manifest-write")
        cell.join(120)
        assert outcome and "failed" not in outcome[0], outcome
        snapshot_line(outcome[0])
        assert report.blobs_deferred or report.blobs_deleted > 0
        settle(kernel)
        assert dangling(kernel_store) == []
    restores_big_list()


# -- 2. a damaged blob is never "already stored" ---------------------------------------
def test_damaged_blob_is_written_again_not_trusted(spot_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    store = FileStore(spot_env)
    with Kernel(load=True) as kernel:
        kernel.run("%spot off")
        kernel.run(f"data = {BIG_LIST}")
        snapshot_line(kernel.run("%spot snapshot"))
    manifest, _ = store.latest_manifest(SESSION)
    assert manifest is not None
    (digest,) = [group["blob"] for group in manifest["groups"].values() if group["names"] == ["data"]]
    path = spot_env / "blobs" / digest[:2] / digest
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit: same size, wrong bytes
    path.write_bytes(bytes(damaged))

    with Kernel(load=True) as restorer:  # the user is told which blob is damaged, not just "no snapshot"
        out = restorer.run("%spot restore latest")
        assert "corrupt" in out and digest[:12] in out, out
    with Kernel(load=True) as kernel:  # a new kernel computes the same value again
        kernel.run("%spot off")
        kernel.run(f"data = {BIG_LIST}")
        snapshot_line(kernel.run("%spot snapshot"))
    assert bytes(store.get_blob(digest))  # repaired in place: it hashes to its address again
    restores_big_list()


def test_put_blob_replaces_a_damaged_copy_of_the_same_size(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    data = os.urandom(3 << 20)  # above the size that is hashed on a second thread
    digest, written = store.add_blob(data)
    assert written == len(data)
    path = tmp_path / "store" / "blobs" / digest[:2] / digest
    with open(path, "r+b") as handle:
        handle.seek(12345)
        byte = handle.read(1)
        handle.seek(12345)
        handle.write(bytes([byte[0] ^ 0xFF]))
    fresh = FileStore(tmp_path / "store")  # another process: it has not checked this file yet
    assert fresh.put_blob(digest, data) == len(data)
    assert bytes(fresh.get_blob(digest)) == data
    assert fresh.add_blob(data) == (digest, 0)  # verified once, then trusted by size


# -- 3. a dead collector's lock never blocks writers ------------------------------------
def kill_a_collector_mid_deletion(url: str) -> None:
    """A ``jupyter spot gc`` SIGKILLed just before its first deletion: its lock stays behind."""
    code = textwrap.dedent(f"""
        from jupyter_spot.store import collect_garbage
        from jupyter_spot.store.s3 import S3Store
        collect_garbage(S3Store({url!r}), keep=1, grace_seconds=0)
    """)
    env = {**os.environ, "JUPYTER_SPOT_FAULTS": "gc-delete=kill"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()


def locks(url: str, kind: str) -> list[str]:
    store = S3Store(url)
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}locks/{kind}-")
    return [item["Key"] for item in listing.get("Contents", [])]


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)  # daemon: a hung writer must not hang the suite
    thread.start()
    return thread, outcome


def test_dead_collectors_lock_never_blocks_writers(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_spot.store import s3_leases as s3_module

    monkeypatch.setattr(s3_module, "GC_LOCK_SECONDS", 3)  # this writer's view of a collector lock's lifetime
    setup = S3Store(s3_url)
    garbage = b"garbage nobody references"
    setup.put_blob(digest_of(garbage), garbage)
    setup.commit_manifest({"session": SESSION, "id": "0001", "blobs": [digest_of(garbage)]})
    setup.delete_snapshot(SESSION, "0001")
    kill_a_collector_mid_deletion(s3_url)
    assert locks(s3_url, "gc"), "the killed collector should have left its lock"

    writer = S3Store(s3_url)
    data = b"a snapshot's new blob"
    thread, outcome = in_thread(lambda: writer.put_blob(digest_of(data), data))
    thread.join(30)  # the lock is dead after 3 s of S3's clock
    assert not thread.is_alive(), "put_blob is still waiting for a collector that died"
    assert outcome == [len(data)]
    writer.commit_manifest({"session": SESSION, "id": "0002", "blobs": [digest_of(data)]})
    assert S3Store(s3_url).get_blob(digest_of(data)) == data


def test_writer_gives_up_on_a_collector_that_never_yields(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock kept fresh by something that never checks for writers (an old collector, a
    stuck one): the writer fails with a clear error after a bounded wait, never hangs."""
    from jupyter_spot.store import s3_leases as s3_module

    monkeypatch.setattr(s3_module, "GC_WAIT_SECONDS", 3, raising=False)
    holder = S3Store(s3_url)
    key = f"{holder.prefix}locks/gc-stuck"
    stop = threading.Event()

    def keep_fresh() -> None:
        while not stop.is_set():
            holder.client.put_object(Bucket=holder.bucket, Key=key, Body=b"")
            stop.wait(0.5)

    refresher = threading.Thread(target=keep_fresh, daemon=True)
    refresher.start()
    try:
        until(lambda: locks(s3_url, "gc"), 30, "the stuck collector's lock")
        writer = S3Store(s3_url)
        thread, outcome = in_thread(lambda: writer.put_blob(digest_of(b"x"), b"x"))
        thread.join(30)
        assert not thread.is_alive(), "put_blob waits forever for a collector that never yields"
    finally:
        stop.set()
        refresher.join()
    (error,) = outcome
    assert isinstance(error, StoreError)
    assert "gc-stuck" in str(error) and "garbage collect" in str(error), error


# -- 4. a writer waits about a second, however many manifests the collector reads ------------
def test_collector_notices_a_writer_during_its_reference_scan(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = S3Store(s3_url)
    shared = b"a blob every snapshot names"
    setup.put_blob(digest_of(shared), shared)
    manifests = 150
    for number in range(manifests):
        setup.commit_manifest({"session": f"nb{number % 10}.ipynb", "id": f"{number:04d}", "blobs": [digest_of(shared)]})
    # Each manifest read costs the collector at least 20 ms, as on a real bucket: 3 s in all.
    monkeypatch.setenv("JUPYTER_SPOT_FAULTS", "gc-scan=sleep:0.02@1+")
    collector = S3Store(s3_url)
    requests = RequestLog(collector.client)
    thread, outcome = in_thread(lambda: collect_garbage(collector, keep=manifests, grace_seconds=0))

    def collector_locked() -> list[str]:
        held = locks(s3_url, "gc")
        assert held or thread.is_alive(), f"the collector ended before it took its lock: {outcome}"
        return held

    until(collector_locked, 60, "the collector's lock", describe=lambda: outcome)
    writer = S3Store(s3_url)
    assert writer.put_blob(digest_of(b"new"), b"new") == 3
    thread.join(60)
    (report,) = outcome
    manifest_reads = sum(1 for op, url, _ in requests.requests if op == "GetObject" and "/sessions/" in url)
    assert manifest_reads < manifests, "the collector read every manifest before it looked for writers"
    assert report.blobs_deferred

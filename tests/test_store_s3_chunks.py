"""Chunks on S3: many small blobs sent and read in parallel, bounded, verified — on moto's server.

A big buffer is stored as a list of chunks, each an ordinary content-addressed blob
(kernel/serialize.py); the kernel's writer stores ``store.blob_workers`` of them at
once and a restore reads them into one allocation with ``read_blob_into``. Here the
store side: what S3 receives, what a damaged chunk gives, what a failed chunk leaves.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from harness import Kernel, snapshot_line, until
from harness.s3 import FaultProxy, MotoServer, RequestLog

from jupyter_spot.store import FileStore, StoreError, digest_of
from jupyter_spot.store.base import CorruptBlobError, MissingBlobError
from jupyter_spot.store.s3 import S3Store
from jupyter_spot.store.tiered import TieredStore

pytestmark = [pytest.mark.s3]

KB = 1 << 10
MB = 1 << 20


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(moto.port)
    yield fault_proxy
    fault_proxy.stop()


def chunks_of(seed: int, count: int, size: int) -> list[bytes]:
    """``count`` distinct chunks of ``size`` bytes: one buffer cut the way the engine cuts it."""
    return [hashlib.sha256(f"{seed}/{i}".encode()).digest() * (size // 32) for i in range(count)]


def store_in_parallel(store: Any, chunks: list[bytes], workers: int | None = None) -> list[str]:
    """What the kernel's writer does with a snapshot's new blobs: ``store.blob_workers``
    threads calling ``add_blob``; the first failure is raised."""
    with ThreadPoolExecutor(workers or store.blob_workers) as pool:
        return [digest for digest, _ in pool.map(store.add_blob, chunks)]


def read_in_parallel(store: Any, digests: list[str], size: int, workers: int | None = None) -> bytearray:
    """What a restore does: every chunk read straight into its place in one allocation."""
    whole = bytearray(size * len(digests))
    view = memoryview(whole)
    with ThreadPoolExecutor(workers or store.blob_workers) as pool:
        list(pool.map(lambda i: store.read_blob_into(digests[i], view[i * size : (i + 1) * size]), range(len(digests))))
    return whole


def blob_requests(log: RequestLog, operation: str) -> int:
    return sum(1 for op, url, _ in log.requests if op == operation and "/blobs/" in url)


class InFlightGate:
    """Counts the blob requests of ``operation`` a client has in flight at once, through botocore's
    ``before-send`` event (the thread that sends it waits here), and holds each until ``open()``."""

    def __init__(self, client: Any, operation: str) -> None:
        self.inside = self.most = 0
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._event = f"before-send.s3.{operation}"
        client.meta.events.register(self._event, self._hold)

    def _hold(self, request: Any, **_: Any) -> None:
        if "/blobs/" not in request.url:
            return
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            assert self._open.wait(120), "the test never opened the gate"
        finally:
            with self._lock:
                self.inside -= 1

    def open(self) -> None:
        self._open.set()


class FailOneUpload:
    """S3 refuses the upload of one blob (403, which no retry gets past), as a policy or a
    broken part of the network would; every other request goes through."""

    def __init__(self, client: Any, digest: str) -> None:
        self.digest, self.refused = digest, 0
        client.meta.events.register("before-send.s3.PutObject", self._respond)

    def _respond(self, request: Any, **_: Any) -> AWSResponse | None:
        if not request.url.endswith(self.digest):
            return None
        self.refused += 1
        body = b"<Error><Code>AccessDenied</Code><Message>injected</Message></Error>"

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                yield body

        return AWSResponse(request.url, 403, {"Content-Type": "application/xml"}, Raw())


# -- parallel upload and download ------------------------------------------------
def test_many_chunks_sent_in_parallel_all_land_and_read_back_verified(s3_url: str) -> None:
    writer = S3Store(s3_url)
    assert writer.blob_workers == writer.transfer_config.max_concurrency  # as many as may be in flight
    log = RequestLog(writer.client)
    chunks = chunks_of(1, 24, 1536 * KB)  # over the old 1 MiB "ask first" size: no HEAD either way
    digests = store_in_parallel(writer, chunks)
    writer.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": digests})
    assert blob_requests(log, "PutObject") == 24
    assert blob_requests(log, "HeadObject") == 0  # the conditional PUT answers "exists"

    reader = S3Store(s3_url)
    reader_log = RequestLog(reader.client)
    assert read_in_parallel(reader, digests, 1536 * KB) == b"".join(chunks)
    assert blob_requests(reader_log, "GetObject") == 24
    assert blob_requests(reader_log, "HeadObject") == 0  # the GET's own Content-Length says the size

    # Another process sending the same chunks: S3 answers 412 to each, nothing is stored twice.
    again = S3Store(s3_url)
    again_log = RequestLog(again.client)
    with ThreadPoolExecutor(again.blob_workers) as pool:
        assert list(pool.map(lambda data: again.put_blob(digest_of(data), data), chunks)) == [0] * 24
    assert blob_requests(again_log, "HeadObject") == 0


def test_blob_requests_in_flight_never_exceed_the_stores_bound(s3_url: str) -> None:
    """More callers than the bound (a writer, a replication, a restore at once): the store
    itself lets at most ``max_concurrency`` blob requests be in flight."""
    store = S3Store(s3_url, max_concurrency=3)
    store._hold_lease()  # the lease's own requests out of the way
    chunks = chunks_of(2, 12, 64 * KB)
    gate = InFlightGate(store.client, "PutObject")
    started = threading.Semaphore(0)

    def send(data: bytes) -> tuple[str, int]:
        started.release()
        return store.add_blob(data)

    with ThreadPoolExecutor(12) as pool:
        results = pool.map(send, chunks)
        until(lambda: gate.inside >= 3, 60, "three uploads in flight")
        for _ in chunks:
            assert started.acquire(timeout=60), "a caller never started"
        gate.open()
        assert [written for _, written in results] == [64 * KB] * 12
    assert gate.most == 3

    gate = InFlightGate(store.client, "GetObject")
    digests = [digest_of(data) for data in chunks]
    reading = threading.Thread(target=read_in_parallel, args=(store, digests, 64 * KB, 12), daemon=True)
    reading.start()
    until(lambda: gate.inside >= 3, 60, "three downloads in flight")
    gate.open()
    reading.join(60)
    assert gate.most == 3


# -- damage and failure ----------------------------------------------------------
def test_corrupt_truncated_or_missing_chunk_is_refused_with_a_clear_error(s3_url: str) -> None:
    store = S3Store(s3_url)
    good, damaged, short = chunks_of(3, 3, 256 * KB)
    digests = store_in_parallel(store, [good, damaged, short])
    key = store._blob_key
    # Damage at rest: the objects are overwritten behind the store's back (no checksum to stop it).
    store.client.put_object(Bucket=store.bucket, Key=key(digests[1]), Body=b"X" + damaged[1:])
    store.client.put_object(Bucket=store.bucket, Key=key(digests[2]), Body=short[: 100 * KB])

    reader = S3Store(s3_url)
    out = bytearray(256 * KB)
    reader.read_blob_into(digests[0], memoryview(out))
    assert out == good
    with pytest.raises(CorruptBlobError, match="is corrupt"):
        reader.read_blob_into(digests[1], memoryview(bytearray(256 * KB)))
    with pytest.raises(CorruptBlobError, match="is corrupt"):
        reader.get_blob(digests[1])
    with pytest.raises(CorruptBlobError, match=f"holds {100 * KB} bytes, not the {256 * KB}"):
        reader.read_blob_into(digests[2], memoryview(bytearray(256 * KB)))
    with pytest.raises(CorruptBlobError, match="is corrupt"):  # whole but short: its hash is wrong
        reader.get_blob(digests[2])
    gone = digest_of(b"never stored")
    with pytest.raises(MissingBlobError, match="missing") as missing:
        reader.read_blob_into(gone, memoryview(bytearray(12)))
    assert missing.value.digests == [gone]


def test_one_failed_chunk_among_many_fails_the_snapshot_and_the_previous_one_still_reads(s3_url: str) -> None:
    store = S3Store(s3_url)
    before = chunks_of(4, 8, 128 * KB)
    kept = store_in_parallel(store, before)
    store.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": kept})

    after = chunks_of(5, 32, 128 * KB)
    fault = FailOneUpload(store.client, digest_of(after[17]))
    with pytest.raises(StoreError, match="access denied"):
        store_in_parallel(store, after)  # the writer stops at the first failure: no manifest
    assert fault.refused == 1

    reader = S3Store(s3_url)
    assert reader.list_snapshots("nb.ipynb") == ["0001"]
    manifest, problems = reader.latest_manifest("nb.ipynb")
    assert manifest is not None and problems == []
    assert read_in_parallel(reader, manifest["blobs"], 128 * KB) == b"".join(before)
    # A manifest naming the refused chunk is never committed, even by a caller that tries.
    with pytest.raises(MissingBlobError) as missing:
        store.commit_manifest({"session": "nb.ipynb", "id": "0002", "blobs": [digest_of(c) for c in after]})
    # (Chunks not yet begun when the failure came were never sent, as the writer stops too.)
    assert digest_of(after[17]) in missing.value.digests
    assert reader.list_snapshots("nb.ipynb") == ["0001"]


# -- the tiered store ------------------------------------------------------------
def test_tiered_sends_chunks_to_s3_as_they_are_written_bounded(s3_url: str, tmp_path: Path) -> None:
    durable = S3Store(s3_url, max_concurrency=3)
    durable._hold_lease()
    gate = InFlightGate(durable.client, "PutObject")
    sent_log = RequestLog(durable.client)
    tiered = TieredStore(FileStore(tmp_path / "fast"), durable)
    chunks = chunks_of(6, 12, 128 * KB)
    digests = store_in_parallel(tiered, chunks)  # durable locally when this returns
    # No manifest yet, and S3 already receives the chunks, three at a time.
    until(lambda: gate.inside >= 3, 60, "three chunks on their way to S3 before any commit")
    assert tiered.pending_snapshots() == []
    gate.open()
    s3 = S3Store(s3_url)
    until(lambda: all(s3.has_blob(d) for d in digests), 60, "every chunk in S3")
    assert gate.most == 3
    assert blob_requests(sent_log, "HeadObject") == 0  # new locally, so new to S3: the PUT's condition answers

    log = RequestLog(durable.client)
    tiered.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": digests})
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    assert blob_requests(log, "PutObject") == 0  # the commit's replication sent only the manifest
    assert read_in_parallel(S3Store(s3_url), s3.load_manifest("nb.ipynb", "0001")["blobs"], 128 * KB) == b"".join(
        chunks
    )
    tiered.close()


def test_tiered_chunks_with_s3_down_then_back(s3_url: str, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.down = True
    durable = S3Store(s3_url, endpoint_url=proxy.url, max_attempts=1)
    tiered = TieredStore(FileStore(tmp_path / "fast"), durable)
    chunks = chunks_of(7, 16, 128 * KB)
    digests = store_in_parallel(tiered, chunks)
    tiered.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": digests})
    # Durable locally, and reported as not in S3 — the early sends failed, nothing pretends otherwise.
    assert tiered.flush_replication(deadline=time.time() + 0.5) == ["nb.ipynb/0001"]
    out = bytearray(128 * KB)
    tiered.read_blob_into(digests[5], memoryview(out))  # from the fast tier, S3 unreachable
    assert out == chunks[5]
    assert S3Store(s3_url).list_snapshots("nb.ipynb") == []

    proxy.down = False
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    s3 = S3Store(s3_url)
    assert s3.list_snapshots("nb.ipynb") == ["0001"]
    assert read_in_parallel(s3, digests, 128 * KB) == b"".join(chunks)
    tiered.close()


def test_tiered_read_blob_into_falls_back_to_s3_for_a_missing_or_damaged_local_chunk(
    s3_url: str, tmp_path: Path
) -> None:
    fast = FileStore(tmp_path / "fast")
    tiered = TieredStore(fast, S3Store(s3_url))
    chunks = chunks_of(8, 2, 64 * KB)
    digests = store_in_parallel(tiered, chunks)
    tiered.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": digests})
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    damaged = fast.root / "blobs" / digests[0][:2] / digests[0]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    (fast.root / "blobs" / digests[1][:2] / digests[1]).unlink()
    assert read_in_parallel(tiered, digests, 64 * KB) == b"".join(chunks)
    tiered.close()


# -- a real kernel ----------------------------------------------------------------
def test_kernel_restoring_from_s3_refuses_a_corrupt_or_truncated_chunk_before_unpickling(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks read in parallel from S3 into one allocation are all verified before any of
    the snapshot is unpickled: a damaged one falls back to the snapshot before, loudly."""
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "chunks.ipynb")
    chunked = ["--SpotSettings.chunk_size=131072"]  # 128 KiB: 100 000 float64 are 7 chunks
    with Kernel(load=True, extra_arguments=chunked) as kernel:
        kernel.run("%spot off\nimport numpy as np\na = np.arange(100_000, dtype=np.float64)\nx = 1")
        first = snapshot_line(kernel.run("%spot snapshot"))["id"]
        # loud unpickles as a call to print: if any of the second snapshot were unpickled, it would show
        kernel.run("class Loud:\n    def __reduce__(self):\n        return (print, ('UNPICKLED',))\n"
                   "loud = Loud()\nx = 2\na[-1] = -1")
        second = snapshot_line(kernel.run("%spot snapshot"))["id"]
    store = S3Store(s3_url)
    old, new = (set(store.load_manifest("chunks.ipynb", sid)["blobs"]) for sid in (first, second))
    sizes = {digest: store.client.head_object(Bucket=store.bucket, Key=store._blob_key(digest))["ContentLength"]
             for digest in new - old}
    (victim,) = [digest for digest, size in sizes.items() if size == 100_000 * 8 % (128 << 10)]  # the last chunk
    key = store._blob_key(victim)
    damaged = bytearray(store.get_blob(victim))
    damaged[-1] ^= 0xFF
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(damaged))

    with Kernel(load=True, extra_arguments=chunked) as fresh:
        report = fresh.run("%spot restore")
        assert f"fallback: snapshot {second} cannot be used: blob {victim[:12]}" in report, report
        assert "is corrupt" in report and f"fell back to snapshot {first}" in report and "UNPICKLED" not in report
        assert fresh.value("(x, float(a[-1]), 'loud' in globals())") == (1, 99_999.0, False)

    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(damaged[:1000]))  # truncated
    store.delete_snapshot("chunks.ipynb", first)
    with Kernel(load=True, extra_arguments=chunked) as fresh:
        fresh.run("%spot off\nmine = 'kept'")
        report = fresh.run("%spot restore")
        assert "restore failed: no usable snapshot" in report and "holds 1000 bytes" in report, report
        assert "UNPICKLED" not in report
        assert fresh.value("(mine, 'a' in globals(), 'x' in globals())") == ("kept", False, False)


def test_tiered_close_drops_chunk_sends_not_yet_begun_while_s3_is_down(
    s3_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """With S3 unreachable every send retries for seconds; close(deadline) must not work
    through a queue of a big buffer's chunks first (the snapshot stays listed as missing)."""
    proxy.down = True
    durable = S3Store(s3_url, endpoint_url=proxy.url, max_attempts=3)
    log = RequestLog(durable.client)
    tiered = TieredStore(FileStore(tmp_path / "fast"), durable, upload_workers=1)
    digests = store_in_parallel(tiered, chunks_of(9, 10, 64 * KB))
    tiered.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": digests})
    assert tiered.close(deadline=time.time() + 0.5) == ["nb.ipynb/0001"]
    # Each send's first request (the write lease, then the chunk) fails 3 times: 30 for all 10.
    assert log.count("PutObject") < 3 * 10, "close worked through every queued chunk send before it returned"
    proxy.down = False
    assert TieredStore(FileStore(tmp_path / "fast"), S3Store(s3_url)).close(deadline=time.time() + 60) == []

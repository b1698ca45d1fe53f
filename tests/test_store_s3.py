"""The S3 store and the tiered store, against moto's standalone server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from harness import Kernel, snapshot_line, until
from harness.s3 import FaultProxy, MotoServer, RequestLog

from jupyter_spot.store import FileStore, StoreError, collect_garbage, digest_of, open_store
from jupyter_spot.store import (
    CorruptBlobError,
    ManifestError,
    MissingBlobError,
    SnapshotExistsError,
)
from jupyter_spot.store.s3 import S3Store
from jupyter_spot.store.tiered import TieredStore

MB = 1 << 20

pytestmark = [pytest.mark.s3]


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(moto.port)
    yield fault_proxy
    fault_proxy.stop()


def blob(seed: int, size: int) -> bytes:
    """Deterministic, incompressible-enough bytes (cheaper than urandom for big sizes)."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def snapshot(store: Any, session: str, snapshot_id: str, blobs: list[bytes]) -> dict[str, Any]:
    """What the kernel engine does: every blob first, then the manifest."""
    digests = []
    for data in blobs:
        digest = digest_of(data)
        store.put_blob(digest, data)
        digests.append(digest)
    manifest = {"session": session, "id": snapshot_id, "blobs": digests}
    store.commit_manifest(manifest)
    return manifest


def assert_complete(url: str, **options: Any) -> int:
    """Every committed manifest names only blobs S3 has (checked by a cache-less store)."""
    checker = S3Store(url, **options)
    checked = 0
    for session in checker.list_sessions():
        for snapshot_id in checker.list_snapshots(session):
            manifest = checker.load_manifest(session, snapshot_id)
            missing = [d for d in manifest["blobs"] if not checker.has_blob(d)]
            assert not missing, f"{session}/{snapshot_id} names missing blobs {missing}"
            checked += 1
    return checked


class Fault:
    """Answer requests with an S3 error response, exactly as S3 sends it, through
    botocore's ``before-send`` event: every ``every``-th request of ``operation``,
    ``times`` times in all (so a retried request meets at most one fault when every > 1);
    only requests carrying ``header`` when one is given."""

    def __init__(
        self,
        client: Any,
        status: int,
        code: str,
        times: int,
        operation: str = "*",
        every: int = 1,
        header: str = "",
    ) -> None:
        self.status, self.left, self.every, self.header = status, times, every, header
        self.body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
        self.done = self._seen = 0
        self._lock = threading.Lock()
        self._event = f"before-send.s3.{operation}"
        self._client = client
        client.meta.events.register(self._event, self._respond)

    def _respond(self, request: Any, **_: Any) -> AWSResponse | None:
        if self.header and self.header not in request.headers:
            return None
        with self._lock:
            self._seen += 1
            if self.left <= 0 or (self._seen - 1) % self.every:
                return None
            self.left -= 1
            self.done += 1
        body = self.body

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                yield body

        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"}, Raw())

    def stop(self) -> None:
        self._client.meta.events.unregister(self._event, self._respond)


# -- the Store contract ---------------------------------------------------------
def test_open_store_picks_s3_and_tiered(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(s3_url)
    assert isinstance(store, S3Store) and store.kind == "s3"
    assert (store.bucket, store.prefix) == (s3_url.split("/")[2], "team/spot/")
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(tmp_path / "cache"))
    tiered = open_store(s3_url)
    assert isinstance(tiered, TieredStore) and tiered.kind == "tiered"
    assert isinstance(tiered.fast, FileStore) and isinstance(tiered.durable, S3Store)
    assert open_store(s3_url) is tiered  # one replication thread per process, however often opened
    assert tiered.close(deadline=time.time() + 5) == []
    reopened = open_store(s3_url)
    assert reopened is not tiered and not reopened.closed
    reopened.close()


def test_contract(s3_url: str) -> None:
    store = S3Store(s3_url)
    store.check_writable()
    small, big = blob(1, 1000), blob(2, 9 * MB)
    for data in (small, big):
        digest = digest_of(data)
        assert not store.has_blob(digest)
        assert store.put_blob(digest, data) == len(data)
        assert store.put_blob(digest, data) == 0
        got = store.get_blob(digest)
        assert isinstance(got, bytearray) and got == data
        got[0] ^= 1  # writable: numpy arrays restored from it must be writable too
    assert sorted(store.iter_blobs()) == sorted(digest_of(d) for d in (small, big))
    assert 0 <= store.blob_age(digest_of(small)) < 60
    assert store.blob_age("0" * 64) == float("inf")

    hostile = "../../etc/passwd?x=1 & notebooks/ünï.ipynb"
    snapshot(store, hostile, "0001", [small])
    snapshot(store, hostile, "0002", [small, big])
    snapshot(store, "other.ipynb", "0001", [])
    assert store.list_sessions() == sorted([hostile, "other.ipynb"])
    assert store.list_snapshots(hostile) == ["0001", "0002"]
    assert store.load_manifest(hostile, "0002")["blobs"] == [digest_of(small), digest_of(big)]

    # A tampered newest manifest is refused, and the one before it still loads.
    key = f"team/spot/sessions/{store._manifest_key(hostile, '0003').split('/')[-2]}/0003.json"
    store.client.put_object(Bucket=store.bucket, Key=key, Body=b'{"format": "jupyter-spot-manifest/1"')
    latest, problems = store.latest_manifest(hostile)
    assert latest is not None and latest["id"] == "0002" and "truncated" in problems[0]

    with pytest.raises(ManifestError, match="does not exist"):
        store.load_manifest(hostile, "0009")
    store.delete_snapshot(hostile, "0001")
    assert store.list_snapshots(hostile) == ["0002", "0003"]
    with pytest.raises(ManifestError, match="does not exist"):
        store.delete_snapshot(hostile, "0001")

    store.put_record("interrupted", {"kernels": [1, 2]})
    store.put_record("interrupted", {"kernels": [3]})
    assert store.get_record("interrupted") == {"kernels": [3]}
    assert store.get_record("absent") is None
    assert store.list_records() == ["interrupted"]

    # Damaged and missing bytes are reported, never returned.
    store.client.put_object(Bucket=store.bucket, Key=store._blob_key(digest_of(small)), Body=b"rotten")
    with pytest.raises(CorruptBlobError, match="corrupt"):
        S3Store(s3_url).get_blob(digest_of(small))
    with pytest.raises(MissingBlobError, match="missing"):
        store.get_blob("ab" * 32)
    with pytest.raises(StoreError, match="not a blob address"):
        store.put_blob("../x", b"")


def test_clear_errors(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match="bucket no-such-bucket-here does not exist"):
        S3Store("s3://no-such-bucket-here/p").check_writable()
    with pytest.raises(StoreError, match="bucket no-such-bucket-here does not exist"):
        S3Store("s3://no-such-bucket-here/p").put_blob(digest_of(b"x"), b"x")
    with pytest.raises(StoreError, match="expected s3://bucket/prefix"):
        S3Store("s3:///prefix")
    with pytest.raises(StoreError, match="unknown option"):
        S3Store(f"{s3_url}?colour=red")

    denied = S3Store(s3_url, max_attempts=1)
    Fault(denied.client, 403, "AccessDenied", times=10)
    with pytest.raises(StoreError, match="access denied .* s3:PutObject"):
        denied.put_record("r", {})

    old_minio = S3Store(s3_url, max_attempts=1)
    Fault(old_minio.client, 501, "NotImplemented", times=10, operation="PutObject", header="If-None-Match")
    with pytest.raises(StoreError, match=r"does not support conditional writes \(If-None-Match\)"):
        old_minio.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": []})

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no AWS credentials .* instance profile"):
        S3Store(s3_url).list_sessions()


def test_endpoint_option_reaches_an_s3_compatible_store(
    s3_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = open_store(f"{s3_url}?endpoint_url={proxy.url}&region=eu-west-1")
    snapshot(store, "nb.ipynb", "0001", [b"via the proxy"])
    assert store.client.meta.endpoint_url == proxy.url
    assert S3Store(s3_url, endpoint_url=proxy.url).list_snapshots("nb.ipynb") == ["0001"]


# -- big namespaces, incremental snapshots ----------------------------------------
def test_round_trip_300mb_through_multipart(s3_url: str) -> None:
    store = open_store(s3_url)
    log = RequestLog(store.client)
    blobs = [blob(i, 30 * MB) for i in range(10)] + [blob(100 + i, 4096) for i in range(20)]
    started = time.perf_counter()
    manifest = snapshot(store, "big.ipynb", "0001", blobs)
    upload_seconds = time.perf_counter() - started
    assert log.count("UploadPart") >= 10 * 2  # 30 MB blobs in 16 MB parts
    assert log.count("CompleteMultipartUpload") == 10
    assert log.bytes_sent() >= 300 * MB

    fresh = open_store(s3_url)  # a new machine: nothing cached
    latest, problems = fresh.latest_manifest("big.ipynb")
    assert latest == manifest and problems == []
    started = time.perf_counter()
    for digest, data in zip(latest["blobs"], blobs):
        assert fresh.get_blob(digest) == data
    download_seconds = time.perf_counter() - started
    print(f"300 MB: upload {300 / upload_seconds:.0f} MB/s, download {300 / download_seconds:.0f} MB/s")


def test_unchanged_snapshot_uploads_almost_nothing(s3_url: str) -> None:
    store = open_store(s3_url)
    log = RequestLog(store.client)
    namespace = [blob(i, 64 * 1024) for i in range(40)] + [blob(99, 12 * MB)]
    snapshot(store, "nb.ipynb", "0001", namespace)
    first_bytes = log.bytes_sent()
    assert first_bytes > 14 * MB

    log.clear()
    snapshot(store, "nb.ipynb", "0002", namespace)
    # lease put + lock list + generation head, the manifest, the lease delete
    assert log.count() <= 5, log.requests
    unchanged = log.bytes_sent()
    assert unchanged < 8 * 1024

    # A process that knows nothing yet asks S3 before sending a big blob, and
    # sends a small one with If-None-Match (one request instead of two; S3 keeps
    # the copy it has). Nothing is stored twice.
    restarted = open_store(s3_url)
    log = RequestLog(restarted.client)
    assert [restarted.put_blob(digest_of(d), d) for d in namespace] == [0] * len(namespace)
    assert restarted.put_blob(digest_of(b"one new value"), b"one new value") == len(b"one new value")
    assert log.count("UploadPart") == 0 and log.count("HeadObject") == 2  # the big blob, the GC generation
    assert log.bytes_sent() < 3 * MB
    print(f"first snapshot {first_bytes} bytes; unchanged: {unchanged} bytes, from a new process {log.bytes_sent()}")


# -- concurrent writers ----------------------------------------------------------
def test_racing_writers_never_lose_a_snapshot(s3_url: str) -> None:
    writers = [S3Store(s3_url) for _ in range(2)]
    for round_ in range(8):
        barrier = threading.Barrier(2)
        outcome: dict[int, Any] = {}

        def write(n: int, same_id: bool, round_: int, barrier: threading.Barrier, outcome: dict[int, Any]) -> None:
            snapshot_id = f"{round_:04d}" if same_id else f"{round_:04d}-w{n}"
            data = [f"writer {n} round {round_}".encode()]
            digests = [digest_of(d) for d in data]
            for d, digest in zip(data, digests):
                writers[n].put_blob(digest, d)
            barrier.wait()
            try:
                writers[n].commit_manifest({"session": "shared.ipynb", "id": snapshot_id, "blobs": digests})
                outcome[n] = digests
            except SnapshotExistsError as error:
                outcome[n] = error

        same_id = round_ % 2 == 0
        threads = [threading.Thread(target=write, args=(n, same_id, round_, barrier, outcome)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if same_id:
            winners = [n for n, result in outcome.items() if isinstance(result, list)]
            losers = [n for n, result in outcome.items() if isinstance(result, SnapshotExistsError)]
            assert len(winners) == 1 and len(losers) == 1, outcome
            stored = writers[0].load_manifest("shared.ipynb", f"{round_:04d}")
            assert stored["blobs"] == outcome[winners[0]]  # the winner's, not overwritten
            assert "already exists" in str(outcome[losers[0]])
        else:
            for n in range(2):
                assert writers[0].load_manifest("shared.ipynb", f"{round_:04d}-w{n}")["blobs"] == outcome[n]
    assert len(writers[0].list_snapshots("shared.ipynb")) == 4 + 4 * 2
    assert assert_complete(s3_url) == 12


# -- faults ------------------------------------------------------------------
def test_dropped_connections_and_slowdown_are_retried(s3_url: str, proxy: FaultProxy) -> None:
    store = S3Store(s3_url, endpoint_url=proxy.url)
    slowdowns = Fault(store.client, 503, "SlowDown", times=4, every=2)
    proxy.cut_after(n_bytes=200 * 1024, times=4, every=2)  # mid-body of a part or a blob
    blobs = [blob(i, 3 * MB) for i in range(4)] + [blob(50, 20 * MB)]
    manifest = snapshot(store, "nb.ipynb", "0001", blobs)
    assert slowdowns.done == 4 and proxy.cuts_done == 4
    fresh = S3Store(s3_url)
    assert [fresh.get_blob(d) for d in manifest["blobs"]] == blobs
    assert assert_complete(s3_url) == 1


def test_commit_whose_answer_was_lost_is_not_a_conflict(s3_url: str, proxy: FaultProxy) -> None:
    store = S3Store(s3_url, endpoint_url=proxy.url)
    store.put_blob(digest_of(b"x"), b"x")  # takes the lease: the commit's first request is the PUT
    proxy.lose_responses(1)
    store.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": [digest_of(b"x")]})
    assert proxy.responses_lost == 1
    assert store.load_manifest("nb.ipynb", "0001")["blobs"] == [digest_of(b"x")]
    with pytest.raises(SnapshotExistsError):  # a different snapshot under that id still conflicts
        store.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": []})


def test_failed_upload_never_commits_a_manifest(s3_url: str, tmp_path: Path) -> None:
    durable = S3Store(s3_url, max_attempts=2)
    tiered = TieredStore(FileStore(tmp_path / "fast"), durable)
    # Every part upload fails for a while: the big blob cannot reach S3.
    failed = Fault(durable.client, 500, "InternalError", times=10**6, operation="UploadPart")
    manifest = snapshot(tiered, "nb.ipynb", "0001", [blob(1, 1000), blob(2, 10 * MB)])
    assert tiered.flush_replication(deadline=time.time() + 1) == ["nb.ipynb/0001"]
    deadline = time.monotonic() + 60
    while tiered.last_error is None:  # the first attempt has given up
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert failed.done > 0 and "InternalError" in tiered.last_error
    assert tiered.pending_snapshots() == ["nb.ipynb/0001"]
    assert durable.list_snapshots("nb.ipynb") == []  # the manifest waited for its blobs
    # Locally the snapshot is safe and complete all along.
    assert tiered.latest_manifest("nb.ipynb")[0] == manifest

    failed.stop()
    failures = failed.done
    assert tiered.close(deadline=time.time() + 60) == []
    assert failed.done == failures  # the hook is gone: the retry succeeded on its own
    uploads = durable.client.list_multipart_uploads(Bucket=durable.bucket).get("Uploads", [])
    assert uploads == []  # s3transfer aborted every failed attempt
    assert assert_complete(s3_url) == 1


KILLED_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from jupyter_spot.store.s3 import S3Store
    store = S3Store(sys.argv[1], multipart_chunksize=5 << 20, max_concurrency=1)
    data = bytes(range(256)) * (160 << 12)  # 160 MiB: 32 parts, uploaded one by one
    print("uploading", flush=True)
    store.put_blob(hashlib.sha256(data).hexdigest(), data)
    store.commit_manifest({"session": "nb.ipynb", "id": "0002", "blobs": [hashlib.sha256(data).hexdigest()]})
    """
)


@pytest.mark.faults
def test_writer_killed_mid_upload_leaves_previous_snapshot_intact(s3_url: str, proxy: FaultProxy) -> None:
    store = S3Store(s3_url)
    before = snapshot(store, "nb.ipynb", "0001", [b"state before the kill"])
    proxy.hold_after(12 << 20)  # two parts are through; the third stays in flight until we say
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, f"{s3_url}?endpoint_url={proxy.url}"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "uploading"
        until(proxy.held.is_set, 120, "the writer's upload to be held mid-way by the proxy")
        (upload,) = store.client.list_multipart_uploads(Bucket=store.bucket)["Uploads"]
        parts = store.client.list_parts(Bucket=store.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        assert len(parts.get("Parts", [])) >= 2, parts  # the kill lands in the middle of the upload
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    finally:
        proxy.release()
        writer.kill()
        writer.wait()
    data = bytes(range(256)) * (160 << 12)
    assert not S3Store(s3_url).has_blob(digest_of(data))  # half an upload is no blob
    assert store.list_snapshots("nb.ipynb") == ["0001"]
    assert store.latest_manifest("nb.ipynb") == (before, [])
    assert assert_complete(s3_url) == 1


# -- garbage collection while writing ------------------------------------------------
def test_gc_defers_while_a_writer_holds_its_lease(s3_url: str) -> None:
    writer, collector = S3Store(s3_url), S3Store(s3_url)
    old, dropped = blob(1, 5000), blob(2, 5000)
    snapshot(writer, "nb.ipynb", "0001", [old, dropped])
    writer.delete_snapshot("nb.ipynb", "0001")  # `old` is now unreferenced and "old"

    # The writer starts its next snapshot, re-using `old` from its cache.
    writer.put_blob(digest_of(old), old)
    report = collect_garbage(collector, keep=1, grace_seconds=0)
    assert report.blobs_deferred and report.blobs_deleted == 0
    writer.put_blob(digest_of(b"new"), b"new")
    writer.commit_manifest({"session": "nb.ipynb", "id": "0002", "blobs": [digest_of(old), digest_of(b"new")]})

    report = collect_garbage(collector, keep=1, grace_seconds=0)
    assert (report.blobs_deferred, report.blobs_deleted, report.blobs_kept) == (False, 1, 2)
    assert not collector.has_blob(digest_of(dropped))
    assert [collector.get_blob(d) for d in writer.load_manifest("nb.ipynb", "0002")["blobs"]] == [old, b"new"]


def test_writer_waits_for_a_running_gc_and_forgets_what_it_deleted(s3_url: str) -> None:
    writer, collector = S3Store(s3_url), S3Store(s3_url)
    old = blob(1, 5000)
    snapshot(writer, "nb.ipynb", "0001", [old])
    writer.delete_snapshot("nb.ipynb", "0001")
    events: list[str] = []
    listings = RequestLog(writer.client)  # in put_blob the writer lists only the locks
    with collector.blob_gc_guard() as may_delete:
        assert may_delete()
        thread = threading.Thread(target=lambda: (writer.put_blob(digest_of(old), old), events.append("put")))
        thread.start()
        # A second listing means the first one showed the collector's lock and the writer waited.
        until(lambda: listings.count("ListObjectsV2") >= 2, 60, "the writer to list the locks again")
        assert events == []  # blocked behind the collector's lock
        collector.delete_blob(digest_of(old))  # decided before the writer came
        events.append("deleted")
        until(lambda: not may_delete(), 60, "the collector to see the writer's lease and stop")
    thread.join()
    assert events == ["deleted", "put"]
    writer.commit_manifest({"session": "nb.ipynb", "id": "0002", "blobs": [digest_of(old)]})
    assert S3Store(s3_url).get_blob(digest_of(old)) == old  # uploaded again, not assumed
    assert assert_complete(s3_url) == 1


def test_collector_killed_half_way_cannot_leave_a_dangling_manifest(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_spot.store import s3_leases as s3_module

    monkeypatch.setattr(s3_module, "GC_LOCK_SECONDS", 2)
    writer, collector = S3Store(s3_url), S3Store(s3_url)
    x, y = b"x" * 10, b"y" * 10
    snapshot(writer, "nb.ipynb", "0001", [x, y])
    writer.delete_snapshot("nb.ipynb", "0001")
    guard = collector.blob_gc_guard()
    may_delete = guard.__enter__()
    assert may_delete()
    collector.announce_collection()  # as collect_garbage does before its first deletion
    collector.delete_blob(digest_of(x))  # ... and the collector dies here, its lock left behind
    time.sleep(2.5)  # the lock goes stale: nobody waits for a dead collector for long

    # The kernel engine remembers x as stored and names it without storing it again.
    manifest = {"session": "nb.ipynb", "id": "0002", "blobs": [digest_of(x), digest_of(y)]}
    with pytest.raises(MissingBlobError, match="not in"):
        writer.commit_manifest(manifest)
    assert writer.list_snapshots("nb.ipynb") == []
    assert writer.put_blob(digest_of(x), x) == len(x)  # stored again, not assumed
    writer.commit_manifest(manifest)
    assert assert_complete(s3_url) == 1


def test_gc_running_against_a_busy_writer_loses_nothing(s3_url: str) -> None:
    writer, collector = S3Store(s3_url), S3Store(s3_url)
    pool = [blob(i, 2000 + i) for i in range(12)]
    done = threading.Event()
    reports = []

    def collect() -> None:
        while not done.is_set():
            reports.append(collect_garbage(collector, keep=1, grace_seconds=0))

    gc_thread = threading.Thread(target=collect)
    gc_thread.start()
    try:
        for i in range(20):
            chosen = [pool[(i * 5 + k) % len(pool)] for k in range(4)] + [f"unique {i}".encode()]
            snapshot(writer, "nb.ipynb", f"{i:04d}", chosen)
    finally:
        done.set()
        gc_thread.join()
    final = collect_garbage(collector, keep=1, grace_seconds=0)
    assert len(reports) > 0 and sum(r.blobs_deleted for r in reports) + final.blobs_deleted > 0
    assert assert_complete(s3_url) == 1
    latest = collector.latest_manifest("nb.ipynb")[0]
    assert latest is not None and latest["id"] == "0019"
    assert sorted(collector.iter_blobs()) == sorted(set(latest["blobs"]))
    for digest in latest["blobs"]:
        collector.get_blob(digest)


# -- the tiered store ------------------------------------------------------------
def test_tiered_writes_locally_while_s3_is_down_then_sends_newest_first(
    s3_url: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.down = True
    durable = S3Store(s3_url, endpoint_url=proxy.url, max_attempts=1)
    log = RequestLog(durable.client)
    tiered = TieredStore(FileStore(tmp_path / "fast"), durable)
    manifests = []
    started = time.perf_counter()
    for i in range(3):
        manifests.append(snapshot(tiered, "nb.ipynb", f"{i:04d}", [blob(i, 3 * MB), b"shared"]))
    local_seconds = time.perf_counter() - started
    assert local_seconds < 5  # nothing waited for S3
    assert tiered.latest_manifest("nb.ipynb")[0] == manifests[-1]
    assert tiered.flush_replication(deadline=time.time() + 0.5) == [f"nb.ipynb/{i:04d}" for i in (2, 1, 0)]

    proxy.down = False
    log.clear()
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    commits = [url.rsplit("/", 1)[-1] for op, url, _ in log.requests if op == "PutObject" and "/sessions/" in url]
    assert sorted(commits) == ["0000.json", "0001.json", "0002.json"]
    # A snapshot's replication waits for its blobs' sends, started as they were written: one
    # attempt may still be waiting on them when S3 comes back, and finishes first. Every
    # other snapshot goes newest first.
    after_attempt_in_flight = commits if commits[0] == "0002.json" else commits[1:]
    assert after_attempt_in_flight == sorted(after_attempt_in_flight, reverse=True), commits
    assert assert_complete(s3_url) == 3
    tiered.close()


def test_tiered_reads_nearest_tier_and_falls_back_to_s3(s3_url: str, tmp_path: Path) -> None:
    fast = FileStore(tmp_path / "fast")
    tiered = TieredStore(fast, S3Store(s3_url))
    data = [blob(1, 2 * MB), blob(2, 1000)]
    manifest = snapshot(tiered, "nb.ipynb", "0001", data)
    tiered.put_record("server", {"kernels": 2})
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    tiered.close()

    # Local copy damaged and another missing: S3 serves verified bytes.
    first, second = manifest["blobs"]
    path = fast.root / "blobs" / first[:2] / first
    path.write_bytes(b"x" + path.read_bytes()[1:])
    (fast.root / "blobs" / second[:2] / second).unlink()
    reader = TieredStore(FileStore(tmp_path / "fast"), S3Store(s3_url))
    assert [reader.get_blob(d) for d in manifest["blobs"]] == data
    reader.close()

    # A new machine with an empty cache sees everything through S3.
    elsewhere = TieredStore(FileStore(tmp_path / "other-machine"), S3Store(s3_url))
    assert elsewhere.list_sessions() == ["nb.ipynb"]
    assert elsewhere.latest_manifest("nb.ipynb") == (manifest, [])
    assert elsewhere.get_record("server") == {"kernels": 2}
    assert elsewhere.get_blob(second) == data[1]
    assert elsewhere.close() == []


def test_tiered_snapshot_that_cannot_be_sent_does_not_hold_back_others(s3_url: str, tmp_path: Path) -> None:
    fast = FileStore(tmp_path / "fast")
    snapshot(fast, "nb.ipynb", "0001", [blob(1, 1000)])
    damaged = snapshot(fast, "nb.ipynb", "0002", [blob(2, 1000)])
    (fast.root / "blobs" / damaged["blobs"][0][:2] / damaged["blobs"][0]).unlink()  # lost locally, never sent
    tiered = TieredStore(FileStore(tmp_path / "fast"), S3Store(s3_url))
    deadline = time.monotonic() + 60
    while tiered.pending_snapshots() != ["nb.ipynb/0002"]:
        assert time.monotonic() < deadline, tiered.pending_snapshots()
        time.sleep(0.05)
    assert "missing" in (tiered.last_error or "")
    assert S3Store(s3_url).list_snapshots("nb.ipynb") == ["0001"]
    assert assert_complete(s3_url) == 1
    assert tiered.close(deadline=time.time() + 0.5) == ["nb.ipynb/0002"]


def test_tiered_gc_collects_both_tiers_and_keeps_the_latest(s3_url: str, tmp_path: Path) -> None:
    tiered = TieredStore(FileStore(tmp_path / "fast"), S3Store(s3_url))
    old = snapshot(tiered, "nb.ipynb", "0001", [b"old value", b"kept value"])
    new = snapshot(tiered, "nb.ipynb", "0002", [b"new value", b"kept value"])
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    report = collect_garbage(tiered, keep=1, grace_seconds=0)
    assert report.snapshots_deleted == ["nb.ipynb/0001"] and report.blobs_deleted == 1
    gone = old["blobs"][0]
    for tier in (tiered.fast, S3Store(s3_url)):
        assert tier.list_snapshots("nb.ipynb") == ["0002"]
        assert not tier.has_blob(gone)
        assert sorted(tier.iter_blobs()) == sorted(new["blobs"])
    tiered.close()


EXITING_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from jupyter_spot.store import open_store
    store = open_store(sys.argv[1], cache=sys.argv[2])
    data = bytes(range(256)) * (48 << 12)  # 12 MiB: a multipart upload through s3transfer
    digest = hashlib.sha256(data).hexdigest()
    store.put_blob(digest, data)
    store.commit_manifest({"session": "nb.ipynb", "id": "0001", "blobs": [digest]})
    print(store.pending_snapshots(), flush=True)
    """
)


def test_tiered_process_exiting_right_after_a_commit_still_reaches_s3(s3_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXITING_WRITER, s3_url, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['nb.ipynb/0001']"  # not yet in S3 when the script ended
    assert S3Store(s3_url).list_snapshots("nb.ipynb") == ["0001"]  # sent on the way out
    assert assert_complete(s3_url) == 1


def test_tiered_replicates_what_a_previous_process_left_behind(s3_url: str, tmp_path: Path) -> None:
    local = FileStore(tmp_path / "fast")
    manifest = snapshot(local, "nb.ipynb", "0001", [blob(1, 1000)])  # written, then the VM died
    tiered = TieredStore(FileStore(tmp_path / "fast"), S3Store(s3_url))
    assert tiered.flush_replication(deadline=time.time() + 60) == []
    assert S3Store(s3_url).latest_manifest("nb.ipynb") == (manifest, [])
    tiered.delete_snapshot("nb.ipynb", "0001")
    assert tiered.list_snapshots("nb.ipynb") == [] and S3Store(s3_url).list_snapshots("nb.ipynb") == []
    with pytest.raises(ManifestError):
        tiered.delete_snapshot("nb.ipynb", "0001")
    tiered.close()


# -- a real kernel snapshotting through open_store ---------------------------------
def test_kernel_snapshots_to_s3_and_a_new_kernel_restores(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "s3.ipynb")
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nbig = np.random.default_rng(7).random(2_000_000)\nlabels = ['a', 'b']")
        snapshot_line(kernel.run("%spot snapshot"))
        assert kernel.value("__import__('jupyter_spot').status()['store_kind']") == "s3"
        total = kernel.value("float(big.sum())")
    latest, _ = S3Store(s3_url).latest_manifest("s3.ipynb")
    assert latest is not None and len(latest["blobs"]) >= 2
    with Kernel(load=True) as fresh:
        assert "restored snapshot" in fresh.run("%spot restore latest")
        assert fresh.value("(float(big.sum()), labels, big.flags.writeable)") == (total, ["a", "b"], True)


def test_kernel_with_a_cache_dir_replicates_to_s3(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "tiered.ipynb")
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(tmp_path / "efs"))
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nweights = np.arange(1_500_000, dtype='float64')")
        snapshot_line(kernel.run("%spot snapshot"))
        kernel.run("import time\nfrom jupyter_spot.kernel import extension\nstore = extension.current().store")
        assert kernel.value("store.kind") == "tiered"
        assert kernel.value("store.flush_replication(time.time() + 60)") == []
    assert (tmp_path / "efs" / "sessions").is_dir()  # written locally first
    assert S3Store(s3_url).list_snapshots("tiered.ipynb")  # and replicated
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(tmp_path / "another-machine"))
    with Kernel(load=True) as fresh:
        assert "restored snapshot" in fresh.run("%spot restore latest")
        assert fresh.value("float(weights[-1])") == 1_499_999.0


def test_kernel_flush_on_a_notice_waits_until_s3_has_the_snapshot(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "flush.ipynb")
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(tmp_path / "efs"))
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nweights = np.arange(3_000_000, dtype='float64')")
        kernel.run("import jupyter_spot\nresult = jupyter_spot.flush('test notice')")
        snapshot_id, missing = kernel.value("(result.id, result.not_replicated)")
        # Checked the moment flush returned: the local tier alone would not survive the machine.
        assert snapshot_id in S3Store(s3_url).list_snapshots("flush.ipynb")
        assert missing == []


def test_kernel_writes_again_what_another_process_collected(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "gc.ipynb")
    with Kernel(load=True) as kernel:
        kernel.run("import numpy as np\nbig = np.arange(1_000_000, dtype='float64')")
        snapshot_line(kernel.run("%spot snapshot"))
        # Someone else deletes every snapshot and collects every blob, while this
        # kernel still believes `big` is stored.
        collector = S3Store(s3_url)
        for snapshot_id in collector.list_snapshots("gc.ipynb"):
            collector.delete_snapshot("gc.ipynb", snapshot_id)
        report = collect_garbage(collector, keep=1, grace_seconds=0)
        assert report.blobs_deleted > 0
        kernel.run("small = 1")
        # The kernel must notice that `big` is gone from S3 and upload it again, the first time.
        snapshot_line(kernel.run("%spot snapshot"))
    with Kernel(load=True) as fresh:
        assert "restored snapshot" in fresh.run("%spot restore latest")
        assert fresh.value("(float(big[-1]), small)") == (999_999.0, 1)


@pytest.mark.faults
def test_notice_flush_with_s3_too_slow_for_the_deadline_reports_what_is_not_in_s3(
    s3_url: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiered store on a notice: the snapshot is durable on the local tier, but S3 (held by the
    proxy) cannot take it before the deadline — the result says so instead of claiming safety."""
    monkeypatch.setenv("JUPYTER_SPOT_STORE", f"{s3_url}?endpoint_url={proxy.url}")
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", "late.ipynb")
    monkeypatch.setenv("JUPYTER_SPOT_CACHE", str(tmp_path / "efs"))
    with Kernel(load=True) as kernel:
        kernel.run("%spot off\nimport numpy as np\nimport jupyter_spot\nfrom datetime import datetime, timedelta, timezone")
        kernel.run("weights = np.arange(1_000_000, dtype='float64')")
        proxy.hold_after(0)  # S3 stops answering from here
        try:
            kernel.run(
                "result = jupyter_spot.flush('test notice', datetime.now(timezone.utc) + timedelta(seconds=5))"
            )
            snapshot_id, durable, missing = kernel.value("(result.id, result.durable, result.not_replicated)")
            line = snapshot_line(kernel.run("print(result)"))
        finally:
            proxy.release()
        assert durable and missing == [f"late.ipynb/{snapshot_id}"], (durable, missing)
        assert line["not_replicated"] == "1"
        assert snapshot_id in FileStore(tmp_path / "efs").list_snapshots("late.ipynb")  # safe on the local tier
        assert kernel.value("jupyter_spot.flush('again').not_replicated") == []  # S3 back: it catches up
    assert snapshot_id in S3Store(s3_url).list_snapshots("late.ipynb")

"""FileStore, signed manifests and retention: the units under every snapshot."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from jupyter_spot import faults
from jupyter_spot.store import (
    CorruptBlobError,
    FileStore,
    ManifestError,
    ManifestSigner,
    MissingBlobError,
    SnapshotExistsError,
    StoreError,
    collect_garbage,
    digest_of,
    file_writes,
    filesystem,
)
from jupyter_spot.store.file_writes import HASH_ASIDE_MIN
from jupyter_spot.store.filesystem import MMAP_THRESHOLD


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", signer=ManifestSigner(b"unit-test-key", key_source="test"))


def commit(store: FileStore, session: str, snapshot_id: str, blobs: list[str]) -> dict:
    manifest = {"session": session, "id": snapshot_id, "blobs": blobs}
    store.commit_manifest(manifest)
    return manifest


def test_blobs_round_trip_deduplicate_and_verify(store: FileStore) -> None:
    data = b"hello, spot"
    digest = digest_of(data)
    assert not store.has_blob(digest)
    assert store.put_blob(digest, data) == len(data)
    assert store.put_blob(digest, data) == 0  # already there: nothing written
    assert store.has_blob(digest) and list(store.iter_blobs()) == [digest]
    assert bytes(store.get_blob(digest)) == data
    store._blob_path(digest).write_bytes(b"jello, spot")
    with pytest.raises(CorruptBlobError, match=f"blob {digest[:12]} .* is corrupt"):
        store.get_blob(digest)
    store.delete_blob(digest)
    with pytest.raises(MissingBlobError, match=f"blob {digest[:12]} is missing"):
        store.get_blob(digest)


def test_a_blob_takes_its_name_only_once_its_bytes_hash_to_it(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks so the big blob is written (and handed to the disk) piece by piece.
    monkeypatch.setattr(file_writes, "WRITE_CHUNK", 1 << 16)
    monkeypatch.setattr(file_writes, "WRITEBACK_EVERY", 1 << 18)
    big = os.urandom(HASH_ASIDE_MIN + 12345)  # hashed on a second thread while it is written
    for data in (b"small blob", big):
        digest = digest_of(data)
        assert store.add_blob(data) == (digest, len(data))
        assert store.add_blob(data) == (digest, 0)  # already stored: the new copy is dropped
        assert bytes(store.get_blob(digest)) == data

    # An address that is not the bytes' SHA-256 is refused, and nothing takes that name.
    wrong = digest_of(b"what the caller thought it had")
    with pytest.raises(CorruptBlobError, match=f"blob {wrong[:12]} not stored: the bytes given hash to"):
        store.put_blob(wrong, big[::-1])
    assert not store.has_blob(wrong) and not store.has_blob(digest_of(big[::-1]))

    # A write that fails half-way (a full disk) leaves neither a blob nor its temporary file.
    def half_then_full(fd: int, data: memoryview) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_writes, "write_all", half_then_full)
    with pytest.raises(StoreError, match="is full"):
        store.add_blob(big[1:])
    assert not store.has_blob(digest_of(big[1:]))
    assert list((store.root / "blobs").rglob("*.tmp")) == []
    assert sorted(store.iter_blobs()) == sorted([digest_of(b"small blob"), digest_of(big)])


def test_big_blobs_come_back_writable_without_touching_the_file(store: FileStore) -> None:
    data = os.urandom(MMAP_THRESHOLD + 123)
    digest = digest_of(data)
    store.put_blob(digest, data)
    view = memoryview(store.get_blob(digest))
    assert not view.readonly and view.nbytes == len(data)
    view[0] = (view[0] + 1) % 256  # copy-on-write: the stored blob stays intact
    assert bytes(store.get_blob(digest)) == data


def test_read_blob_into_fills_exactly_its_place_and_verifies(store: FileStore) -> None:
    data = os.urandom(300_000)
    digest, _ = store.add_blob(data)
    place = bytearray(b"#" * 300_010)
    store.read_blob_into(digest, memoryview(place)[5:300_005])
    assert place[5:300_005] == data and place[:5] == place[-5:] == b"#####"
    with pytest.raises(CorruptBlobError, match="holds 300000 bytes, not the 299999"):
        store.read_blob_into(digest, memoryview(bytearray(299_999)))
    path = store._blob_path(digest)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptBlobError, match="is corrupt"):
        store.read_blob_into(digest, memoryview(bytearray(300_000)))
    path.unlink()
    with pytest.raises(MissingBlobError, match="is missing"):
        store.read_blob_into(digest, memoryview(bytearray(300_000)))


def test_manifests_commit_once_and_list_oldest_first(store: FileStore) -> None:
    commit(store, "nb.ipynb", "20261129T000002.000000Z-bbbb", [])
    commit(store, "nb.ipynb", "20261129T000001.000000Z-aaaa", [])
    with pytest.raises(SnapshotExistsError):
        commit(store, "nb.ipynb", "20261129T000001.000000Z-aaaa", [])
    assert store.list_snapshots("nb.ipynb") == ["20261129T000001.000000Z-aaaa", "20261129T000002.000000Z-bbbb"]
    assert store.list_sessions() == ["nb.ipynb"]
    assert store.load_manifest("nb.ipynb", "20261129T000002.000000Z-bbbb")["id"] == "20261129T000002.000000Z-bbbb"
    with pytest.raises(StoreError, match="not a snapshot id"):
        store.load_manifest("nb.ipynb", "../escape")
    with pytest.raises(StoreError, match="not a blob address"):
        commit(store, "nb.ipynb", "20261129T000003.000000Z-cccc", ["not-a-digest"])


def test_session_names_cannot_escape_the_store(store: FileStore) -> None:
    for session in ["../../etc", "/abs/path.ipynb", ".hidden", "dir/sub/nb.ipynb"]:
        commit(store, session, "20261129T000001.000000Z-aaaa", [])
    sessions_dir = store.root / "sessions"
    assert all(path.parent == sessions_dir for path in sessions_dir.iterdir())
    assert sorted(store.list_sessions()) == sorted(["../../etc", "/abs/path.ipynb", ".hidden", "dir/sub/nb.ipynb"])
    assert not (store.root.parent / "etc").exists()


def test_tampered_truncated_and_foreign_manifests_are_refused(store: FileStore, tmp_path: Path) -> None:
    good = "20261129T000001.000000Z-aaaa"
    bad = "20261129T000002.000000Z-bbbb"
    commit(store, "nb", good, [])
    commit(store, "nb", bad, [])
    path = store._manifest_path("nb", bad)
    envelope = json.loads(path.read_bytes())
    envelope["body"] = envelope["body"].replace('"blobs":[]', '"blobs":[],"evil":1')
    path.write_text(json.dumps(envelope))
    with pytest.raises(ManifestError, match="not signed by this machine's key"):
        store.load_manifest("nb", bad)
    manifest, problems = store.latest_manifest("nb")
    assert manifest is not None and manifest["id"] == good
    assert len(problems) == 1 and bad in problems[0]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ManifestError, match=f"snapshot {bad} of session 'nb': manifest is truncated"):
        store.load_manifest("nb", bad)
    stranger = FileStore(store.root, signer=ManifestSigner(b"another-key", key_source="elsewhere"))
    with pytest.raises(ManifestError, match=r"not signed by this machine's key \(elsewhere\)"):
        stranger.load_manifest("nb", good)


def test_unwritable_store_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file: even root cannot create a directory under it")
    store = FileStore(blocker / "store", signer=ManifestSigner(b"k"))
    with pytest.raises(StoreError, match=f"cannot create {blocker}/store: Not a directory"):
        store.check_writable()
    with pytest.raises(StoreError, match="Not a directory"):
        store.put_blob(digest_of(b"x"), b"x")


def test_records_round_trip(store: FileStore) -> None:
    assert store.get_record("kernels") is None
    store.put_record("kernels", {"a": 1})
    store.put_record("kernels", {"a": 2})
    assert store.get_record("kernels") == {"a": 2} and store.list_records() == ["kernels"]
    with pytest.raises(StoreError, match="not a record name"):
        store.put_record("../x", {})


def test_retention_keeps_the_newest_and_their_blobs(store: FileStore) -> None:
    blobs = []
    for index in range(4):
        data = f"blob {index}".encode()
        blobs.append(digest_of(data))
        store.put_blob(blobs[-1], data)
        commit(store, "nb", f"20261129T00000{index}.000000Z-aaaa", [blobs[0], blobs[index]])
    young = collect_garbage(store, keep=2)
    assert len(young.snapshots_deleted) == 2 and young.blobs_deleted == 0  # too recent to collect
    report = collect_garbage(store, keep=2, grace_seconds=0)
    assert report.snapshots_deleted == [] and report.blobs_deleted == 1  # blob 1: only the deleted snapshots had it
    assert sorted(store.iter_blobs()) == sorted([blobs[0], blobs[2], blobs[3]])
    with pytest.raises(ValueError, match="keep must be at least 1"):
        collect_garbage(store, keep=0)


def test_add_blobs_stores_in_batches_each_durable_before_it_is_reported(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of blobs are written, then fsynced, then named: every blob is reported once with
    its address, one stored before costs nothing, a stop between batches stores no more, and a
    failure reports none of its batch and leaves no temporary file."""
    monkeypatch.setattr(filesystem, "SYNC_BATCH", 3)
    earlier = b"stored before"
    store.add_blob(earlier)
    blobs = [os.urandom(size) for size in (HASH_ASIDE_MIN + 5, 700, 1, 2 << 20, 9000)] + [earlier, b"x" * 10]
    reported: dict[int, tuple[str, int]] = {}

    def added(index: int, digest: str, written: int) -> None:
        assert index not in reported and bytes(store.get_blob(digest)) == blobs[index]  # durable and named
        reported[index] = (digest, written)

    store.add_blobs(blobs, added)
    assert reported == {i: (digest_of(b), 0 if b == earlier else len(b)) for i, b in enumerate(blobs)}
    assert list((store.root / "blobs").rglob("*.tmp")) == []

    more = [os.urandom(1000) for _ in range(7)]
    seen: list[int] = []
    store.add_blobs(more, lambda index, digest, written: seen.append(index), stop=lambda: len(seen) >= 3)
    assert len(seen) == 3 and sum(store.has_blob(digest_of(b)) for b in more) == 3

    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(faults.ENV, "blob-write=raise@2")
    failing = [os.urandom(1000) for _ in range(3)]
    with pytest.raises(StoreError, match="injected fault at blob-write"):
        store.add_blobs(failing, lambda index, digest, written: pytest.fail("a blob of a failed batch was reported"))
    assert not any(store.has_blob(digest_of(b)) for b in failing)
    assert list((store.root / "blobs").rglob("*.tmp")) == []

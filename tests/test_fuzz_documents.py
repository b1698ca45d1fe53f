"""About 1,300 generated malformed documents thrown at the store (a directory and S3), the
catalog, the REST API, restore in a real kernel and the job paths (seeded: every run throws
the same ones).

Each must be refused with a clear error or skipped with a warning; none may
answer 500, none may get a pickle loaded or a job run (a marker file would
appear), and the good snapshot planted first must still restore.
"""

from __future__ import annotations

import json
import os
import random
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Kernel, snapshot_line
from harness.fuzz_documents import ELSEWHERE, SEED, Document, documents, genuine_documents
from harness.jobs import runners as runner_pids
from tornado.httpclient import HTTPClientError

from jupyter_spot.jobs import checkpoint, record
from jupyter_spot.server.catalog import describe_sessions, list_snapshot_summaries
from jupyter_spot.store import FileStore, ManifestError, StoreError, collect_garbage, digest_of, open_store

pytestmark = pytest.mark.timeout(240)

SESSION = "fuzz.ipynb"
GOOD_ID = "20261129T000000.000000Z-0000"


def _bad_id(index: int) -> str:
    """Newer than the good snapshot, so every restore meets the fuzzed ones first."""
    return f"20261129T{index // 10000:06d}.{index % 10000:06d}Z-f{index % 1000:03d}"


def _corpus(store: Any, marker: Path) -> list[Document]:
    key = os.environ["JUPYTER_SPOT_SIGNING_KEY"].encode()  # the spot_env key, which the store signs with
    return list(documents(genuine_documents(store, key, marker), random.Random(SEED)))


def _plant_good_snapshot(store: Any) -> str:
    data = json.dumps({"kept": True}).encode()
    digest = digest_of(data)
    store.put_blob(digest, data)
    store.commit_manifest({"session": SESSION, "id": GOOD_ID, "created": "2026-11-29T00:00:00+00:00",
                           "kind": "explicit", "variables": {}, "groups": {}, "blobs": [digest]})
    return digest


def _plant_manifests(store: FileStore, session: str, corpus: list[Document]) -> list[str]:
    ids = []
    for index, document in enumerate(corpus, start=1):
        path = store._manifest_path(session, _bad_id(index))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(document.data)
        ids.append(_bad_id(index))
    return ids


def _job_record(job_id: str, index: int, document: Document) -> Any:
    """A record of the session carrying the document where a signed part goes (or as the whole record)."""
    text = document.data.decode(errors="replace")
    base = {"id": job_id, "session": SESSION, "name": f"fuzz{index}", "inputs": [], "outputs": [],
            "created": "2026-11-29T00:00:00+00:00", "host": "gone-machine", "pid": 1}
    shape = index % 4
    if shape == 0:
        return {**base, "state": "running", "spec": text, "heartbeat": None}
    if shape == 1:
        return {**base, "state": "done", "result": text, "collected_at": None}
    if shape == 2:
        return {**base, "state": "running", "spec": text, "runner": text, "heartbeat": "not a time"}
    return None  # the document is the record itself


def _plant_job_records(store: FileStore, corpus: list[Document]) -> dict[str, Document]:
    records = store.root / "records"
    records.mkdir(parents=True, exist_ok=True)
    planted = {}
    for index, document in enumerate(corpus):
        job_id = f"20261129T000000-{index:04x}"
        body = _job_record(job_id, index, document)
        (records / f"job-{job_id}.json").write_bytes(document.data if body is None else json.dumps(body).encode())
        (records / f"job-{job_id}.checkpoint.json").write_bytes(
            json.dumps({"id": job_id, "state": document.data.decode(errors="replace")}).encode())
        planted[job_id] = document
    return planted


def test_store_catalog_and_job_paths_refuse_every_fuzzed_document(spot_env: Path, tmp_path: Path) -> None:
    store = FileStore(spot_env)
    marker = tmp_path / "unpickled"
    corpus = _corpus(store, marker)
    assert len(corpus) >= 1000
    good_blob = _plant_good_snapshot(store)
    ids = _plant_manifests(store, SESSION, corpus)
    _plant_manifests(store, "only-fuzz.ipynb", corpus[:200])

    for snapshot_id, document in zip(ids, corpus):
        with pytest.raises(ManifestError, match=f"snapshot {snapshot_id} of session 'fuzz.ipynb'"):
            store.load_manifest(SESSION, snapshot_id)
    manifest, problems = store.latest_manifest(SESSION)
    assert manifest is not None and manifest["id"] == GOOD_ID
    assert len(problems) == len(corpus) and all(isinstance(p, str) and len(p) < 4000 for p in problems)
    assert store.list_snapshots(SESSION) == sorted([GOOD_ID, *ids])
    assert set(store.list_sessions()) == {SESSION, "only-fuzz.ipynb"}
    assert store.latest_manifest("only-fuzz.ipynb")[0] is None

    # the catalog shows the good snapshot and leaves every bad one (and the all-bad session) out
    (described,) = describe_sessions(store, [])
    assert described["id"] == SESSION and described["latest"]["id"] == GOOD_ID
    assert [s["id"] for s in list_snapshot_summaries(store, SESSION)] == [GOOD_ID]
    assert list_snapshot_summaries(store, "only-fuzz.ipynb") == []

    # the job paths: every record is refused or left out, nothing is run or unpickled
    planted = _plant_job_records(store, corpus)
    problems = []
    jobs = record.session_jobs(store, SESSION, problems)
    assert len(jobs) + len(problems) >= len(planted) * 3 // 4
    for job in jobs:
        with pytest.raises(record.JobError):
            record.spec(store, job)
        with pytest.raises(record.JobError):
            record.result(store, job)
        assert record.runner(store, job) is None
    for job_id in planted:
        for name in (record.record_name(job_id), record.checkpoint_name(job_id)):
            try:
                store.get_record(name)  # any JSON it holds, or a StoreError naming it
            except StoreError as error:
                assert name in str(error)
        try:
            record.read(store, job_id)
        except (record.JobError, StoreError):
            pass
        checkpoint.attach(store, SESSION, job_id)
        try:
            with pytest.raises((record.JobError, StoreError)):
                checkpoint.load()
        finally:
            checkpoint._context = None
    assert record.active_on_host(store, "gone-machine") is not None

    # garbage collection copes, and nothing already in the store is lost
    collect_garbage(store, keep=10_000, grace_seconds=0)
    assert store.load_manifest(SESSION, GOOD_ID)["id"] == GOOD_ID and store.get_blob(good_blob)
    assert not marker.exists()


# -- an S3 store (moto's server) --------------------------------------------------------
@pytest.fixture
def s3_store(s3_url: str) -> Any:
    """A store in a fresh bucket of the suite's moto server."""
    return open_store(s3_url)


@pytest.mark.s3
def test_an_s3_store_refuses_fuzzed_manifests_and_records(s3_store: Any, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    corpus = _corpus(s3_store, marker)
    sample = random.Random(SEED + 2).sample(corpus, 120) + [d for d in corpus if d.category == "huge"]
    _plant_good_snapshot(s3_store)
    ids = []
    for index, document in enumerate(sample, start=1):
        ids.append(_bad_id(index))
        s3_store.client.put_object(Bucket=s3_store.bucket, Key=s3_store._manifest_key(SESSION, ids[-1]),
                                   Body=document.data)
        s3_store.client.put_object(Bucket=s3_store.bucket, Key=s3_store._record_key(f"job-20261129T000000-{index:04x}"),
                                   Body=document.data)
    for snapshot_id in ids:
        with pytest.raises(ManifestError, match=snapshot_id):
            s3_store.load_manifest(SESSION, snapshot_id)
    manifest, problems = s3_store.latest_manifest(SESSION)
    assert manifest is not None and manifest["id"] == GOOD_ID and len(problems) == len(ids)
    for name in s3_store.list_records():
        try:
            s3_store.get_record(name)
        except StoreError as error:
            assert name in str(error)
    problems = []
    assert record.session_jobs(s3_store, SESSION, problems) == []
    assert not marker.exists()


# -- through a real jupyter_server -----------------------------------------------
@pytest.fixture
def jp_server_config(spot_env: Path) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_spot": True}}, "SpotApp": {"notice_sources": []}}


async def test_rest_api_answers_no_500_for_fuzzed_documents(
    spot_env: Path, tmp_path: Path, jp_serverapp: Any, http_server_client: Any, jp_auth_header: dict[str, str],
    jp_base_url: str
) -> None:
    store = FileStore(spot_env)
    marker = tmp_path / "unpickled"
    corpus = _corpus(store, marker)
    _plant_good_snapshot(store)
    sample = random.Random(SEED).sample(corpus, 150)
    ids = _plant_manifests(store, SESSION, sample)
    _plant_manifests(store, "only-fuzz.ipynb", sample[:30])

    async def call(path: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, Any]]:
        try:
            response = await http_server_client.fetch(
                f"{jp_base_url}jupyter-spot/api/{path}", method=method, headers=jp_auth_header,
                body=None if body is None else json.dumps(body), request_timeout=120)
        except HTTPClientError as error:
            assert 400 <= error.code < 500, (path, error.code)
            return error.code, json.loads(error.response.body) if error.response and error.response.body else {}
        return response.code, json.loads(response.body) if response.body else {}

    code, listing = await call("sessions")
    assert code == 200 and [s["id"] for s in listing["sessions"]] == [SESSION]
    code, snapshots = await call(f"sessions/{urllib.parse.quote(SESSION, safe='')}/snapshots")
    assert code == 200 and [s["id"] for s in snapshots["snapshots"]] == [GOOD_ID]
    code, _ = await call(f"sessions/{urllib.parse.quote('only-fuzz.ipynb', safe='')}/snapshots")
    assert code in (200, 404)
    for snapshot_id in random.Random(SEED).sample(ids, 25):  # a restore of one of them: refused, with the reason
        code, reply = await call(f"sessions/{urllib.parse.quote(SESSION, safe='')}/restore", "POST",
                                 {"snapshot": snapshot_id})
        assert code == 409 and snapshot_id in reply.get("message", ""), (code, reply)
    # "latest" of a session holding nothing usable: a clear error from a real kernel, nothing unpickled
    code, reply = await call(f"sessions/{urllib.parse.quote('only-fuzz.ipynb', safe='')}/restore", "POST", {})
    assert code == 409 and "no usable snapshot" in json.dumps(reply), (code, reply)
    assert not marker.exists()


# -- restore in a real kernel ----------------------------------------------------------
def test_restore_skips_fuzzed_manifests_and_jobs_and_loads_the_good_snapshot(
    spot_env: Path, tmp_path: Path, kernels: Callable[..., Kernel]
) -> None:
    with kernels(session=SESSION, load=True) as kernel:
        kernel.run("kept = {'answer': 42}")
        snapshot_line(kernel.run("%spot snapshot"))
    store = open_store(str(spot_env))
    good = store.list_snapshots(SESSION)[-1]
    marker = tmp_path / "unpickled"
    corpus = _corpus(store, marker)
    sample = random.Random(SEED + 1).sample(corpus, 300)
    ids = [f"29{snapshot_id[2:]}" for snapshot_id in [_bad_id(i) for i in range(1, len(sample) + 1)]]
    for snapshot_id, document in zip(ids, sample):
        store._manifest_path(SESSION, snapshot_id).write_bytes(document.data)
    planted = _plant_job_records(store, sample[:80])
    before = {name: store._record_path(name).read_bytes() for name in store.list_records()}

    with kernels(session=SESSION, load=True) as kernel:
        report = kernel.run("%spot restore latest")
        assert kernel.value("kept") == {"answer": 42}
        assert kernel.value("'evil' in globals()") is False
        assert f"restored snapshot {good}" in report
        assert report.count("cannot be used") == len(ids), report[:3000]
        listing = kernel.run("%spot_job list")
        assert "jobs of session" in listing or "no jobs" in listing
        (forged,) = [f"fuzz{i}" for i in range(len(planted)) if i % 4 == 2][:1]
        refused = kernel.run(f"%spot_job cancel {forged}", allow_error=True)
        assert "not signalling" in refused, refused
    assert not marker.exists()
    assert not runner_pids(spot_env)
    # restoring re-ran, collected and rewrote nothing (a re-run re-queues its record before starting it);
    # the one record it adds is the session's line decision ("restored"), which names no job
    after = {name: store._record_path(name).read_bytes() for name in store.list_records()}
    added = set(after) - set(before)
    assert {name: after.get(name) for name in before} == before
    assert all(name.startswith("lines-") for name in added), added
    assert ELSEWHERE not in store.list_sessions()

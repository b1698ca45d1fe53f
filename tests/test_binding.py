"""Signed documents are bound to their kind and place: a copy elsewhere is refused.

Someone with write access to the store but not the key copies signed documents
around: a manifest of one notebook into another's folder, a job spec or result
into a forged record of another session, a running job's pid into a record
whose cancel would signal it. Every test plays that attacker against real
kernels and real runner processes, and checks that nothing foreign is loaded,
re-run or signalled — and that the user is told why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kernel, snapshot_line, until
from harness.jobs import job as _job
from harness.jobs import runners as _runners

from jupyter_spot.store import ManifestError, open_store

DEADLINE = 60.0
NEWER_ID = "29991231T235959.999999Z-ffff"
Kernels = Callable[..., Kernel]


def _kernel(kernels: Kernels, session: str) -> Kernel:
    """A kernel of notebook ``session`` with jupyter_spot loaded (shut down at teardown at the latest)."""
    return kernels(session=session, load=True)


@pytest.fixture
def store(spot_env: Path) -> Iterator[Path]:
    yield spot_env
    for pid in _runners(spot_env):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _record_path(store: Path, job_id: str) -> Path:
    return store / "records" / f"job-{job_id}.json"


def _forge(store: Path, job_id: str, **fields: Any) -> None:
    """Write a job record as someone with write access but no key would."""
    path = _record_path(store, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": job_id, "inputs": [], "outputs": [], "attempt": 1,
                                "created": "2026-11-29T00:00:00+00:00", **fields}))


# -- manifests ---------------------------------------------------------------------
def test_manifest_copied_into_another_session_is_refused(store: Path, kernels: Kernels) -> None:
    with _kernel(kernels, "c.ipynb") as c:
        c.run("z = 'secret of c'")
        snapshot_line(c.run("%spot snapshot"))
    with _kernel(kernels, "d.ipynb") as d:
        d.run("w = 'work of d'")
        snapshot_line(d.run("%spot snapshot"))
    snapshots = open_store(str(store))
    stolen = snapshots.list_snapshots("c.ipynb")[-1]
    planted = snapshots._manifest_path("d.ipynb", NEWER_ID)  # type: ignore[attr-defined]
    shutil.copy(snapshots._manifest_path("c.ipynb", stolen), planted)  # type: ignore[attr-defined]
    with pytest.raises(ManifestError, match=f"signed for snapshot {stolen} of session 'c.ipynb'"):
        snapshots.load_manifest("d.ipynb", NEWER_ID)

    with _kernel(kernels, "d.ipynb") as d:
        report = d.run("%spot restore latest")
        assert d.value("'z' in globals()") is False
        assert d.value("w") == "work of d"
        assert f"snapshot {NEWER_ID} cannot be used" in report
        assert f"signed for snapshot {stolen} of session 'c.ipynb'" in report
    # The planted copy is refused, not deleted: nothing in the store is lost.
    assert planted.exists() and NEWER_ID in snapshots.list_snapshots("d.ipynb")


def test_manifest_replayed_under_another_id_of_its_own_session_is_refused(store: Path) -> None:
    from jupyter_spot.store import FileStore

    snapshots = FileStore(store)
    snapshots.commit_manifest({"session": "c.ipynb", "id": "20261129T000001.000000Z-aaaa", "blobs": []})
    planted = snapshots._manifest_path("c.ipynb", NEWER_ID)
    shutil.copy(snapshots._manifest_path("c.ipynb", "20261129T000001.000000Z-aaaa"), planted)
    with pytest.raises(ManifestError, match="signed for snapshot 20261129T000001.000000Z-aaaa"):
        snapshots.load_manifest("c.ipynb", NEWER_ID)
    manifest, problems = snapshots.latest_manifest("c.ipynb")
    assert manifest is not None and manifest["id"] == "20261129T000001.000000Z-aaaa" and NEWER_ID in problems[0]


# -- job specs and results -----------------------------------------------------------
def test_forged_record_with_another_sessions_spec_or_result_is_not_run_or_loaded(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    effects = tmp_path / "effects"
    with _kernel(kernels, "c.ipynb") as c:
        c.run(f"effects = {str(effects)!r}")
        c.run("%%spot_job --name effect\nwith open(effects, 'a') as f:\n    f.write('ran\\n')\nloot = 42")
        until(lambda: _job(store, "effect")["state"] == "done", DEADLINE, "c's job to finish")
    assert effects.read_text() == "ran\n"
    original = _job(store, "effect")
    with _kernel(kernels, "d.ipynb") as d:
        d.run("w = 1")
        snapshot_line(d.run("%spot snapshot"))
    # A lost job of d (running on a machine that is gone) carrying c's signed spec, and a
    # finished job of d carrying c's signed outputs.
    _forge(store, "20261129T000000-f00d", session="d.ipynb", name="stolen", state="running", host="gone-machine",
           pid=1, heartbeat=None, spec=original["spec"])
    _forge(store, "20261129T000001-f00d", session="d.ipynb", name="looted", state="done", host="gone-machine",
           result=original["result"], collected_at=None)
    # c's own record replayed into d: same id, so only the session in the signature can tell.
    replayed = {**original, "session": "d.ipynb", "name": "replayed", "state": "running", "host": "gone-machine",
                "heartbeat": None, "result": None}
    _record_path(store, original["id"]).write_text(json.dumps(replayed))

    with _kernel(kernels, "d.ipynb") as d:
        report = d.run("%spot restore latest")
        assert d.value("'loot' in globals()") is False
        for name in ("stolen", "looted", "replayed"):
            assert f"job {name} " in report
        assert report.count("of session 'c.ipynb'") >= 3, report
    assert "re-running" not in report
    assert _job(store, "stolen")["state"] == "running" and _job(store, "replayed")["state"] == "running"
    assert not _runners(store) and effects.read_text() == "ran\n"


# -- cancelling --------------------------------------------------------------------
def test_cancel_of_a_forged_record_never_signals_a_process_that_is_not_its_runner(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    release = tmp_path / "release"
    victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        with _kernel(kernels, "c.ipynb") as c:
            c.run(f"release = {str(release)!r}")
            c.run("%%spot_job --name waiter\nimport os, time\nwhile not os.path.exists(release):\n"
                  "    time.sleep(0.02)\nfinished = True")
            running = until(lambda: (j := _job(store, "waiter"))["state"] == "running" and j, DEADLINE, "c's job to run")
            with _kernel(kernels, "d.ipynb") as d:
                # an unsigned record naming any process of the user whose command line holds its id
                _forge(store, "sleep", session="d.ipynb", name="victim", state="running",
                       host=socket.gethostname(), pid=victim.pid)
                # a record whose id is part of c's job id, with c's runner pid and c's signed runner claim
                _forge(store, running["id"][:-1], session="d.ipynb", name="runner-of-c", state="running",
                       host=socket.gethostname(), pid=running["pid"], runner=running.get("runner"))
                for name in ("victim", "runner-of-c"):
                    out = d.run(f"%spot_job cancel {name}", allow_error=True)
                    assert "not signalling" in out, out
            assert victim.poll() is None, "the forged record's cancel killed an unrelated process"
            assert running["pid"] in _runners(store), "the forged record's cancel killed c's runner"
            release.touch()
            until(lambda: _job(store, "waiter")["state"] == "done", DEADLINE, "c's job to finish")
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.faults  # SIGKILLs a kernel whose job runner must live on
def test_cancel_stops_a_real_runner_from_its_kernel_and_from_a_fresh_kernel(
    store: Path, tmp_path: Path, kernels: Kernels
) -> None:
    kernel = _kernel(kernels, "d.ipynb")
    kernel.run(f"never = {str(tmp_path / 'never')!r}")
    kernel.run("%%spot_job --name mine\nimport os, time\nwhile not os.path.exists(never):\n    time.sleep(0.02)")
    mine = until(lambda: (j := _job(store, "mine"))["state"] == "running" and j, DEADLINE, "the job to run")
    assert "job mine cancelled" in kernel.run("%spot_job cancel mine")  # the runner this kernel started
    assert mine["pid"] not in _runners(store) and _job(store, "mine")["state"] == "cancelled"
    kernel.run("%%spot_job --name forever\nimport os, time\nwhile not os.path.exists(never):\n    time.sleep(0.02)")
    job = until(lambda: (j := _job(store, "forever"))["state"] == "running" and j, DEADLINE, "the job to run")
    snapshot_line(kernel.run("%spot snapshot"))
    kernel.kill()  # the runner is in its own session: it lives on
    assert job["pid"] in _runners(store)
    with _kernel(kernels, "d.ipynb") as fresh:
        assert "job forever is still running" in fresh.run("%spot restore latest")
        assert "job forever cancelled" in fresh.run("%spot_job cancel forever")
    until(lambda: job["pid"] not in _runners(store), DEADLINE, "the runner to go")
    assert _job(store, "forever")["state"] == "cancelled"


# -- another local user ------------------------------------------------------------
def test_a_local_store_and_the_key_file_are_private_to_their_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_spot.store import FileStore, ManifestSigner, digest_of

    monkeypatch.delenv("JUPYTER_SPOT_SIGNING_KEY", raising=False)
    monkeypatch.setenv("JUPYTER_SPOT_SIGNING_KEY_FILE", str(tmp_path / "keys" / "signing.key"))
    signer = ManifestSigner.default()  # a fresh machine: the key is made here
    store = FileStore(tmp_path / "store", signer=signer)
    data = b"pickled variables"
    store.put_blob(digest_of(data), data)
    store.commit_manifest({"session": "nb.ipynb", "id": "20261129T000001.000000Z-aaaa", "blobs": [digest_of(data)]})
    store.put_record("job-20261129T000000-abcd", {"id": "20261129T000000-abcd"})
    files = [path for path in (tmp_path / "store").rglob("*") if path.is_file()]
    assert len(files) == 3
    for path in [*files, tmp_path / "keys" / "signing.key"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others: {oct(path.stat().st_mode)}"


def test_a_signature_that_is_not_ascii_is_refused_like_any_bad_signature(store: Path) -> None:
    """hmac.compare_digest raises TypeError on non-ASCII text: that must be a refusal, not a crash of the restore."""
    from jupyter_spot.store import FileStore

    snapshots = FileStore(store)
    good, planted = "20261129T000001.000000Z-aaaa", "20261129T000002.000000Z-bbbb"
    snapshots.commit_manifest({"session": "nb.ipynb", "id": good, "blobs": []})
    snapshots.commit_manifest({"session": "nb.ipynb", "id": planted, "blobs": []})
    path = snapshots._manifest_path("nb.ipynb", planted)
    envelope = json.loads(path.read_bytes())
    envelope["signature"] = "\u00e9" * 64
    path.write_text(json.dumps(envelope))
    with pytest.raises(ManifestError, match="not signed by this machine's key"):
        snapshots.load_manifest("nb.ipynb", planted)
    manifest, problems = snapshots.latest_manifest("nb.ipynb")
    assert manifest is not None and manifest["id"] == good and planted in problems[0]


# -- kinds, and the old format -------------------------------------------------------
def test_a_signature_for_one_kind_never_verifies_another(store: Path) -> None:
    from jupyter_spot.store import FileStore
    from jupyter_spot.store.manifest import KINDS, job_place

    signer = FileStore(store).signer
    place = job_place("nb.ipynb", "20261129T000000-abcd")
    for signed_as in KINDS:
        data = signer.encode({"id": "20261129T000000-abcd", "session": "nb.ipynb"}, signed_as, place)
        assert signer.decode(data, signed_as, place)["session"] == "nb.ipynb"
        for read_as in KINDS - {signed_as}:
            with pytest.raises(ManifestError, match=f"this is a signed {signed_as}, not a {read_as}"):
                signer.decode(data, read_as, place)


def _old_format(body: dict[str, Any]) -> bytes:
    """What versions before the binding wrote (jupyter-spot-manifest/1: only the body signed)."""
    import hashlib
    import hmac

    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    key = os.environ["JUPYTER_SPOT_SIGNING_KEY"].encode()
    signature = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"format": "jupyter-spot-manifest/1", "signature": signature, "manifest": text}).encode()


def test_old_format_manifests_load_only_where_their_body_says_and_old_job_documents_not_at_all(store: Path) -> None:
    from jupyter_spot.jobs import record
    from jupyter_spot.store import FileStore

    snapshots = FileStore(store)
    old_id = "20261129T000001.000000Z-aaaa"
    manifest = {"session": "c.ipynb", "id": old_id, "groups": {}, "variables": {}, "blobs": []}
    path = snapshots._manifest_path("c.ipynb", old_id)
    path.parent.mkdir(parents=True)
    path.write_bytes(_old_format(manifest))
    assert snapshots.load_manifest("c.ipynb", old_id) == manifest  # an upgrade costs no snapshot
    for session, snapshot_id in [("d.ipynb", old_id), ("c.ipynb", NEWER_ID)]:
        copy = snapshots._manifest_path(session, snapshot_id)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
        with pytest.raises(ManifestError, match=f"signed for snapshot {old_id} of session 'c.ipynb'"):
            snapshots.load_manifest(session, snapshot_id)
    # an old job spec, planted as a manifest at the place its body names: not a manifest
    job_id = "20261129T000000-abcd"
    spec = {"id": job_id, "session": "c.ipynb", "source": "print('x')", "inputs": {}}
    planted = snapshots._manifest_path("c.ipynb", job_id)
    planted.write_bytes(_old_format(spec))
    with pytest.raises(ManifestError, match="not a manifest"):
        snapshots.load_manifest("c.ipynb", job_id)
    with pytest.raises(record.JobError, match="old format"):
        record.spec(snapshots, {"id": job_id, "session": "c.ipynb", "spec": _old_format(spec).decode()})


def test_the_runner_refuses_a_record_carrying_another_jobs_spec(store: Path, tmp_path: Path) -> None:
    import sys

    from jupyter_spot.jobs import record
    from jupyter_spot.store import FileStore
    from jupyter_spot.store.manifest import JOB_SPEC

    snapshots = FileStore(store)
    marker = tmp_path / "ran"
    spec = {"id": "20261129T000000-aaaa", "session": "c.ipynb", "name": "x", "source": f"open({str(marker)!r}, 'w')",
            "inputs": {"modules": {}, "definitions": {}, "data_names": [], "data": None}, "outputs": [],
            "explicit_outputs": False}
    signed = record.sign(snapshots, spec, JOB_SPEC, "c.ipynb", spec["id"])
    _forge(store, "20261129T000000-bbbb", session="c.ipynb", name="copy", state="queued", spec=signed)
    ran = subprocess.run([sys.executable, "-m", "jupyter_spot.jobs.runner", str(store), "20261129T000000-bbbb"],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and "signed for job 20261129T000000-aaaa of session 'c.ipynb'" in ran.stderr
    assert not marker.exists() and _job(store, "copy")["state"] == "queued"

"""``jupyter spot list | show | gc | doctor`` as a user runs them (subprocesses, a real store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness.spot_cli import spot
from harness.store import commit_snapshot

from jupyter_spot.store import open_store
from jupyter_spot.store.holders import session_record_name

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(spot_env: Path) -> Any:
    return open_store(str(spot_env))


def test_list_marks_interrupted_and_closed(store: Any) -> None:
    commit_snapshot(store, "work/a.ipynb", minutes_ago=10)
    latest = commit_snapshot(store, "work/a.ipynb", minutes_ago=5)
    commit_snapshot(store, "done.ipynb", minutes_ago=5)
    store.put_record(
        session_record_name("done.ipynb"),
        {"session": "done.ipynb", "state": "closed", "closed_at": "2099-01-01T00:00:00Z"},
    )
    text = spot("list").stdout
    assert "work/a.ipynb\n    INTERRUPTED  latest " + latest in text
    assert "done.ipynb\n    closed" in text
    data = json.loads(spot("list", "--json").stdout)
    assert {s["id"]: s["interrupted"] for s in data["sessions"]} == {"work/a.ipynb": True, "done.ipynb": False}
    per_session = json.loads(spot("list", "--session=work/a.ipynb", "--json").stdout)
    assert [s["id"] for s in per_session["snapshots"]][0] == latest


def test_list_says_why_a_store_path_holds_nothing(tmp_path: Path) -> None:
    """A mistyped store path is named as missing, and one through a regular file fails: neither is
    reported as an empty store. Listing creates nothing."""
    missing = spot("list", f"--store={tmp_path}/stroe")
    assert missing.stdout.strip() == f"no sessions in {tmp_path}/stroe ({tmp_path}/stroe does not exist)"
    assert not (tmp_path / "stroe").exists()
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    through_file = spot("list", f"--store={blocker}/store", check=False)
    assert through_file.returncode == 1
    assert f"{blocker} is a file, not a directory" in through_file.stderr and not through_file.stdout
    assert blocker.read_text() == "x"


def test_show_by_snapshot_id_and_by_session(store: Any) -> None:
    snapshot_id = commit_snapshot(store, "work/a.ipynb", minutes_ago=3)
    by_id = spot("show", snapshot_id).stdout
    assert f"snapshot {snapshot_id} of work/a.ipynb" in by_id
    assert "sqlite3.Connection: cannot pickle (cell 2)" in by_id
    assert spot("show", "work/a.ipynb").stdout == by_id
    manifest = json.loads(spot("show", snapshot_id, "--json").stdout)
    assert manifest["id"] == snapshot_id and manifest["blobs"]


def test_show_unknown_and_tampered_fail_clearly(store: Any, spot_env: Path) -> None:
    snapshot_id = commit_snapshot(store, "a.ipynb", minutes_ago=3)
    missing = spot("show", "20200101T000000.000000Z-x", check=False)
    assert missing.returncode == 1 and "no session or snapshot" in missing.stderr
    (manifest_file,) = (spot_env / "sessions").glob("*/*.json")
    manifest_file.write_text(manifest_file.read_text().replace('"execution_count\\":3', '"execution_count\\":4'))
    tampered = spot("show", snapshot_id, check=False)
    assert tampered.returncode == 1 and "not signed by this machine's key" in tampered.stderr
    assert manifest_file.exists()  # bad input loses nothing


def test_gc_keeps_newest(store: Any) -> None:
    ids = [commit_snapshot(store, "a.ipynb", minutes_ago=m) for m in (30, 20, 10)]
    report = json.loads(spot("gc", "--keep=1", "--json").stdout)
    assert sorted(report["snapshots_deleted"]) == [f"a.ipynb/{i}" for i in ids[:2]]
    assert store.list_snapshots("a.ipynb") == ids[2:]
    refused = spot("gc", "--keep=0", check=False)
    assert refused.returncode == 1 and "at least 1" in refused.stderr
    assert store.list_snapshots("a.ipynb") == ids[2:]


def test_doctor_passes_on_a_writable_store_and_fails_on_a_broken_one(spot_env: Path, tmp_path: Path) -> None:
    healthy = json.loads(spot("doctor", "--json", "--no-probe").stdout)["checks"]
    by_name = {c["check"]: c for c in healthy}
    assert by_name["store"]["ok"] and by_name["signing key"]["ok"] and by_name["kernel extension"]["ok"]
    assert by_name["notices"]["required"] is False
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    broken = spot("doctor", f"--store={blocker}/store", "--no-probe", check=False)
    assert broken.returncode == 1
    assert "FAIL  store" in broken.stdout and "plain-file" in broken.stdout


def test_doctor_reaches_the_simulated_metadata_endpoint(spot_env: Path) -> None:
    from jupyter_spot.notice.simulator import Simulator

    with Simulator("aws") as simulator:
        result = spot("doctor", "--json", JUPYTER_SPOT_CLOUD="aws", AWS_EC2_METADATA_SERVICE_ENDPOINT=simulator.url)
    notices = {c["check"]: c for c in json.loads(result.stdout)["checks"]}["notices"]
    assert notices["ok"], notices
    assert notices["detail"] == "aws: metadata endpoint answers (no notice standing)"

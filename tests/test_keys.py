"""Signing keys that survive the machine: KMS-wrapped keys in the store, rotation, doctor.

Machine A and machine B are separate processes (kernels) with their own Jupyter
data dirs sharing one store on moto's standalone server, which serves S3 and
KMS at the same endpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from harness import FaultPause, JupyterServer, Kernel, snapshot_line, until, write_notebook
from harness.browser import shot
from harness.lab_notebook import NOTEBOOK, notebook_url
from playwright.sync_api import Page, expect

SESSION = "analysis.ipynb"
Kernels = Callable[..., Kernel]


@pytest.fixture
def shared_store(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh S3 store (the suite's moto, which serves KMS too) that this process and every process
    it starts use, with no signing key given: the keys must come from the store (or be missing)."""
    for name in ("JUPYTER_SPOT_SIGNING_KEY", "JUPYTER_SPOT_SIGNING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_SPOT_STORE", s3_url)
    monkeypatch.setenv("JUPYTER_SPOT_SESSION", SESSION)
    return s3_url


def bucket_and_prefix(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix


@pytest.fixture
def kms_key(shared_store: str) -> str:
    """A fresh KMS key, named by an alias as users usually do."""
    kms = boto3.client("kms")
    key_id = kms.create_key(Description="jupyter-spot test")["KeyMetadata"]["KeyId"]
    alias = f"alias/spot-{secrets.token_hex(4)}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return alias


def machine(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Become machine ``name``: its own, empty Jupyter data dir."""
    data_dir = tmp_path / f"machine-{name}"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data_dir))
    return data_dir


def secret_files(data_dir: Path) -> list[Path]:
    return [path for path in data_dir.rglob("*") if path.is_file() and "key" in path.name]


# -- the main job: restore on a fresh machine ------------------------------------------
@pytest.mark.s3
def test_fresh_machine_restores_with_the_kms_key_and_no_key_copied(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: Kernels
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    data_a = machine(tmp_path, "a", monkeypatch)
    with kernels(load=True) as kernel:
        kernel.run("weights = {'alpha': 0.25, 'beta': [1, 2, 3]}")
        snapshot_line(kernel.run("%spot snapshot"))
    data_b = machine(tmp_path, "b", monkeypatch)
    with kernels(load=True) as fresh:
        report = fresh.run("%spot restore latest")
        assert "restored snapshot" in report, report
        assert fresh.value("weights") == {"alpha": 0.25, "beta": [1, 2, 3]}
    # Nothing secret on either machine's disk: the key lives wrapped in the store.
    assert secret_files(data_a) == [] and secret_files(data_b) == []
    bucket, prefix = bucket_and_prefix(shared_store)
    keys = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/keys/")
    assert [item["Key"] for item in keys["Contents"]] == [f"{prefix}/keys/000001.json"]


@pytest.mark.s3
def test_fresh_machine_without_kms_names_the_fix_and_restores_nothing(
    shared_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: Kernels
) -> None:
    machine(tmp_path, "a", monkeypatch)
    with kernels(load=True) as kernel:
        kernel.run("secret_model = 42")
        snapshot_line(kernel.run("%spot snapshot"))
    machine(tmp_path, "b", monkeypatch)
    with kernels(load=True) as fresh:
        restore = fresh.run("%spot restore latest", allow_error=True)
        listing = fresh.run("%spot list")
        assert "NameError" in fresh.run("secret_model", allow_error=True)  # nothing was unpickled
    for text in (restore, listing):
        assert "signed with key local-" in text, text
        assert "JUPYTER_SPOT_KMS_KEY" in text and "JUPYTER_SPOT_SIGNING_KEY" in text, text
    assert "restored snapshot" not in restore


@pytest.mark.s3
def test_fresh_machine_missing_the_kms_setting_is_told_which_kms_key(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: Kernels
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    machine(tmp_path, "a", monkeypatch)
    with kernels(load=True) as kernel:
        kernel.run("secret_model = 42")
        snapshot_line(kernel.run("%spot snapshot"))
    arn = boto3.client("kms").describe_key(KeyId=kms_key)["KeyMetadata"]["Arn"]
    monkeypatch.delenv("JUPYTER_SPOT_KMS_KEY")
    machine(tmp_path, "b", monkeypatch)
    with kernels(load=True) as fresh:
        restore = fresh.run("%spot restore latest", allow_error=True)
        listing = fresh.run("%spot list")
        assert "NameError" in fresh.run("secret_model", allow_error=True)
    assert f"restore failed: no usable snapshot of session {SESSION!r}" in restore, restore
    assert f"Fix: it is wrapped by KMS in the store: set JUPYTER_SPOT_KMS_KEY={arn}" in restore, restore
    assert "unusable: signed with key kms-000001, which this machine does not have" in listing, listing
    assert listing.count(f"JUPYTER_SPOT_KMS_KEY={arn}") == 1, listing  # the fix once, not per snapshot


# -- machines as plain processes: rotation, concurrent creation, the tiered store -----
SIGN = """
import json, sys
from jupyter_spot.store import open_store
store = open_store(sys.argv[1])
store.commit_manifest({"session": sys.argv[2], "id": sys.argv[3], "blobs": []})
print(json.loads(store._read_manifest(sys.argv[2], sys.argv[3]))["key"])
"""

VERIFY = """
import json, sys
from jupyter_spot.store import open_store
store = open_store(sys.argv[1])
print(json.dumps([store.load_manifest(s, i)["id"] for s in store.list_sessions() for i in store.list_snapshots(s)]))
"""


def on_machine(tmp_path: Path, name: str, script: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """``script`` in a new process with its own data dir and no local signing key."""
    data_dir = tmp_path / f"machine-{name}"
    environment = {**os.environ, "JUPYTER_DATA_DIR": str(data_dir), **env}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], env=environment, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def output(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.strip()


def spot_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "machine-admin"), "JUPYTER_SPOT_CLOUD": "none"}
    return subprocess.run(
        [sys.executable, "-c", "from jupyter_spot.cli import main; main()", *args], env=env, text=True, capture_output=True, timeout=120
    )


def key_objects(url: str) -> list[str]:
    bucket, prefix = bucket_and_prefix(url)
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/keys/")
    return [item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])]


def both_held(pauses: list[FaultPause], processes: list[subprocess.Popen[str]]) -> bool:
    """Whether every process is held at key creation; fails the test at once if one has exited."""
    exited = [p for p in processes if p.poll() is not None]
    assert not exited, [p.communicate() for p in exited]
    return all((pause.folder / "key-create.reached").exists() for pause in pauses)


@pytest.mark.s3
def test_rotation_signs_with_the_new_key_and_old_snapshots_still_verify(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    assert output(on_machine(tmp_path, "a", SIGN, shared_store, SESSION, "0001")) == "kms-000001"
    rotated = spot_cli(tmp_path, "key", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "kms-000002" in rotated.stdout and "older ones still verify" in rotated.stdout
    assert output(on_machine(tmp_path, "b", SIGN, shared_store, SESSION, "0002")) == "kms-000002"
    assert json.loads(output(on_machine(tmp_path, "c", VERIFY, shared_store))) == ["0001", "0002"]
    assert key_objects(shared_store) == ["000001.json", "000002.json"]
    shown = spot_cli(tmp_path, "key", "--json")
    assert json.loads(shown.stdout)["current"] == "kms-000002", shown.stderr


@pytest.mark.s3
@pytest.mark.faults  # holds two writers at key creation
def test_two_machines_creating_the_first_key_at_once_agree_on_one(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    pauses = [FaultPause(tmp_path / f"pause-{name}", "key-create") for name in "ab"]
    writers = [on_machine(tmp_path, name, SIGN, shared_store, f"{name}.ipynb", "0001", **pause.env)
               for name, pause in zip("ab", pauses)]
    # both hold a fresh data key, neither has written it
    until(lambda: both_held(pauses, writers), 60, "both writers to reach key creation")
    # One finishes first (its snapshot signed); only then may the other write its key object.
    pauses[0].release("key-create")
    first = output(writers[0])
    pauses[1].release("key-create")
    assert [first, output(writers[1])] == ["kms-000001", "kms-000001"]
    assert key_objects(shared_store) == ["000001.json"]
    # The loser signed with the winner's key, not its own: a third machine verifies both.
    assert sorted(json.loads(output(on_machine(tmp_path, "c", VERIFY, shared_store)))) == ["0001", "0001"]


@pytest.mark.s3
@pytest.mark.faults  # holds two rotations at key creation
def test_two_rotations_at_once_make_one_new_key(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    assert output(on_machine(tmp_path, "a", SIGN, shared_store, SESSION, "0001")) == "kms-000001"
    rotate = "import sys\nfrom jupyter_spot.store import open_store\nprint(open_store(sys.argv[1]).signer.ring.kms.rotate().id)"
    pauses = [FaultPause(tmp_path / f"pause-{name}", "key-create") for name in "ab"]
    rotators = [on_machine(tmp_path, name, rotate, shared_store, **pause.env) for name, pause in zip("ab", pauses)]
    # both have made key 2 in memory, neither has written it
    until(lambda: both_held(pauses, rotators), 60, "both rotations to reach key creation")
    pauses[0].release("key-create")
    first = output(rotators[0])
    pauses[1].release("key-create")
    assert [first, output(rotators[1])] == ["kms-000002", "kms-000002"]
    assert key_objects(shared_store) == ["000001.json", "000002.json"]
    assert output(on_machine(tmp_path, "c", SIGN, shared_store, SESSION, "0002")) == "kms-000002"
    assert json.loads(output(on_machine(tmp_path, "d", VERIFY, shared_store))) == ["0001", "0002"]


@pytest.mark.s3
def test_forged_key_objects_are_skipped_not_trusted_and_break_nothing(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who may write to the store but not use our KMS key plants key objects."""
    import base64

    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    bucket, prefix = bucket_and_prefix(shared_store)
    kms = boto3.client("kms")
    their_key = kms.create_key()["KeyMetadata"]["KeyId"]
    planted = kms.generate_data_key(
        KeyId=their_key, KeySpec="AES_256",
        EncryptionContext={"purpose": "jupyter-spot signing key", "key-id": "kms-000002"},
    )
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/keys/000001.json", Body=b"not json")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/keys/000002.json", Body=json.dumps({
        "format": "jupyter-spot-key/1", "id": "kms-000002", "kms_key": their_key,
        "ciphertext": base64.b64encode(planted["CiphertextBlob"]).decode(),
    }).encode())
    signer = on_machine(tmp_path, "a", SIGN, shared_store, SESSION, "0001")
    assert output(signer) == "kms-000003"  # its own key, made beside the planted ones
    assert json.loads(output(on_machine(tmp_path, "b", VERIFY, shared_store))) == ["0001"]
    # An envelope that names a planted key is refused, not verified with the attacker's key.
    manifest_key = f"{prefix}/sessions/{SESSION}/0001.json"
    envelope = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    body = envelope["body"].replace('"blobs":[]', '"blobs":[],"evil":1').replace('"id":"0001"', '"id":"0002"')
    import hashlib
    import hmac

    from jupyter_spot.store.manifest import MANIFEST, _message, snapshot_place

    place = snapshot_place(SESSION, "0002")
    forged = {**envelope, "key": "kms-000002", "body": body, "place": place,
              "signature": hmac.new(planted["Plaintext"], _message(MANIFEST, place, body), hashlib.sha256).hexdigest()}
    s3.put_object(Bucket=bucket, Key=f"{prefix}/sessions/{SESSION}/0002.json", Body=json.dumps(forged).encode())
    verify = on_machine(tmp_path, "c", VERIFY, shared_store)
    _, err = verify.communicate(timeout=120)
    assert verify.returncode != 0 and "kms-000002" in err and "refusing to unpickle" in err, err


@pytest.mark.s3
def test_a_tiered_store_signs_with_the_keys_in_s3(
    shared_store: str, kms_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", kms_key)
    cache = tmp_path / "efs-cache"
    script = SIGN + "assert store.kind == 'tiered' and store.flush_replication() == []\n"
    assert output(on_machine(tmp_path, "a", script, shared_store, SESSION, "0001", JUPYTER_SPOT_CACHE=str(cache))) == "kms-000001"
    assert not (cache / "keys").exists()  # the keys live with the durable copy
    assert key_objects(shared_store) == ["000001.json"]
    assert json.loads(output(on_machine(tmp_path, "b", VERIFY, shared_store))) == ["0001"]


# -- jupyter spot doctor -------------------------------------------------------------
def doctor(tmp_path: Path, **env: str) -> tuple[int, str, str]:
    environment = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "machine-a"), "JUPYTER_SPOT_CLOUD": "none", **env}
    result = subprocess.run(
        [sys.executable, "-c", "from jupyter_spot.cli import main; main()", "doctor", "--no-probe"],
        env=environment, text=True, capture_output=True, timeout=120,
    )
    return result.returncode, result.stdout, result.stderr


def key_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "signing key" in line]
    assert lines, text
    return "\n".join(lines)


@pytest.mark.s3
def test_doctor_fails_when_a_shared_store_has_a_key_only_this_machine_holds(shared_store: str, tmp_path: Path) -> None:
    status, out, err = doctor(tmp_path)
    assert status == 1, out + err
    line = key_line(out)
    assert line.startswith("FAIL") and "exists only on this machine" in line, out
    assert "export JUPYTER_SPOT_KMS_KEY=" in line, out


@pytest.mark.s3
def test_doctor_warns_when_a_shared_store_relies_on_an_env_key(shared_store: str, tmp_path: Path) -> None:
    status, out, err = doctor(tmp_path, JUPYTER_SPOT_SIGNING_KEY=secrets.token_hex(32))
    assert status == 0, out + err  # the user may set the same key everywhere: a warning, with the better way
    line = key_line(out)
    assert line.startswith("warn") and "same value" in line and "export JUPYTER_SPOT_KMS_KEY=" in line, out


@pytest.mark.s3
def test_doctor_passes_with_kms_keys_in_the_store(shared_store: str, kms_key: str, tmp_path: Path) -> None:
    status, out, err = doctor(tmp_path, JUPYTER_SPOT_KMS_KEY=kms_key)
    assert status == 0, out + err
    assert key_line(out).startswith("ok") and kms_key in key_line(out), out


@pytest.mark.s3
def test_doctor_fails_clearly_when_kms_refuses(shared_store: str, tmp_path: Path) -> None:
    status, out, err = doctor(tmp_path, JUPYTER_SPOT_KMS_KEY="alias/no-such-key")
    assert status == 1 and "Traceback" not in err, out + err
    line = key_line(out)
    assert line.startswith("FAIL") and "KMS refused making a signing key with alias/no-such-key" in line, out
    assert "needs kms:GenerateDataKey on that key" in line, out


def test_doctor_warns_about_a_readable_or_short_key_file(spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_SPOT_SIGNING_KEY")
    key_file = tmp_path / "signing.key"
    key_file.write_text("tooshort\n")
    key_file.chmod(0o644)
    status, out, err = doctor(tmp_path, JUPYTER_SPOT_SIGNING_KEY_FILE=str(key_file))
    assert status == 0, out + err  # warnings, not failures
    line = key_line(out)
    assert f"chmod 600 {key_file}" in line and line.startswith("warn"), out
    assert "8 bytes" in line and 'python -c "import secrets; print(secrets.token_hex(32))"' in line, out


def test_doctor_reports_an_empty_key_as_a_failed_check(spot_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_SPOT_SIGNING_KEY")
    key_file = tmp_path / "signing.key"
    key_file.write_text("\n")
    key_file.chmod(0o600)
    status, out, err = doctor(tmp_path, JUPYTER_SPOT_SIGNING_KEY_FILE=str(key_file))
    assert status == 1 and "Traceback" not in err, out + err
    assert key_line(out).startswith("FAIL") and "empty" in key_line(out), out


def test_shared_mounts_are_told_from_local_disks() -> None:
    from jupyter_spot.server.doctor_keys import shared_mount

    mounts = "\n".join([
        "/dev/nvme0n1p1 / ext4 rw,relatime 0 0",
        "fs-123.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0",
        "/dev/nvme1n1 /mnt/efs/local\\040disk xfs rw 0 0",
        "s3fs /mnt/bucket fuse.s3fs rw 0 0",
        "//nas/share /mnt/nas cifs rw 0 0",
    ])
    assert shared_mount("/mnt/efs/team/store", mounts) == "on the nfs4 mount /mnt/efs"
    assert shared_mount("/mnt/bucket/spot", mounts) == "on the fuse.s3fs mount /mnt/bucket"
    assert shared_mount("/mnt/nas/x", mounts) == "on the cifs mount /mnt/nas"
    assert shared_mount("/mnt/efs/local disk/store", mounts) is None  # the longest mount point wins
    assert shared_mount("/home/me/store", mounts) is None
    assert shared_mount("/mnt/efsx/store", mounts) is None


# -- what a fresh machine's server and CLI say ------------------------------------------
@pytest.fixture
def jp_server_config(spot_env: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    spot: dict[str, Any] = {"notice_sources": []}
    if "server_kms" in request.fixturenames:
        spot["kms_key_id"] = request.getfixturevalue("server_kms")
    return {"ServerApp": {"jpserver_extensions": {"jupyter_spot": True}}, "SpotApp": spot}


@pytest.fixture
def server_kms(shared_store: str, kms_key: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A KMS key given to the server as c.SpotApp.kms_key_id only (the variable it sets is undone after)."""
    monkeypatch.setenv("JUPYTER_SPOT_KMS_KEY", "unset after the test")
    monkeypatch.delenv("JUPYTER_SPOT_KMS_KEY")
    return kms_key


@pytest.mark.s3
async def test_server_config_kms_key_verifies_and_reaches_its_kernels(
    server_kms: str, shared_store: str, tmp_path: Path, jp_serverapp: Any, jp_fetch: Any
) -> None:
    writer = on_machine(tmp_path, "a", SIGN, shared_store, SESSION, "0001", JUPYTER_SPOT_KMS_KEY=server_kms)
    assert output(writer) == "kms-000001"
    reply = json.loads((await jp_fetch("jupyter-spot", "api", "sessions", params={"path": SESSION})).body)
    assert [s["id"] for s in reply["sessions"]] == [SESSION] and reply["unverifiable"] == []
    assert os.environ["JUPYTER_SPOT_KMS_KEY"] == server_kms  # what its kernels and their jobs inherit


def written_on_another_machine(store_root: Path, session: str) -> str:
    """A snapshot signed with a key this machine never had (machine A's key file)."""
    from jupyter_spot.store import FileStore, ManifestSigner

    elsewhere = FileStore(store_root, signer=ManifestSigner(secrets.token_hex(32).encode(), key_source="machine A"))
    elsewhere.commit_manifest({"session": session, "id": "20261129T000001.000000Z-a", "blobs": []})
    return json.loads(elsewhere._read_manifest(session, "20261129T000001.000000Z-a"))["key"]


async def test_sessions_api_names_the_fix_for_snapshots_signed_elsewhere(
    jp_serverapp: Any, jp_fetch: Any, spot_env: Path
) -> None:
    key_id = written_on_another_machine(spot_env, "work/a.ipynb")
    reply = json.loads((await jp_fetch("jupyter-spot", "api", "sessions", params={"path": "work/a.ipynb"})).body)
    assert reply["sessions"] == []  # nothing offered for restore
    (problem,) = reply["unverifiable"]
    assert problem["id"] == "work/a.ipynb" and problem["key_id"] == key_id and problem["snapshots"] == 1
    assert "JUPYTER_SPOT_KMS_KEY" in problem["fix"] and "JUPYTER_SPOT_SIGNING_KEY" in problem["fix"]
    assert problem["message"].startswith("This notebook has 1 snapshot signed with key local-")


async def test_restore_api_answers_409_with_the_fix_and_starts_no_kernel(
    jp_serverapp: Any, jp_fetch: Any, spot_env: Path
) -> None:
    from tornado.httpclient import HTTPClientError

    written_on_another_machine(spot_env, "a.ipynb")
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("jupyter-spot", "api", "sessions", "a.ipynb", "restore", method="POST", body="{}")
    assert caught.value.code == 409
    message = json.loads(caught.value.response.body)["message"]
    assert "which this machine does not have" in message and "JUPYTER_SPOT_KMS_KEY" in message, message
    assert jp_serverapp.kernel_manager.list_kernel_ids() == []


def test_cli_list_shows_snapshots_signed_elsewhere_with_the_fix(spot_env: Path, tmp_path: Path) -> None:
    key_id = written_on_another_machine(spot_env, "work/a.ipynb")
    listed = spot_cli(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"UNVERIFIED  1 snapshot(s) signed with key {key_id}" in listed.stdout
    assert "fix: the key is on the machine that wrote it" in listed.stdout


@pytest.mark.browser
@pytest.mark.servers
@pytest.mark.parametrize("front_end", ["lab", "notebook"])
def test_lab_shows_the_fix_and_offers_no_restore_for_snapshots_signed_elsewhere(
    spot_env: Path, tmp_path: Path, jupyter_servers: Callable[..., JupyterServer], page: Page, front_end: str
) -> None:
    """In Lab and in Notebook 7's notebook page."""
    write_notebook(tmp_path / "root" / NOTEBOOK, "x = 1")
    written_on_another_machine(spot_env, NOTEBOOK)
    lab = jupyter_servers(
        "lab", tmp_path / "root", lab=True, store=spot_env, env={"JUPYTER_SPOT_CLOUD": "none"}, poll=0.5,
        options=["--SpotApp.gc_interval=0"],
    ).start()
    page.goto(notebook_url(lab, front_end), timeout=60_000)
    note = page.get_by_role("alert", name="Snapshots signed with another key")
    expect(note).to_be_visible(timeout=60_000)
    expect(note).to_contain_text(re.compile(
        r"This notebook has 1 snapshot signed with key local-[0-9a-f]{16}, which this machine does not "
        r"have, so none can be restored here\. To use them: .*JUPYTER_SPOT_KMS_KEY=.*JUPYTER_SPOT_SIGNING_KEY"
    ))
    expect(page.locator(".jp-spot-restore")).to_have_count(0)  # nothing offered that would load it
    shot(page, "unverified" if front_end == "lab" else "unverified-notebook7")
    note.get_by_role("button", name="Dismiss").click()
    expect(note).to_have_count(0)


def test_envelopes_name_their_key_and_a_forged_key_id_or_signature_is_refused(tmp_path: Path) -> None:
    from jupyter_spot.store import FileStore, ManifestError, ManifestSigner, UnknownKeyError

    store = FileStore(tmp_path / "store", signer=ManifestSigner(secrets.token_hex(32).encode(), key_source="test"))
    store.commit_manifest({"session": "nb", "id": "0001", "blobs": []})
    path = store.root / "sessions" / "nb" / "0001.json"
    envelope = json.loads(path.read_bytes())
    assert envelope["key"] == store.signer.ring.signing_key().id and envelope["key"].startswith("local-")
    for forged, error, text in [
        ({**envelope, "key": "kms-000007"}, UnknownKeyError, "signed with key kms-000007, which this machine does not have"),
        ({**envelope, "key": 7}, ManifestError, "names no valid key id"),
        ({**envelope, "signature": "é" * 64}, ManifestError, "do not match the signature"),
        ({k: v for k, v in envelope.items() if k != "key"}, None, ""),  # written before key ids: still verifies
    ]:
        path.write_text(json.dumps(forged))
        if error is None:
            assert store.load_manifest("nb", "0001")["id"] == "0001"
            continue
        with pytest.raises(error, match=text):
            store.load_manifest("nb", "0001")

"""The real stores a trial runs on, a reader that sees each tier as it is, and the damage a trial does.

One moto server (and one bucket) serves the whole campaign; each trial gets its
own prefix, directory and cache, so trials never see each other's snapshots.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the test harness

from harness.s3 import MotoServer  # noqa: E402

from jupyter_spot.store import FileStore, ManifestError, Store, StoreError  # noqa: E402

from .kernel import KernelPool  # noqa: E402
from .s3proxy import ErrorProxy  # noqa: E402


class Campaign:
    """What outlives one trial: a scratch directory, the signing key, moto, the error proxy."""

    def __init__(self, with_s3: bool = True) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="spot-faults-")
        self.root = Path(self._scratch.name)
        self.key = "campaign-" + secrets.token_hex(8)
        self._environ = dict(os.environ)  # given back by close(): this process reads the stores too
        self.moto: MotoServer | None = None
        self.proxy: ErrorProxy | None = None
        self.bucket = ""
        self.base_env = {
            **os.environ,
            "JUPYTER_SPOT_SIGNING_KEY": self.key,
            "JUPYTER_SPOT_CLOUD": "none",
            "JUPYTER_SPOT_SERVER_WATCHES": "1",  # notices come from this script, through the notice file
            "JUPYTER_DATA_DIR": str(self.root / "jupyter-data"),
            "IPYTHONDIR": str(self.root / "ipython"),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for name in ("JUPYTER_SPOT_SESSION", "JPY_SESSION_NAME", "JUPYTER_SPOT_CACHE", "JUPYTER_SPOT_FAULTS",
                     "JUPYTER_SPOT_STORE", "AWS_PROFILE"):
            self.base_env.pop(name, None)
        if with_s3:
            import boto3

            self.moto = MotoServer()
            self.proxy = ErrorProxy(self.moto.port)
            self.bucket = f"spot-faults-{secrets.token_hex(4)}"
            env = {k: v for k, v in self.base_env.items() if k.startswith("AWS_")}
            os.environ.update(env)
            boto3.client("s3", endpoint_url=self.moto.url).create_bucket(Bucket=self.bucket)
        os.environ["JUPYTER_SPOT_SIGNING_KEY"] = self.key
        self.pool = KernelPool(self.base_env)

    def close(self) -> None:
        try:
            self.pool.close()
            if self.proxy is not None:
                self.proxy.stop()
            if self.moto is not None:
                self.moto.stop()
            self._scratch.cleanup()
        finally:
            os.environ.clear()
            os.environ.update(self._environ)


@dataclass
class TrialStore:
    """One trial's store: its URL, the kernels' environment for it, and direct handles on each tier."""

    kind: str
    url: str
    directory: Path
    cache: Path | None
    s3_url: str | None
    moto_url: str | None
    proxy_url: str | None
    damaged_manifests: set[str] = field(default_factory=set)
    damaged_blobs: set[str] = field(default_factory=set)
    deleted: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, campaign: Campaign, kind: str, seed: int) -> TrialStore:
        directory = campaign.root / f"trial-{seed}-{secrets.token_hex(3)}"
        directory.mkdir()
        if kind == "fs":
            return cls(kind, str(directory / "store"), directory, None, None, None, None)
        assert campaign.moto is not None and campaign.proxy is not None
        s3_url = f"s3://{campaign.bucket}/{directory.name}"
        cache = directory / "cache" if kind == "tiered" else None
        return cls(kind, s3_url, directory, cache, s3_url, campaign.moto.url, campaign.proxy.url)

    def env(self, campaign: Campaign, session: str, through_proxy: bool) -> dict[str, str]:
        env = {**campaign.base_env, "JUPYTER_SPOT_STORE": self.url, "JUPYTER_SPOT_SESSION": session}
        if self.moto_url:
            env["AWS_ENDPOINT_URL"] = self.proxy_url if through_proxy else self.moto_url  # type: ignore[assignment]
        if self.cache is not None:
            env["JUPYTER_SPOT_CACHE"] = str(self.cache)
        return env

    def tiers(self) -> dict[str, Store]:
        """Each tier on its own (a tiered store would replicate and repair as it reads)."""
        tiers: dict[str, Store] = {}
        if self.kind == "fs":
            tiers["fs"] = FileStore(self.url)
        if self.cache is not None:
            tiers["cache"] = FileStore(self.cache)
        if self.s3_url is not None:
            from jupyter_spot.store.s3 import S3Store

            tiers["s3"] = S3Store(self.s3_url, endpoint_url=self.moto_url, max_attempts=3)
        return tiers

    # -- damage ----------------------------------------------------------------------
    def damage(self, rng: random.Random, what: str, how: str, session: str, snapshot_id: str,
               manifest: dict[str, Any]) -> str:
        """Flip, truncate or delete one manifest or blob of ``snapshot_id`` in one tier; says what it did."""
        if what == "manifest":
            key: tuple = ("manifest", session, snapshot_id)
            self.damaged_manifests.add(snapshot_id)
        else:
            digest = rng.choice(sorted(manifest.get("blobs", [])))
            key = ("blob", digest)
            self.damaged_blobs.add(digest)
        holding = {}
        for name, tier in sorted(self.tiers().items()):
            try:
                holding[name] = (tier, self._read(tier, key))
            except Exception:  # not in this tier (not yet replicated, or collected)
                continue
        if not holding:
            return f"{how} {what} of {snapshot_id}: in no tier"
        tier_name = rng.choice(sorted(holding))
        tier, data = holding[tier_name]
        if how == "delete":
            self._delete(tier, key)
        else:
            if how == "flip":
                at = rng.randrange(len(data)) if data else 0
                data = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :] if data else b"x"
            else:
                data = data[: len(data) // 2]
            self._write(tier, key, data)
        target = snapshot_id if what == "manifest" else f"blob {key[1][:12]} of {snapshot_id}"
        return f"{how} {target} in {tier_name}"

    @staticmethod
    def _path(tier: Store, key: tuple) -> Path:
        assert isinstance(tier, FileStore)
        if key[0] == "manifest":
            return tier._manifest_path(key[1], key[2])
        return tier._blob_path(key[1])

    @staticmethod
    def _object(tier: Store, key: tuple) -> str:
        return tier._manifest_key(key[1], key[2]) if key[0] == "manifest" else tier._blob_key(key[1])  # type: ignore[attr-defined]

    def _read(self, tier: Store, key: tuple) -> bytes:
        if isinstance(tier, FileStore):
            return self._path(tier, key).read_bytes()
        if key[0] == "manifest":
            return tier._read_manifest(key[1], key[2])
        response = tier.client.get_object(Bucket=tier.bucket, Key=self._object(tier, key))  # type: ignore[attr-defined]
        return response["Body"].read()

    def _write(self, tier: Store, key: tuple, data: bytes) -> None:
        if isinstance(tier, FileStore):
            path = self._path(tier, key)
            os.chmod(path, 0o600)
            path.write_bytes(data)
        else:
            tier.client.put_object(Bucket=tier.bucket, Key=self._object(tier, key), Body=data)  # type: ignore[attr-defined]

    def _delete(self, tier: Store, key: tuple) -> None:
        if isinstance(tier, FileStore):
            self._path(tier, key).unlink()
        else:
            tier.client.delete_object(Bucket=tier.bucket, Key=self._object(tier, key))  # type: ignore[attr-defined]


@dataclass
class Snapshot:
    """One committed snapshot as the trial's reader finds it."""

    id: str
    manifest: dict[str, Any] | None
    problem: str | None  # why it cannot be restored: its manifest, or a blob it names
    missing_blobs: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.problem is None


def read_session(store: TrialStore, session: str) -> dict[str, Snapshot]:
    """Every snapshot of ``session`` in any tier, and whether some tier can restore it whole."""
    tiers = store.tiers()
    ids: set[str] = set()
    for tier in tiers.values():
        ids.update(tier.list_snapshots(session))
    found: dict[str, Snapshot] = {}
    for snapshot_id in sorted(ids):
        manifest, problems = None, []
        for name, tier in tiers.items():
            try:
                manifest = tier.load_manifest(session, snapshot_id)
                break
            except ManifestError as error:
                if snapshot_id in tier.list_snapshots(session):
                    problems.append(f"{name}: {error}")
        if manifest is None:
            found[snapshot_id] = Snapshot(snapshot_id, None, "; ".join(problems))
            continue
        missing = []
        for digest in manifest.get("blobs", []):
            if not any(_blob_ok(tier, digest) for tier in tiers.values()):
                missing.append(digest)
        problem = f"blobs missing or damaged: {', '.join(d[:12] for d in missing)}" if missing else None
        found[snapshot_id] = Snapshot(snapshot_id, manifest, problem, missing)
    return found


def _blob_ok(tier: Store, digest: str) -> bool:
    try:
        tier.get_blob(digest)
        return True
    except StoreError:
        return False

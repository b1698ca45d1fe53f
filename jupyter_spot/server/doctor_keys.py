"""``jupyter spot doctor``'s signing-key checks.

The key that signs snapshots must be wherever they are restored. On a store
other machines see (S3, an NFS/EFS/SMB or FUSE mount) a key that exists only on
this machine is lost with it, and every snapshot with it: that fails loudly,
with the one setting that fixes it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..store import Store, StoreError
from ..store.keys import GENERATE_HINT, KEY_ENV, KMS_ENV, KeyRing

#: Filesystems other machines mount too (plus every ``fuse.*``: s3fs, gcsfuse, sshfs, …).
SHARED_FILESYSTEMS = {"nfs", "nfs4", "efs", "cifs", "smb3", "smbfs", "9p", "lustre", "glusterfs", "ceph", "gpfs"}
MIN_KEY_BYTES = 32
KMS_FIX = (
    f"export {KMS_ENV}=alias/jupyter-spot  (a KMS key id, alias or ARN this machine's role may use with "
    "kms:GenerateDataKey and kms:Decrypt; see docs/s3.md)"
)

#: (check name, ok, detail, required): a failed required check makes doctor exit 1.
Check = tuple[str, bool, str, bool]


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def shared_mount(path: str, mounts: str) -> str | None:
    """``"on the nfs4 mount /mnt/efs"`` when ``path`` is on a filesystem other machines mount, else None."""
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fstype)
    if best is None:
        return None
    point, fstype = best
    if fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse."):
        return f"on the {fstype} mount {point}"
    return None


def shared_store(url: str) -> str | None:
    """How other machines see this store, or None when it is on a local disk."""
    if url.startswith("s3://"):
        return "in S3"
    path = Path(url.removeprefix("file://")).expanduser().resolve()
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return None  # not Linux: no mount table to read
    return shared_mount(str(path), mounts)


def _local_key_checks(url: str, ring: KeyRing) -> list[Check]:
    key = ring.local[0]
    from_env = key.source == f"${KEY_ENV}"
    checks: list[Check] = []
    problems = []
    if len(key.secret) < MIN_KEY_BYTES:
        problems.append(f"it is only {len(key.secret)} bytes; use at least {MIN_KEY_BYTES}: {GENERATE_HINT}")
    if not from_env:
        mode = Path(key.source).stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"other users may read it (mode {stat.filemode(mode)}): chmod 600 {key.source}")
    if problems:
        checks.append(("signing key", False, f"key {key.id} from {key.source}: " + "; ".join(problems), False))
    shared = shared_store(url)
    if shared is None:
        if not problems:
            checks.append(("signing key", True, f"key {key.id} from {key.source}", True))
        return checks
    if from_env:
        checks.append((
            "signing key", False,
            f"the store is {shared} and the key comes from ${KEY_ENV}: every machine that restores must set the "
            f"same value. To keep it off machines altogether: {KMS_FIX}", False,
        ))
    else:
        checks.append((
            "signing key", False,
            f"the store is {shared}, but the signing key exists only on this machine ({key.source}): a fresh "
            f"machine cannot verify, so cannot restore, these snapshots. Fix: {KMS_FIX}", True,
        ))
    return checks


def signing_key_checks(url: str, store: Store | None) -> list[Check]:
    """The key that signs here, whether other machines can have it, and whether it is any good."""
    checks: list[Check] = []
    env_value = os.environ.get(KEY_ENV)
    if env_value is not None and not env_value.strip():
        checks.append((
            "signing key", False,
            f"${KEY_ENV} is set but empty, so it is ignored: unset it, or set a key ({GENERATE_HINT})", True,
        ))
    try:
        ring = store.signer.ring if store is not None else KeyRing.default()
    except (OSError, ValueError) as error:
        return [*checks, ("signing key", False, str(error), True)]
    if ring.kms is None:
        return checks + _local_key_checks(url, ring)
    if store is None:
        return [*checks, ("signing key", False, f"{ring.source}: cannot reach the store that keeps the keys", True)]
    try:
        key = ring.signing_key()
    except StoreError as error:
        return [*checks, ("signing key", False, str(error), True)]
    return [*checks, (
        "signing key", True,
        f"key {key.id}, wrapped by {ring.source}: every machine whose role may use that KMS key verifies",
        True,
    )]

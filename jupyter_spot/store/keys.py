"""Signing keys: where they come from, which one signs, and which ones verify.

A key that lives only on the machine that wrote the snapshots is lost with that
machine, so a shared store can keep its keys itself, wrapped by AWS KMS:

* **KMS-in-store** (``$JUPYTER_SPOT_KMS_KEY`` or ``c.SpotSettings.kms_key_id``):
  each signing key is a KMS data key; only its KMS-encrypted form is kept, in
  the store under ``keys/NNNNNN.json``. A machine whose role may use the KMS key
  unwraps it once (``kms:Decrypt``) and keeps it in memory only. Key objects
  are created with a conditional write, so two machines creating (or rotating)
  at once agree on one key; the highest number signs, every one verifies.
* **env key** (``$JUPYTER_SPOT_SIGNING_KEY``) and **key file** (per user, in the
  Jupyter data dir; created on first use when no KMS key is set): one key, on
  this machine only. With KMS they still verify what they signed before.

Every key has a non-secret id that signed envelopes carry, so a verifier picks
the key by id and can say exactly which key it lacks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from ..faults import fault_point
from .errors import ManifestError, StoreError

KEY_ENV = "JUPYTER_SPOT_SIGNING_KEY"
KEY_FILE_ENV = "JUPYTER_SPOT_SIGNING_KEY_FILE"
KMS_ENV = "JUPYTER_SPOT_KMS_KEY"
KEY_FORMAT = "jupyter-spot-key/1"
#: Bound into every wrapped key: KMS refuses to unwrap it for anything else.
KMS_PURPOSE = "jupyter-spot signing key"
GENERATE_HINT = 'python -c "import secrets; print(secrets.token_hex(32))"'

_KEY_OBJECT = re.compile(r"^[0-9]{6}$")
#: What a KMS key id, alias or ARN looks like; anything else read from the store is not shown.
_KMS_KEY_NAME = re.compile(r"^[A-Za-z0-9:/_.+=-]{1,256}$")
#: A signer looks for a newer key (a rotation by another machine) at most this often.
ROTATION_CHECK_SECONDS = 300.0
log = logging.getLogger("jupyter_spot")


class KmsAccessError(StoreError):
    """KMS refused this machine (permissions, a missing or disabled key): nothing verifies until fixed."""


class UnknownKeyError(ManifestError):
    """A document was signed with a key this machine does not have; ``fix`` says how to get it."""

    def __init__(self, message: str, key_id: str, fix: str) -> None:
        super().__init__(f"{message} Fix: {fix}")
        self.key_id = key_id
        self.fix = fix


@dataclass(frozen=True)
class Key:
    id: str
    secret: bytes = b""
    source: str = ""


def local_key_id(secret: bytes) -> str:
    """A name for a local key that reveals nothing about it (an HMAC of a constant)."""
    return "local-" + hmac.new(secret, b"jupyter-spot key id", hashlib.sha256).hexdigest()[:16]


def resolve_kms_key(configured: str = "") -> str:
    """``$JUPYTER_SPOT_KMS_KEY``, else the configured KMS key id, alias or ARN."""
    return os.environ.get(KMS_ENV, "").strip() or configured.strip()


def default_key_file() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(os.environ.get(KEY_FILE_ENV) or Path(jupyter_data_dir()) / "jupyter_spot" / "signing.key")


def load_or_create_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads its key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes().strip()


def local_keys(create: bool) -> list[Key]:
    """This machine's own key: the env key, else the key file (made if ``create``)."""
    env_key = os.environ.get(KEY_ENV, "").strip()
    if env_key:
        return [Key(local_key_id(env_key.encode()), env_key.encode(), f"${KEY_ENV}")]
    path = default_key_file()
    if not create and not path.exists():
        return []
    secret = load_or_create_key_file(path)
    if not secret and not create:  # KMS keys sign; an empty old key file verifies nothing
        log.warning("jupyter-spot: ignoring the empty signing key file %s", path)
        return []
    if not secret:
        raise ValueError(f"the signing key file {path} is empty: delete it, or write a key into it ({GENERATE_HINT})")
    return [Key(local_key_id(secret), secret, str(path))]


class KeyShelf(Protocol):
    """Where wrapped keys are kept: a store (see Store.create_key_object)."""

    url: str

    def create_key_object(self, name: str, data: bytes) -> bool: ...

    def read_key_object(self, name: str) -> bytes | None: ...

    def list_key_objects(self) -> list[str]: ...


#: Unwrapped keys by (KMS key, ciphertext), so each process asks KMS once per key.
_unwrapped: dict[tuple[str, bytes], bytes] = {}
_unwrapped_lock = threading.Lock()


class KmsKeys:
    """Data keys wrapped by one KMS key, kept in a store under ``keys/``."""

    def __init__(self, kms_key_id: str, shelf: KeyShelf | None = None) -> None:
        self.kms_key_id = kms_key_id
        self.shelf = shelf
        self._keys: dict[int, Key] = {}
        self._refused: dict[int, KmsAccessError] = {}
        self._lock = threading.Lock()
        self._client: Any = None
        self._loaded_at = -ROTATION_CHECK_SECONDS

    def describe(self) -> str:
        where = f" in {self.shelf.url.rstrip('/')}/keys/" if self.shelf else ""
        return f"KMS key {self.kms_key_id} (data keys{where})"

    def _kms(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("kms")
        return self._client

    def _kms_error(self, error: Exception, what: str, permission: str) -> StoreError:
        code = str((getattr(error, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):  # forged or foreign, not our access
            return StoreError(f"{what}: the wrapped key was not made by {self.kms_key_id} for jupyter-spot")
        if code in ("AccessDeniedException", "AccessDenied", "NotFoundException", "DisabledException", "KMSInvalidStateException"):
            return KmsAccessError(
                f"KMS refused {what} with {self.kms_key_id} ({code}): this machine's role needs "
                f"{permission} on that key, and the key must exist and be enabled"
            )
        return KmsAccessError(f"KMS failed while {what} with {self.kms_key_id}: {error}")

    def _require_shelf(self) -> KeyShelf:
        if self.shelf is None:
            raise StoreError("KMS-wrapped keys need a store to keep them in")
        return self.shelf

    def _unwrap(self, number: int, data: bytes) -> Key:
        name = f"{number:06d}"
        try:
            document = json.loads(data)
            ciphertext = base64.b64decode(document["ciphertext"], validate=True)
            if document.get("format") != KEY_FORMAT or document.get("id") != f"kms-{name}":
                raise ValueError("not a jupyter-spot key object")
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(f"key object keys/{name}.json is damaged ({error})") from None
        cache_key = (self.kms_key_id, ciphertext)
        with _unwrapped_lock:
            secret = _unwrapped.get(cache_key)
        if secret is None:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                answer = self._kms().decrypt(
                    CiphertextBlob=ciphertext,
                    KeyId=self.kms_key_id,  # never unwrap with a key someone else chose
                    EncryptionContext={"purpose": KMS_PURPOSE, "key-id": f"kms-{name}"},
                )
            except (BotoCoreError, ClientError) as error:
                raise self._kms_error(error, f"unwrapping keys/{name}.json", "kms:Decrypt") from error
            secret = answer["Plaintext"]
            with _unwrapped_lock:
                _unwrapped[cache_key] = secret
        return Key(f"kms-{name}", secret, self.describe())

    def _load(self) -> list[int]:
        """Unwrap every key object not yet known and return every key number seen.

        A damaged or foreign object (anyone who may write to the store can put one
        there) is skipped with a warning; one KMS refuses this machine is kept in
        ``_refused`` so that a lookup of that key says why.
        """
        shelf = self._require_shelf()
        self._loaded_at = time.monotonic()
        numbers = []
        for name in shelf.list_key_objects():
            if not _KEY_OBJECT.match(name):
                continue
            number = int(name)
            numbers.append(number)
            if number in self._keys:
                continue
            data = shelf.read_key_object(name)
            if data is None:
                continue
            try:
                self._keys[number] = self._unwrap(number, data)
                self._refused.pop(number, None)
            except KmsAccessError as error:
                self._refused[number] = error
                log.warning("jupyter-spot: %s", error)
            except StoreError as error:
                log.warning("jupyter-spot: ignoring %s", error)
        return numbers

    def _create(self, number: int) -> None:
        """Make key ``number`` unless another process just did (then theirs is it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        name = f"{number:06d}"
        try:
            data_key = self._kms().generate_data_key(
                KeyId=self.kms_key_id,
                KeySpec="AES_256",
                EncryptionContext={"purpose": KMS_PURPOSE, "key-id": f"kms-{name}"},
            )
        except (BotoCoreError, ClientError) as error:
            raise self._kms_error(error, "making a signing key", "kms:GenerateDataKey") from error
        document = {
            "format": KEY_FORMAT,
            "id": f"kms-{name}",
            "kms_key": data_key.get("KeyId") or self.kms_key_id,
            "ciphertext": base64.b64encode(data_key["CiphertextBlob"]).decode(),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        fault_point("key-create")
        created = self._require_shelf().create_key_object(name, json.dumps(document, indent=1).encode())
        if created:
            with _unwrapped_lock:
                _unwrapped[(self.kms_key_id, data_key["CiphertextBlob"])] = data_key["Plaintext"]
            log.info("jupyter-spot: made signing key kms-%s wrapped by %s", name, self.kms_key_id)

    def current(self) -> Key:
        """The newest key this machine can unwrap; the first one is made if the store has none."""
        with self._lock:
            numbers: list[int] = []
            if not self._keys:
                numbers = self._load()
            elif time.monotonic() - self._loaded_at > ROTATION_CHECK_SECONDS:
                try:
                    self._load()
                except StoreError as error:  # keep signing with the key we have; look again later
                    self._loaded_at = time.monotonic()
                    log.warning("jupyter-spot: cannot look for a rotated signing key: %s", error)
            if not self._keys:
                # None yet, or only ones we cannot unwrap (damaged, or planted under another KMS key:
                # KMS may call those "access denied" too). Make the next; a racing machine's wins.
                # If this machine really may not use the KMS key, making one fails with that reason.
                self._create(max(numbers, default=0) + 1)
                self._load()
            if not self._keys:
                raise StoreError(f"no usable signing key in {self.describe()} after making one")
            return self._keys[max(self._keys)]

    def find(self, key_id: str) -> Key | None:
        """The key with this id; looks in the store again for keys made since (a rotation)."""
        with self._lock:
            for key in self._keys.values():
                if key.id == key_id:
                    return key
            if not (key_id.startswith("kms-") and _KEY_OBJECT.match(key_id[4:])):
                return None
            self._load()
            number = int(key_id[4:])
            if number in self._refused:
                raise self._refused[number]
            return self._keys.get(number)

    def rotate(self) -> Key:
        """Make a new key that signs from now on; the old ones still verify."""
        with self._lock:
            numbers = self._load()
            self._create(max(numbers, default=0) + 1)
            self._load()
            if not self._keys:
                raise StoreError(f"no usable signing key in {self.describe()} after making one")
            return self._keys[max(self._keys)]

    def all(self) -> list[Key]:
        with self._lock:
            self._load()
            return [self._keys[n] for n in sorted(self._keys)]


class KeyRing:
    """The key that signs and every key that verifies."""

    def __init__(self, local: list[Key], kms: KmsKeys | None = None) -> None:
        if not local and kms is None:
            raise ValueError("no signing key")
        for key in local:
            if not key.secret:
                raise ValueError(f"the signing key from {key.source or 'the caller'} is empty")
        self.local = local
        self.kms = kms
        self.shelf: KeyShelf | None = None

    @classmethod
    def default(cls, kms_key_id: str = "") -> KeyRing:
        """KMS keys when a KMS key is set (and any local key, to verify older snapshots);
        else the env key or the key file."""
        kms_key_id = resolve_kms_key(kms_key_id)
        if kms_key_id:
            return cls(local_keys(create=False), KmsKeys(kms_key_id))
        return cls(local_keys(create=True))

    def bind(self, shelf: KeyShelf) -> None:
        """Keep KMS-wrapped keys in ``shelf`` (the store this ring signs for), unless bound already."""
        if self.shelf is None:
            self.shelf = shelf
        if self.kms is not None and self.kms.shelf is None:
            self.kms.shelf = shelf

    @property
    def source(self) -> str:
        return self.kms.describe() if self.kms else self.local[0].source

    def signing_key(self) -> Key:
        return self.kms.current() if self.kms else self.local[0]

    def verifying_keys(self) -> list[Key]:
        """Every key this machine has, for envelopes that name none (written before key ids)."""
        return [*self.local, *(self.kms.all() if self.kms else [])]

    def find(self, key_id: str) -> Key | None:
        for key in self.local:
            if key.id == key_id:
                return key
        return self.kms.find(key_id) if self.kms else None

    def missing_key_fix(self, key_id: str) -> str:
        """What to do on a machine that lacks ``key_id``: one line, the exact setting."""
        if key_id.startswith("kms-"):
            wrapped_by = self._wrapping_key(key_id)
            if self.kms is None:
                if wrapped_by is None:
                    return f"it is wrapped by KMS in the store: set {KMS_ENV} to the KMS key the writer used"
                # Anyone who may write to the store could have written that name: say where it comes from.
                return (
                    f"it is wrapped by KMS in the store: set {KMS_ENV}={wrapped_by} (as the store's "
                    f"keys/{key_id[4:]}.json names it: check that it is your team's KMS key; this machine's role "
                    "needs kms:Decrypt on it)"
                )
            return (
                f"keys/{key_id[4:]}.json is missing from the store or was wrapped by "
                f"{wrapped_by or 'another KMS key'}, not {self.kms.kms_key_id}: set {KMS_ENV} to the writer's KMS key"
            )
        return (
            f"the key is on the machine that wrote it. For a shared store, set {KMS_ENV}=<KMS key id, alias or ARN> "
            f"on every machine (new snapshots then verify anywhere); to read these snapshots, set ${KEY_ENV} to the "
            "contents of the writer's key file (jupyter_spot/signing.key in its Jupyter data dir)"
        )

    def _wrapping_key(self, key_id: str) -> str | None:
        """The KMS key named in the store's key object (not secret): the exact value to set."""
        shelf = self.kms.shelf if self.kms else self.shelf
        if shelf is None:
            return None
        try:
            data = shelf.read_key_object(key_id[4:])
            named = json.loads(data)["kms_key"] if data else None
        except (StoreError, ValueError, KeyError, TypeError):
            return None
        return named if isinstance(named, str) and _KMS_KEY_NAME.match(named) else None

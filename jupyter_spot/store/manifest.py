"""Signed manifests: unpickling is code execution, so only load what we wrote.

Every manifest is signed with an HMAC key kept outside the store (like
Jupyter's notebook-trust secret). A blob is addressed by its SHA-256 and the
manifest names every blob, so a valid signature vouches for all the bytes a
restore will unpickle. Someone who can write to the store but does not hold the
key can delete snapshots, but cannot make a kernel load theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .base import ManifestError

FORMAT = "jupyter-spot-manifest/1"
KEY_ENV = "JUPYTER_SPOT_SIGNING_KEY"
KEY_FILE_ENV = "JUPYTER_SPOT_SIGNING_KEY_FILE"


def default_key_file() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(os.environ.get(KEY_FILE_ENV) or Path(jupyter_data_dir()) / "jupyter_spot" / "signing.key")


def _load_or_create_key(path: Path) -> bytes:
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


class ManifestSigner:
    """Encodes manifests as signed JSON and refuses ones it did not sign."""

    def __init__(self, key: bytes, key_source: str = "") -> None:
        if not key:
            raise ValueError("the signing key is empty")
        self._key = key
        self.key_source = key_source

    @classmethod
    def default(cls) -> ManifestSigner:
        """The key from $JUPYTER_SPOT_SIGNING_KEY, else the per-user key file."""
        env_key = os.environ.get(KEY_ENV, "").strip()
        if env_key:
            return cls(env_key.encode(), key_source=f"${KEY_ENV}")
        path = default_key_file()
        return cls(_load_or_create_key(path), key_source=str(path))

    def _sign(self, body: bytes) -> str:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def encode(self, manifest: dict[str, Any]) -> bytes:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        envelope = {"format": FORMAT, "signature": self._sign(body.encode()), "manifest": body}
        return json.dumps(envelope, indent=0).encode() + b"\n"

    def decode(self, data: bytes, where: str) -> dict[str, Any]:
        try:
            envelope = json.loads(data)
            body: str = envelope["manifest"]
            signature: str = envelope["signature"]
        except (ValueError, KeyError, TypeError) as error:
            raise ManifestError(f"{where}: manifest is truncated or not valid JSON ({error})") from None
        if envelope.get("format") != FORMAT:
            raise ManifestError(f"{where}: unknown manifest format {envelope.get('format')!r}")
        if not hmac.compare_digest(signature, self._sign(body.encode())):
            raise ManifestError(
                f"{where}: manifest is not signed by this machine's key ({self.key_source}); "
                f"refusing to unpickle it. If you wrote it elsewhere, set ${KEY_ENV} "
                "to that machine's key."
            )
        try:
            return json.loads(body)
        except ValueError as error:
            raise ManifestError(f"{where}: manifest body is not valid JSON ({error})") from None

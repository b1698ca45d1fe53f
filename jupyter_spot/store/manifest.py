"""Signed manifests: unpickling is code execution, so only load what we wrote.

Every manifest is signed with an HMAC key kept outside the store (like
Jupyter's notebook-trust secret), or kept in it only wrapped by KMS (keys.py). A blob is addressed by its SHA-256 and the
manifest names every blob, so a valid signature vouches for all the bytes a
restore will unpickle. Someone who can write to the store but does not hold the
key can delete snapshots, but cannot make a kernel load theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from .base import ManifestError, StoreError
from .keys import Key, KeyRing, KeyShelf, UnknownKeyError, local_key_id

FORMAT = "jupyter-spot-manifest/1"


class ManifestSigner:
    """Encodes manifests as signed JSON and refuses ones it did not sign.

    Keys come from a :class:`~.keys.KeyRing`: the current key signs, and each
    envelope names its key's id so any key of the ring can verify it.
    """

    def __init__(self, key: bytes = b"", key_source: str = "", ring: KeyRing | None = None) -> None:
        if ring is None:
            if not key:
                raise ValueError("the signing key is empty")
            ring = KeyRing([Key(local_key_id(key), key, key_source)])
        self.ring = ring

    @classmethod
    def default(cls, kms_key_id: str = "") -> ManifestSigner:
        """KMS-wrapped keys in the store when $JUPYTER_SPOT_KMS_KEY (or ``kms_key_id``) is
        set; else the key from $JUPYTER_SPOT_SIGNING_KEY, else the per-user key file."""
        return cls(ring=KeyRing.default(kms_key_id))

    @property
    def key_source(self) -> str:
        return self.ring.source

    def bind_store(self, store: KeyShelf) -> None:
        """Keep (and find) KMS-wrapped keys in ``store``, unless this signer has a store already."""
        self.ring.bind(store)

    @staticmethod
    def _sign(key: Key, body: bytes) -> str:
        return hmac.new(key.secret, body, hashlib.sha256).hexdigest()

    def _keys_for(self, envelope: dict[str, Any], where: str) -> list[Key]:
        """The key the envelope names, or every key for envelopes older than key ids."""
        key_id = envelope.get("key")
        if key_id is None:
            try:
                return self.ring.verifying_keys()
            except StoreError as error:
                raise UnknownKeyError(f"{where}: cannot get the keys to verify it: {error}.", "", str(error)) from None
        if not isinstance(key_id, str) or not key_id:
            raise ManifestError(f"{where}: manifest names no valid key id ({key_id!r})")
        refusal = f"{where}: manifest is not signed by this machine's key ({self.key_source}); refusing to unpickle it."
        try:
            key = self.ring.find(key_id)
        except StoreError as error:
            raise UnknownKeyError(f"{refusal} Key {key_id} is not available: {error}.", key_id, str(error)) from None
        if key is None:
            raise UnknownKeyError(
                f"{refusal} It was signed with key {key_id}, which this machine does not have.",
                key_id,
                self.ring.missing_key_fix(key_id),
            )
        return [key]

    def encode(self, manifest: dict[str, Any]) -> bytes:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        key = self.ring.signing_key()
        envelope = {"format": FORMAT, "key": key.id, "signature": self._sign(key, body.encode()), "manifest": body}
        return json.dumps(envelope, indent=0).encode() + b"\n"

    def decode(self, data: bytes, where: str) -> dict[str, Any]:
        try:
            envelope = json.loads(data)
            body: str = envelope["manifest"]
            signature: str = envelope["signature"]
            if not isinstance(body, str) or not isinstance(signature, str):
                raise TypeError("manifest and signature must be strings")
        except (ValueError, KeyError, TypeError) as error:
            raise ManifestError(f"{where}: manifest is truncated or not valid JSON ({error})") from None
        if envelope.get("format") != FORMAT:
            raise ManifestError(f"{where}: unknown manifest format {envelope.get('format')!r}")
        keys = self._keys_for(envelope, where)
        # As bytes: compare_digest refuses non-ASCII str, and a forged signature may hold any.
        if not any(hmac.compare_digest(signature.encode(), self._sign(key, body.encode()).encode()) for key in keys):
            if "key" in envelope:
                raise ManifestError(
                    f"{where}: manifest is not signed by this machine's key ({self.key_source}): its contents do "
                    f"not match the signature by key {envelope['key']} (changed after signing); refusing to unpickle it."
                )
            raise UnknownKeyError(
                f"{where}: manifest is not signed by this machine's key ({self.key_source}); refusing to unpickle it.",
                "",
                self.ring.missing_key_fix("local-"),
            )
        try:
            return json.loads(body)
        except ValueError as error:
            raise ManifestError(f"{where}: manifest body is not valid JSON ({error})") from None

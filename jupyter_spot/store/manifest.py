"""Signed documents: unpickling is code execution, so only load what we wrote, where we wrote it.

Every document that leads to unpickling or running code — a snapshot's
manifest, a job's spec, its result, its checkpoint, its runner's claim — is
signed with an HMAC key kept outside the store (like Jupyter's notebook-trust
secret), or kept in it only wrapped by KMS (keys.py). A blob is addressed by its
SHA-256 and the document names every blob, so a valid signature vouches for all
the bytes a restore will unpickle.

The signature covers the document's *kind* and its *place* (session and
snapshot id, or session and job id) as well as its body, and a reader checks
both against where it found the document. So someone who can write to the
store but does not hold the key can delete documents, but cannot make a kernel
load theirs, nor one of ours somewhere else: a manifest copied into another
notebook's folder, a job spec copied into another session's record, or a
result passed off as a spec are all refused, with the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Final

from .errors import ManifestError, StoreError
from .keys import Key, KeyRing, KeyShelf, UnknownKeyError, local_key_id

FORMAT = "jupyter-spot-signed/2"
#: Manifests written before documents were bound to their place (see ``_legacy_manifest``).
LEGACY_FORMAT = "jupyter-spot-manifest/1"


#: The kinds of signed document; a signature for one never verifies another.
MANIFEST: Final = "manifest"
JOB_SPEC: Final = "job spec"
JOB_RESULT: Final = "job result"
JOB_CHECKPOINT: Final = "job checkpoint"
JOB_RUNNER: Final = "job runner claim"
#: A shell job's $SPOT_CHECKPOINT_DIR as last synced: relative path → blob.
JOB_CHECKPOINT_FILES: Final = "job checkpoint files"
KINDS: Final = frozenset({MANIFEST, JOB_SPEC, JOB_RESULT, JOB_CHECKPOINT, JOB_RUNNER, JOB_CHECKPOINT_FILES})

#: Where a document belongs: {"session", "snapshot"} or {"session", "job"}.
Place = dict[str, str]


def snapshot_place(session: str, snapshot_id: str) -> Place:
    return {"session": session, "snapshot": snapshot_id}


def job_place(session: str, job_id: str) -> Place:
    return {"session": session, "job": job_id}


def describe(place: Any) -> str:
    """``snapshot X of session 'nb.ipynb'`` (or ``job …``), for messages; anything else as repr."""
    if isinstance(place, dict) and set(place) in ({"session", "snapshot"}, {"session", "job"}):
        what = "snapshot" if "snapshot" in place else "job"
        return f"{what} {place[what]} of session {place['session']!r}"
    return repr(place)


def unverified_body(data: bytes) -> dict[str, Any]:
    """The body of a signed document, NOT verified: only for deciding what to keep (GC), never to load.

    Raises ValueError, KeyError or TypeError if it is not a signed document.
    """
    try:
        envelope = json.loads(data)
        if not isinstance(envelope, dict):
            raise TypeError("not a signed document")
        body = json.loads(envelope["body"] if envelope.get("format") == FORMAT else envelope["manifest"])
    except RecursionError:  # nested deeper than the parser goes
        raise ValueError("nested too deeply") from None
    if not isinstance(body, dict):
        raise TypeError("the body is not a JSON object")
    return body


def _message(kind: str, place: Place, body: str) -> bytes:
    """What the signature covers: format, kind, place and body, unambiguously."""
    return json.dumps([FORMAT, kind, place, body], sort_keys=True, separators=(",", ":")).encode()


class ManifestSigner:
    """Signs documents bound to a kind and a place; refuses any it did not sign for that kind and place.

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
    def _sign(key: Key, message: bytes) -> str:
        return hmac.new(key.secret, message, hashlib.sha256).hexdigest()

    def _keys_for(self, envelope: dict[str, Any], kind: str, where: str) -> list[Key]:
        """The key the envelope names, or every key for envelopes older than key ids."""
        key_id = envelope.get("key")
        if key_id is None:
            try:
                return self.ring.verifying_keys()
            except StoreError as error:
                raise UnknownKeyError(f"{where}: cannot get the keys to verify it: {error}.", "", str(error)) from None
        if not isinstance(key_id, str) or not key_id:
            raise ManifestError(f"{where}: {kind} names no valid key id ({str(key_id)[:80]!r})")
        refusal = f"{where}: {kind} is not signed by this machine's key ({self.key_source}); refusing to unpickle it."
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

    def _check_signature(self, envelope: dict[str, Any], message: bytes, kind: str, where: str) -> None:
        """Raise unless the envelope's signature is ``message`` signed with a key of the ring
        (the one place keys are chosen to verify)."""
        keys = self._keys_for(envelope, kind, where)
        # As bytes: compare_digest refuses non-ASCII str, and a forged signature may hold any.
        signature = envelope["signature"].encode()
        if any(hmac.compare_digest(signature, self._sign(key, message).encode()) for key in keys):
            return
        if "key" in envelope:
            raise ManifestError(
                f"{where}: {kind} is not signed by this machine's key ({self.key_source}): its contents do "
                f"not match the signature by key {str(envelope['key'])[:80]} (changed after signing); "
                "refusing to unpickle it."
            )
        raise UnknownKeyError(
            f"{where}: {kind} is not signed by this machine's key ({self.key_source}); refusing to unpickle it.",
            "",
            self.ring.missing_key_fix("local-"),
        )

    def encode(self, document: dict[str, Any], kind: str, place: Place) -> bytes:
        """``document`` signed as a ``kind`` that belongs at ``place``."""
        if kind not in KINDS:
            raise ValueError(f"not a kind of signed document: {kind!r}")
        body = json.dumps(document, sort_keys=True, separators=(",", ":"))
        key = self.ring.signing_key()
        envelope = {"format": FORMAT, "kind": kind, "place": place, "body": body, "key": key.id,
                    "signature": self._sign(key, _message(kind, place, body))}
        return json.dumps(envelope, indent=0, sort_keys=True).encode() + b"\n"

    def decode(self, data: bytes, kind: str, place: Place, where: str | None = None) -> dict[str, Any]:
        """The body of a ``kind`` signed with our key for ``place``; ManifestError says why not."""
        where = where or f"{kind} of {describe(place)}"
        try:
            envelope = json.loads(data)
        except (ValueError, TypeError, RecursionError) as error:  # TypeError: not bytes; RecursionError: too deep
            raise ManifestError(f"{where}: {kind} is truncated or not valid JSON ({error})") from None
        if not isinstance(envelope, dict):
            raise ManifestError(f"{where}: {kind} is not a signed document (a JSON {type(envelope).__name__})")
        if envelope.get("format") == LEGACY_FORMAT:
            return self._legacy_manifest(envelope, kind, place, where)
        if envelope.get("format") != FORMAT:
            raise ManifestError(f"{where}: unknown {kind} format {str(envelope.get('format'))[:80]!r}")
        signed_kind, signed_place = envelope.get("kind"), envelope.get("place")
        body, signature = envelope.get("body"), envelope.get("signature")
        if not (isinstance(signed_kind, str) and isinstance(signed_place, dict) and isinstance(body, str)
                and isinstance(signature, str)):
            raise ManifestError(f"{where}: {kind} is missing its kind, place, body or signature")
        self._check_signature(envelope, _message(signed_kind, signed_place, body), kind, where)
        if signed_kind != kind:
            raise ManifestError(f"{where}: this is a signed {signed_kind[:40]}, not a {kind}; refusing it "
                                "(was it copied here?)")
        if signed_place != place:
            raise ManifestError(f"{where}: {kind} is signed for {describe(signed_place)}, not for this place; "
                                "refusing it (was it copied here?)")
        return self._body(body, kind, where)

    @staticmethod
    def _body(body: str, kind: str, where: str) -> dict[str, Any]:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise ManifestError(f"{where}: {kind} body is not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise ManifestError(f"{where}: {kind} body is not a JSON object")
        return document

    def _legacy_manifest(self, envelope: dict[str, Any], kind: str, place: Place, where: str) -> dict[str, Any]:
        """A manifest signed before signatures named a kind and place (format /1).

        Old snapshots stay restorable: /1 was only ever used for manifests, and
        their body names its session and id, so one loads only where its body
        says it belongs and only if it has a manifest's shape (a job spec or
        result signed in /1 has neither groups nor variables). Job documents in
        /1 are refused: re-run such a job.
        """
        if kind != MANIFEST:
            raise ManifestError(f"{where}: {kind} is signed in the old format {LEGACY_FORMAT}, which binds "
                                "no kind or place; refusing it (run the job again)")
        body, signature = envelope.get("manifest"), envelope.get("signature")
        if not isinstance(body, str) or not isinstance(signature, str):
            raise ManifestError(f"{where}: manifest is missing its body or signature")
        self._check_signature(envelope, body.encode(), kind, where)
        manifest = self._body(body, kind, where)
        if not (isinstance(manifest.get("groups"), dict) and isinstance(manifest.get("variables"), dict)):
            raise ManifestError(f"{where}: an old-format signed document that is not a manifest; refusing it")
        signed_place = snapshot_place(manifest.get("session"), manifest.get("id"))  # type: ignore[arg-type]
        if signed_place != place:
            raise ManifestError(f"{where}: manifest is signed for {describe(signed_place)}, not for this place; "
                                "refusing it (was it copied here?)")
        return manifest

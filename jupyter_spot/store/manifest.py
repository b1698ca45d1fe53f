"""Signed documents: unpickling is code execution, so only load what we wrote, where we wrote it.

Every document that leads to unpickling or running code — a snapshot's
manifest, a job's spec, its result, its checkpoint, its runner's claim — is
signed with an HMAC key kept outside the store (like Jupyter's notebook-trust
secret). A blob is addressed by its SHA-256 and the document names every blob,
so a valid signature vouches for all the bytes a restore will unpickle.

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
import os
import secrets
from pathlib import Path
from typing import Any, Final

from .base import ManifestError

FORMAT = "jupyter-spot-signed/2"
#: Manifests written before documents were bound to their place (see ``_legacy_manifest``).
LEGACY_FORMAT = "jupyter-spot-manifest/1"
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
    """Signs documents bound to a kind and a place; refuses any it did not sign for that kind and place."""

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

    def _sign(self, message: bytes) -> str:
        """The signature of ``message`` with the signing key (the one place a key is chosen to sign)."""
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _verifies(self, envelope: dict[str, Any], message: bytes) -> bool:
        """Whether the envelope's signature is ``message`` signed with a key we trust
        (the one place keys are chosen to verify)."""
        signature = envelope["signature"]
        return signature.isascii() and hmac.compare_digest(signature, self._sign(message))  # non-ASCII: TypeError

    def encode(self, document: dict[str, Any], kind: str, place: Place) -> bytes:
        """``document`` signed as a ``kind`` that belongs at ``place``."""
        if kind not in KINDS:
            raise ValueError(f"not a kind of signed document: {kind!r}")
        body = json.dumps(document, sort_keys=True, separators=(",", ":"))
        envelope = {"format": FORMAT, "kind": kind, "place": place, "body": body,
                    "signature": self._sign(_message(kind, place, body))}
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
        if not self._verifies(envelope, _message(signed_kind, signed_place, body)):
            self._refuse_unsigned(kind, where)
        if signed_kind != kind:
            raise ManifestError(f"{where}: this is a signed {signed_kind[:40]}, not a {kind}; refusing it "
                                "(was it copied here?)")
        if signed_place != place:
            raise ManifestError(f"{where}: {kind} is signed for {describe(signed_place)}, not for this place; "
                                "refusing it (was it copied here?)")
        return self._body(body, kind, where)

    def _refuse_unsigned(self, kind: str, where: str) -> None:
        raise ManifestError(
            f"{where}: {kind} is not signed by this machine's key ({self.key_source}); "
            f"refusing to unpickle it. If you wrote it elsewhere, set ${KEY_ENV} "
            "to that machine's key."
        )

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
        if not self._verifies(envelope, body.encode()):
            self._refuse_unsigned(kind, where)
        manifest = self._body(body, kind, where)
        if not (isinstance(manifest.get("groups"), dict) and isinstance(manifest.get("variables"), dict)):
            raise ManifestError(f"{where}: an old-format signed document that is not a manifest; refusing it")
        signed_place = snapshot_place(manifest.get("session"), manifest.get("id"))  # type: ignore[arg-type]
        if signed_place != place:
            raise ManifestError(f"{where}: manifest is signed for {describe(signed_place)}, not for this place; "
                                "refusing it (was it copied here?)")
        return manifest

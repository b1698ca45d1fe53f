"""Malformed and misplaced signed documents, generated from a seed (used by test_fuzz_documents).

Every document is one that a reader must refuse *where it is planted*:
truncated, of the wrong JSON types, of the wrong shape, huge or deeply nested,
tampered, signed with another key, or genuine but signed for another place or
kind (replayed). Several genuine documents carry a payload that leaves a
marker file behind if it is ever unpickled or run, so a test can tell that
nothing unverified was loaded without waiting for anything.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_spot.store import ManifestSigner, Store, digest_of
from jupyter_spot.store.manifest import (
    JOB_CHECKPOINT,
    JOB_RESULT,
    JOB_RUNNER,
    JOB_SPEC,
    LEGACY_FORMAT,
    MANIFEST,
    job_place,
    snapshot_place,
)

SEED = 20261129
#: Where the genuine documents belong (never where the tests plant them).
ELSEWHERE = "elsewhere.ipynb"
ELSEWHERE_SNAPSHOT = "20261129T000000.000000Z-e1e1"
ELSEWHERE_JOB = "20261129T000000-e1e1"


class _OpensMarker:
    """Unpickling this creates the marker file: the proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.path, "w"))


def marker_pickle(marker: Path) -> bytes:
    """A snapshot group (or job outputs) whose loading creates ``marker``."""
    return pickle.dumps({"evil": _OpensMarker(str(marker))}, protocol=5)


@dataclass
class Document:
    category: str
    data: bytes


def _legacy(key: bytes, body: dict[str, Any]) -> bytes:
    """A document in the old /1 format, signed with ``key`` as the old code signed manifests."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    signature = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"format": LEGACY_FORMAT, "signature": signature, "manifest": text}).encode()


def genuine_documents(store: Store, key: bytes, marker: Path) -> dict[str, bytes]:
    """Documents signed with the store's real key, each for a place other than where they get planted.

    The manifest, result and checkpoint unpickle the marker payload; the job spec's source writes it.
    """
    evil = marker_pickle(marker)
    digest = digest_of(evil)
    store.put_blob(digest, evil)
    group = {"names": ["evil"], "serializer": "pickle", "definition": False, "blob": digest, "buffers": [], "size": 1}
    manifest = {"session": ELSEWHERE, "id": ELSEWHERE_SNAPSHOT, "created": "2026-11-29T00:00:00+00:00",
                "kind": "explicit", "execution_count": 1, "during_cell": None, "groups": {"g0": group},
                "variables": {"evil": {"group": "g0", "type": "object", "size": 1, "cell": 1}}, "skipped": {},
                "environment": {}, "versions": {}, "excluded": [], "size": 1, "variable_count": 1,
                "rng": digest, "blobs": [digest]}
    packed = {"modules": {}, "definitions": {}, "data_names": ["evil"], "data": {**group, "size": 1}}
    spec = {"id": ELSEWHERE_JOB, "session": ELSEWHERE, "name": "evil", "source": f"open({str(marker)!r}, 'w')",
            "inputs": {"modules": {}, "definitions": {}, "data_names": [], "data": None}, "outputs": [],
            "explicit_outputs": False, "cwd": "/", "sys_path": []}
    job = job_place(ELSEWHERE, ELSEWHERE_JOB)
    signer = store.signer
    return {
        "manifest": signer.encode(manifest, MANIFEST, snapshot_place(ELSEWHERE, ELSEWHERE_SNAPSHOT)),
        "job spec": signer.encode(spec, JOB_SPEC, job),
        "job result": signer.encode({"outputs": packed, "skipped": {}}, JOB_RESULT, job),
        "job checkpoint": signer.encode(packed, JOB_CHECKPOINT, job),
        "job runner claim": signer.encode({"job": ELSEWHERE_JOB, "pid": 1, "host": "x", "cmdline": [],
                                           "started": "0", "attempt": 1}, JOB_RUNNER, job),
        "legacy manifest": _legacy(key, manifest),
        "legacy job spec": _legacy(key, spec),
    }


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.randint(-2**63, 2**63)
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e-300, float(rng.randint(0, 9))])
    if choice == 4:
        return "".join(rng.choice("ab/\\.\0\u00e9\u2603\"{}[]") for _ in range(rng.randrange(12)))
    if choice == 5:
        return rng.choice(["", "manifest", "job spec", "jupyter-spot-signed/2", LEGACY_FORMAT, "0" * 64])
    if choice == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 7:
        return {str(_random_json(rng, 3)): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"session": _random_json(rng, 3), "snapshot": _random_json(rng, 3)}


def documents(genuine: dict[str, bytes], rng: random.Random) -> Iterator[Document]:
    """About 1,300 documents, every one wrong for any place the tests plant it."""
    originals = list(genuine.values())
    envelopes = [json.loads(data) for data in originals]

    for data in originals:  # replayed as they are: right key, wrong place or kind
        yield Document("replayed", data)
    for _ in range(250):  # truncated anywhere (a crash mid-write, a short read)
        data = rng.choice(originals)
        yield Document("truncated", data[: rng.randrange(len(data))])
    for _ in range(60):  # not an object at all
        yield Document("wrong type", json.dumps(_random_json(rng)).encode())
    for _ in range(300):  # the right fields with values of the wrong types
        envelope = dict(rng.choice(envelopes))
        for field in rng.sample(sorted(envelope), rng.randint(1, min(3, len(envelope)))):
            envelope[field] = _random_json(rng)
        yield Document("wrong field types", json.dumps(envelope).encode())
    for _ in range(250):  # the wrong shape: fields missing or extra, a body that is not an object
        envelope = dict(rng.choice(envelopes))
        move = rng.randrange(6)
        if move == 0:
            del envelope[rng.choice(sorted(envelope))]
        elif move == 1:
            envelope[rng.choice(["extra", "key", "kind", "place"])] = _random_json(rng)
        elif move == 2 and "body" in envelope:
            envelope["body"] = json.dumps(_random_json(rng))
        elif move == 3 and "place" in envelope:
            envelope["place"] = {**envelope["place"], rng.choice(["session", "job", "snapshot", "x"]): "d.ipynb"}
        elif move == 4:
            envelope["kind"] = rng.choice(["manifest", "job spec", "job result", "job checkpoint", "?", ""])
        else:
            envelope["signature"] = rng.choice(["", "0" * 64, "zz", "A" * 10_000, "\u00e9" * 64, "\0"])
        yield Document("wrong shape", json.dumps(envelope).encode())
    for _ in range(250):  # tampered: the body changed under a signature that no longer covers it
        envelope = dict(rng.choice(envelopes))
        text_field = "body" if "body" in envelope else "manifest"
        body = json.loads(envelope[text_field])
        body[rng.choice(["session", "id", "blobs", "groups", "source", "outputs", "pid"])] = _random_json(rng)
        envelope[text_field] = json.dumps(body, sort_keys=True, separators=(",", ":"))
        yield Document("tampered", json.dumps(envelope).encode())
    other = ManifestSigner(b"another-machine-key")
    for index in range(100):  # signed, but with another key
        place = snapshot_place(rng.choice(["d.ipynb", ELSEWHERE]), f"20261129T00000{index % 10}.000000Z-aaaa")
        yield Document("other key", other.encode(json.loads(json.loads(originals[0])["body"]), MANIFEST, place))
    for _ in range(60):  # bytes that are not JSON, or not UTF-8
        yield Document("bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
    yield Document("bytes", b"")
    yield Document("bytes", b"   \n")
    # huge or deep: the parser must not take the reader down
    yield Document("huge", json.dumps({"format": "jupyter-spot-signed/2", "kind": "manifest", "place": {},
                                       "body": "x" * 4_000_000, "signature": "0" * 64}).encode())
    yield Document("huge", b"[" * 200_000)
    yield Document("huge", b'{"format": "jupyter-spot-signed/2", "body": "' + b"[" * 200_000 + b'"}')
    yield Document("huge", json.dumps({"format": "jupyter-spot-signed/2", "kind": "manifest",
                                       "place": {"session": "s" * 100_000, "snapshot": "x"}, "body": "{}",
                                       "signature": "0" * 64}).encode())
    yield Document("huge", json.dumps([list(range(1000))] * 500).encode())

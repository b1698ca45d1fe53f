"""Snapshots in an S3 bucket (or any S3-compatible store) through boto3.

Layout under ``s3://bucket/prefix`` mirrors the FileStore::

    blobs/ab/abcdef…             content-addressed bytes (multipart above 8 MB)
    sessions/<session>/<id>.json one signed manifest per snapshot
    sessions/<long…%~hash>/session-name  a session whose key would pass 1024 bytes: its real name
    records/<name>.json          the server's records
    keys/NNNNNN.json             signing keys wrapped by KMS (keys.py), written once each
    locks/write-<token>          a writer's lease, held while it stores a snapshot
    locks/gc-<token>             a garbage collector's lock
    locks/gc-generation          rewritten before a collection deletes its first blob

Why these choices:

* Blobs are verified against their SHA-256 on every read. A blob under 1 MiB
  is one conditional PUT carrying that SHA-256 as ``x-amz-checksum-sha256``, so
  S3 itself refuses damaged bytes and never stores it twice; a bigger one is
  looked up first and sent by s3transfer (multipart parts carry CRC32s).
* The manifest commit is ``PutObject`` with ``If-None-Match: *``: S3 answers 412
  to the second writer of the same key, so no snapshot ever overwrites another.
* A blob this process knows is stored costs no request at all, which is what
  makes an unchanged snapshot nearly free.  Garbage collection can only break
  that if it deletes a blob a writer believes in, so writers and collectors
  coordinate through lease objects (the protocol restic uses for its locks;
  S3 lists are strongly consistent): a writer puts its lease *then* lists the
  locks, a collector puts its lock *then* lists the leases, so at least one of
  them sees the other.  A collector that sees a live lease deletes no more
  blobs and stops reading manifests (it looks again every second); a writer
  that sees a live collector waits for it — a bounded wait, with locks aged
  by S3's clock (the Date of the listing), so a dead collector's lock never
  blocks it for long — drops its cache of known blobs whenever the collection
  generation changed, and checks before committing any blob it has not seen
  since.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import io
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from ..faults import fault_point
from .base import (
    MAX_RECORD_BYTES,
    SESSION_NAME_FILE,
    Buffer,
    Store,
    check_digest,
    check_record_name,
    check_snapshot_id,
    decode_session,
    digest_of,
    encode_session,
    hashed_session_name,
    is_hashed_session,
    parse_record,
    report_bad_record,
)
from .errors import CorruptBlobError, ManifestError, MissingBlobError, SnapshotExistsError, StoreError

#: The longest key S3 takes, in bytes.
S3_KEY_BYTES = 1024
#: Blobs at least this big go through s3transfer's multipart upload/download.
MULTIPART_THRESHOLD = 8 << 20
#: Below this size a blob is sent with one conditional PUT (S3 refuses it if it
#: exists); above it a HEAD first saves sending bytes S3 already has.
ASK_FIRST_SIZE = 1 << 20
#: A writer's lease older than this belongs to a process that died and is
#: ignored; a live writer refreshes it on use well before.
LEASE_SECONDS = 10 * 60
#: The same for a collector's lock, which a live collector refreshes every second
#: (between manifests, blobs and deletions). Short, because a dead collector's lock
#: holds writers back until it expires, and GCP and Azure give a notice only 30 s.
GC_LOCK_SECONDS = 10
#: The longest a writer waits for collectors' locks to go. A live collector
#: yields within about a second of seeing the writer's lease and a dead one's
#: lock expires after GC_LOCK_SECONDS, so a lock still live after this belongs to
#: a collector that does not yield: the writer fails with an error naming it.
GC_WAIT_SECONDS = GC_LOCK_SECONDS + 15.0
#: How often a waiting writer looks at the locks again.
GC_POLL_SECONDS = 0.2


class _BufferFile(io.RawIOBase):
    """A seekable file over a buffer in memory: s3transfer reads and writes
    parts of it concurrently, by offset, without copying the whole."""

    def __init__(self, data: Buffer) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos


class _BufferReader(_BufferFile):
    """The upload side: parts are read straight from the blob's buffer."""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(target)]
        target[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


class _BufferWriter(_BufferFile):
    """The download side: ranged parts land in a preallocated bytearray."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = memoryview(data).cast("B")
        end = self._pos + len(chunk)
        if end > len(self._view):
            raise StoreError("S3 returned more bytes than the object's size")
        self._view[self._pos : end] = chunk
        self._pos = end
        return len(chunk)


#: ``S3Store._gc_generation`` before the store first looked at it.
_NOT_LOOKED = "not looked yet"


def parse_s3_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``s3://bucket/prefix?endpoint_url=…&region=…`` → (bucket, "prefix/", options)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"not an S3 store URL: {url!r} (expected s3://bucket/prefix)")
    options = dict(urllib.parse.parse_qsl(parts.query))
    unknown = set(options) - {"endpoint_url", "region"}
    if unknown:
        raise StoreError(f"unknown option(s) {sorted(unknown)} in {url!r}; known: endpoint_url, region")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else "", options


class S3Store(Store):
    """A store in an S3 bucket under a prefix."""

    kind = "s3"

    def __init__(
        self,
        url: str,
        signer: Any = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 8,
        multipart_chunksize: int = 16 << 20,
        max_attempts: int = 8,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from s3transfer.manager import TransferManager

        self.bucket, self.prefix, options = parse_s3_url(url)
        super().__init__(f"s3://{self.bucket}/{self.prefix}", signer)
        endpoint_url = endpoint_url or options.get("endpoint_url")
        config = Config(
            region_name=region or options.get("region"),
            # "standard" retries throttling (503 SlowDown), 5xx and dropped
            # connections with exponential backoff and jitter.
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_concurrency + 4,
            connect_timeout=10,
            read_timeout=60,
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self._transfer = TransferManager(self.client, self.transfer_config)
        self._known: set[str] = set()
        self._lock = threading.Lock()
        # An S3 key holds at most 1024 bytes: prefix, "sessions/", the session, "/", "<id>.json".
        self.session_limit = max(128, S3_KEY_BYTES - len(self.prefix.encode()) - len("sessions//.json") - 128)
        self._named_sessions: set[str] = set()
        self._lease_key = f"{self.prefix}locks/write-{secrets.token_hex(8)}"
        self._lease_taken = 0.0  # time.monotonic() of the lease PUT; 0 when not held
        self._gc_generation: str | None = _NOT_LOOKED
        self._generation_key = self._key("locks", "gc-generation")

    # -- plumbing ------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _blob_key(self, digest: str) -> str:
        check_digest(digest)
        return self._key("blobs", digest[:2], digest)

    def _session_folder(self, session: str) -> str:
        return encode_session(session, self.session_limit)

    def _manifest_key(self, session: str, snapshot_id: str) -> str:
        return self._key("sessions", self._session_folder(session), f"{check_snapshot_id(snapshot_id)}.json")

    def _record_key(self, name: str) -> str:
        return self._key("records", f"{check_record_name(name)}.json")

    def _error(self, error: Exception, what: str) -> StoreError:
        """Translate boto errors into a StoreError that says what to do."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"s3://{self.bucket}/{self.prefix}"
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"no AWS credentials for {where} while {what}: set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or attach an instance profile to this machine"
            )
        if isinstance(error, EndpointConnectionError):
            return StoreError(f"cannot reach S3 for {where} while {what}: {error}")
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket} does not exist (while {what}): create it or fix $JUPYTER_SPOT_STORE"
                )
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
                return StoreError(
                    f"access denied to {where} while {what}: the credentials need s3:GetObject, "
                    f"s3:PutObject, s3:DeleteObject and s3:ListBucket on bucket {self.bucket}"
                )
            if code == "NotImplemented" or status == 501:
                return StoreError(
                    f"{where} does not support conditional writes (If-None-Match), which jupyter-spot needs "
                    f"so that two writers never overwrite each other's snapshots (while {what})"
                )
            return StoreError(f"S3 error {code or status} on {where} while {what}: {error}")
        return StoreError(f"S3 failure on {where} while {what}: {error}")

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError

        try:
            yield
        except (BotoCoreError, ClientError, RetriesExceededError, S3UploadFailedError) as error:
            raise self._error(error, what) from error

    @staticmethod
    def _code(error: Exception) -> str:
        response = getattr(error, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if self._code(error) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(error, f"looking up {key}") from error
        except Exception as error:
            raise self._error(error, f"looking up {key}") from error

    def _list(self, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
        """Pages of ListObjectsV2 under ``prefix``."""
        paginator = self.client.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._calling(f"listing {prefix}"):
            yield from paginator.paginate(**kwargs)

    def _list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self._list(prefix):
            yield from page.get("Contents", [])

    # -- leases: writers and collectors never overlap ----------------------------
    def _live_locks(self) -> dict[str, list[str]]:
        """Live ``write``/``gc`` lock keys, aged by S3's clock: the Date of this very
        listing (or, from a store that sends none, the newest lock, since we just wrote one)."""
        items: list[dict[str, Any]] = []
        now = None
        for page in self._list(self._key("locks", "")):
            items += page.get("Contents", [])
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            with contextlib.suppress(TypeError, ValueError):
                now = email.utils.parsedate_to_datetime(date) if date else now
                if now is not None and now.tzinfo is None:  # a "-0000" zone parses as naive: it is UTC
                    now = now.replace(tzinfo=timezone.utc)
        newest = max((item["LastModified"] for item in items), default=datetime.now(timezone.utc))
        now = max(now, newest) if now is not None else newest
        live: dict[str, list[str]] = {"write": [], "gc": []}
        for item in items:
            kind = item["Key"].rsplit("/", 1)[-1].split("-", 1)[0]
            ttl = {"write": LEASE_SECONDS, "gc": GC_LOCK_SECONDS}.get(kind)
            if ttl and item["Key"] != self._generation_key and (now - item["LastModified"]).total_seconds() < ttl:
                live[kind].append(item["Key"])
        return live

    def _hold_lease(self) -> None:
        """Take (or refresh) this writer's lease before it relies on any blob."""
        with self._lock:
            now = time.monotonic()
            if self._lease_taken and now - self._lease_taken < LEASE_SECONDS / 3:
                return
            waited = self._wait_for_collectors()
            self._lease_taken = now
            generation = self._read_generation()
            if waited or generation != self._gc_generation:
                self._known.clear()  # a collection deleted blobs: believe only S3 now
                self._gc_generation = generation

    def _wait_for_collectors(self) -> bool:
        """Put this writer's lease, then wait until no collector's lock is live; True if it waited.

        A live collector stops within about a second of seeing the lease. The
        lease is put again every second while waiting, so it stays live and, on a
        store whose listings carry no Date, the newest lock's time moves on.
        Raises StoreError once GC_WAIT_SECONDS have passed.
        """
        started = time.monotonic()
        put_at: float | None = None
        waited = False
        while True:
            if put_at is None or time.monotonic() - put_at >= 1.0:
                with self._calling("taking a write lease"):
                    self.client.put_object(Bucket=self.bucket, Key=self._lease_key, Body=b"")
                put_at = time.monotonic()
            collectors = self._live_locks()["gc"]
            if not collectors:
                return waited
            waited = True
            seconds = time.monotonic() - started
            if seconds >= GC_WAIT_SECONDS:
                with contextlib.suppress(StoreError), self._calling("dropping the write lease"):
                    self.client.delete_object(Bucket=self.bucket, Key=self._lease_key)
                raise StoreError(
                    f"a garbage collector's lock ({collectors[0]}) in {self.url} stayed live for {seconds:.0f}s while "
                    "this writer waited to store a snapshot; nothing was written. A collector that does not make way "
                    "for writers is running: stop it, or delete that lock if no `jupyter spot gc` runs"
                )
            time.sleep(GC_POLL_SECONDS)

    def _read_generation(self) -> str | None:
        head = self._head(self._generation_key)
        return head["ETag"] if head else None

    def collection_generation(self) -> str | None:
        """The generation this store saw when it last took a lease (read once if it never did):
        a writer's lease re-reads it, so this costs no request per snapshot."""
        if self._gc_generation == _NOT_LOOKED:
            self._gc_generation = self._read_generation()
        return self._gc_generation

    def announce_collection(self) -> None:
        with self._calling("announcing a garbage collection"):
            self.client.put_object(Bucket=self.bucket, Key=self._generation_key, Body=secrets.token_hex(8).encode())

    def _release_lease(self) -> None:
        with self._lock:
            if not self._lease_taken:
                return
            self._lease_taken = 0.0
            with self._calling("releasing the write lease"):
                self.client.delete_object(Bucket=self.bucket, Key=self._lease_key)

    @contextlib.contextmanager
    def blob_gc_guard(self) -> Iterator[Callable[[], bool]]:
        """Hold the collector's lock; yields ``may_delete()``, False once a writer holds a lease.

        ``may_delete`` re-checks (and refreshes the lock) at most once a second,
        so a writer that arrives mid-collection waits about a second, not the
        whole collection.
        """
        key = self._key("locks", f"gc-{secrets.token_hex(8)}")
        checked, allowed = 0.0, True

        def may_delete() -> bool:
            nonlocal checked, allowed
            if allowed and time.monotonic() - checked >= 1.0:
                with self._calling("refreshing the garbage collection lock"):
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
                allowed = not self._live_locks()["write"]
                checked = time.monotonic()
            return allowed

        try:
            yield may_delete
        finally:
            with self._calling("releasing the garbage collection lock"):
                self.client.delete_object(Bucket=self.bucket, Key=key)

    # -- blobs ---------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        if digest in self._known:
            return True
        if self._head(self._blob_key(digest)) is None:
            return False
        self._known.add(digest)
        return True

    def put_blob(self, digest: str, data: Buffer) -> int:
        key = self._blob_key(digest)
        self._hold_lease()
        if digest in self._known:
            return 0
        size = memoryview(data).nbytes
        if size < ASK_FIRST_SIZE:
            fault_point("blob-write")
            # Our address *is* the SHA-256, so S3 verifies the bytes for free.
            checksum = base64.b64encode(bytes.fromhex(digest)).decode()
            stored = self._put_if_absent(
                key, bytes(data), f"uploading blob {digest[:12]}", ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum
            )
            written = size if stored else 0
        else:
            head = self._head(key)
            written = 0 if head is not None and head["ContentLength"] == size else size
            if written:
                fault_point("blob-write")
                with self._calling(f"uploading blob {digest[:12]} ({size} bytes)"):
                    # botocore adds its default CRC32 to every part; the SHA-256
                    # of the whole blob is checked on every read.
                    self._transfer.upload(_BufferReader(data), self.bucket, key).result()
        self._known.add(digest)
        return written

    def _put_if_absent(self, key: str, body: bytes, what: str, **extra: Any) -> bool:
        """One conditional PUT (``If-None-Match: *``); False when the key exists.

        S3 answers 412 to a write that lost, and 409 while a racing conditional
        write to the same key is in flight — then we ask again.
        """
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
                return True
            except ClientError as error:
                code = self._code(error)
                if code == "PreconditionFailed":
                    return False
                if code != "ConditionalRequestConflict" or attempt >= 4:
                    raise self._error(error, what) from error
            except Exception as error:
                raise self._error(error, what) from error
            time.sleep(0.1 * 2**attempt)
            attempt += 1

    def get_blob(self, digest: str) -> Buffer:
        key = self._blob_key(digest)
        head = self._head(key)
        if head is None:
            raise MissingBlobError(f"blob {digest[:12]} is missing from {self.url}")
        size, etag = head["ContentLength"], head.get("ETag")
        data = bytearray(size)
        with self._calling(f"downloading blob {digest[:12]}"):
            if size >= MULTIPART_THRESHOLD:
                from s3transfer.subscribers import BaseSubscriber

                class Known(BaseSubscriber):  # we just asked; spare s3transfer its own HEAD
                    def on_queued(self, future: Any, **_: Any) -> None:
                        future.meta.provide_transfer_size(size)
                        future.meta.provide_object_etag(etag)

                self._transfer.download(self.bucket, key, _BufferWriter(data), subscribers=[Known()]).result()
            else:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                view, got = memoryview(data), 0
                while got < size:
                    chunk = body.read(min(size - got, 1 << 20))
                    if not chunk:
                        break
                    view[got : got + len(chunk)] = chunk
                    got += len(chunk)
                if got != size:
                    raise CorruptBlobError(f"blob {digest[:12]} in {self.url} was cut short ({got} of {size} bytes)")
        if digest_of(data) != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.url} is corrupt (its checksum does not match)")
        return data

    def iter_blobs(self) -> Iterator[str]:
        for item in self._list_keys(self._key("blobs", "")):
            yield item["Key"].rsplit("/", 1)[-1]

    def blob_age(self, digest: str) -> float:
        """Seconds since upload (S3's LastModified); the leases, not the age, keep GC safe."""
        head = self._head(self._blob_key(digest))
        if head is None:
            return float("inf")
        return (datetime.now(timezone.utc) - head["LastModified"]).total_seconds()

    def delete_blob(self, digest: str) -> None:
        key = self._blob_key(digest)
        self._known.discard(digest)
        with self._calling(f"deleting blob {digest[:12]}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    # -- manifests -----------------------------------------------------------
    def commit_manifest(self, manifest: dict[str, Any]) -> None:
        """Commit under the write lease, then drop it: the blobs are referenced now.

        Under the lease no collector deletes, so the check of blobs not seen
        since the last collection (:meth:`missing_blobs`) stays true until the
        manifest is written.
        """
        try:
            self._hold_lease()
            super().commit_manifest(manifest)
        finally:
            self._release_lease()

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """Which of ``digests`` are gone: a parallel HEAD for each blob this store
        has not stored or seen since the last collection."""
        unseen = [digest for digest in dict.fromkeys(digests) if digest not in self._known]
        if not unseen:
            return []
        with ThreadPoolExecutor(self.transfer_config.max_concurrency) as pool:
            found = list(pool.map(self.has_blob, unseen))
        return [digest for digest, present in zip(unseen, found) if not present]

    def _write_manifest(self, session: str, snapshot_id: str, data: bytes) -> None:
        key = self._manifest_key(session, snapshot_id)
        folder = self._session_folder(session)
        if is_hashed_session(folder) and folder not in self._named_sessions:
            with self._calling(f"naming session {session!r}"):
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key("sessions", folder, SESSION_NAME_FILE), Body=session.encode()
                )
            self._named_sessions.add(folder)
        if not self._put_if_absent(key, data, f"committing snapshot {snapshot_id}"):
            if self._read_manifest(session, snapshot_id) == data:
                return  # our own write, whose answer was lost and whose retry met it
            raise SnapshotExistsError(f"snapshot {snapshot_id} of session {session!r} already exists in {self.url}")

    def _read_manifest(self, session: str, snapshot_id: str) -> bytes:
        from botocore.exceptions import ClientError

        key = self._manifest_key(session, snapshot_id)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if self._code(error) in ("NoSuchKey", "404"):
                raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist") from None
            raise self._error(error, f"reading snapshot {snapshot_id}") from error
        except Exception as error:
            raise self._error(error, f"reading snapshot {snapshot_id}") from error

    def list_sessions(self) -> list[str]:
        base = self._key("sessions", "")
        names = []
        for page in self._list(base, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                folder = common["Prefix"][len(base) :].rstrip("/")
                name = self._hashed_session_name(folder) if is_hashed_session(folder) else decode_session(folder)
                if name is not None:
                    names.append(name)
        return sorted(names)

    def _hashed_session_name(self, folder: str) -> str | None:
        """A long name's real name, kept beside its manifests; None if it has no snapshot (yet) or is damaged."""
        from botocore.exceptions import ClientError

        try:
            stream = self.client.get_object(Bucket=self.bucket, Key=self._key("sessions", folder, SESSION_NAME_FILE))
            data = stream["Body"].read(8192)
        except ClientError as error:
            if self._code(error) not in ("NoSuchKey", "404"):
                raise self._error(error, f"reading the name of session folder {folder}") from error
            data = b""
        except Exception as error:
            raise self._error(error, f"reading the name of session folder {folder}") from error
        name = hashed_session_name(self.url, folder, data, self.session_limit)
        return name if name is not None and self.list_snapshots(name) else None

    def list_snapshots(self, session: str) -> list[str]:
        base = self._key("sessions", self._session_folder(session), "")
        return sorted(
            name[: -len(".json")]
            for name in (item["Key"][len(base) :] for item in self._list_keys(base))
            if name.endswith(".json") and "/" not in name
        )

    def delete_snapshot(self, session: str, snapshot_id: str) -> None:
        key = self._manifest_key(session, snapshot_id)
        if self._head(key) is None:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist")
        with self._calling(f"deleting snapshot {snapshot_id}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    # -- records -------------------------------------------------------------
    def put_record(self, name: str, data: dict[str, Any]) -> None:
        body = json.dumps(data, indent=1, sort_keys=True).encode()
        with self._calling(f"writing record {name}"):
            self.client.put_object(Bucket=self.bucket, Key=self._record_key(name), Body=body)

    def get_record(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            stream = self.client.get_object(Bucket=self.bucket, Key=self._record_key(name))["Body"]
            body = stream.read(MAX_RECORD_BYTES + 1)
            stream.close()
        except ClientError as error:
            if self._code(error) in ("NoSuchKey", "404"):
                return None
            raise self._error(error, f"reading record {name}") from error
        except Exception as error:
            raise self._error(error, f"reading record {name}") from error
        if len(body) > MAX_RECORD_BYTES:
            report_bad_record(self.url, name, f"it is larger than {MAX_RECORD_BYTES} bytes")
            return None
        return parse_record(self.url, name, body)

    def list_records(self) -> list[str]:
        base = self._key("records", "")
        return sorted(
            name[: -len(".json")]
            for name in (item["Key"][len(base) :] for item in self._list_keys(base))
            if name.endswith(".json") and "/" not in name
        )

    # -- signing keys (keys.py) --------------------------------------------------
    def _key_object_key(self, name: str) -> str:
        return self._key("keys", f"{check_record_name(name)}.json")

    def create_key_object(self, name: str, data: bytes) -> bool:
        return self._put_if_absent(self._key_object_key(name), data, f"creating signing key {name}")

    def read_key_object(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key_object_key(name))["Body"].read()
        except ClientError as error:
            if self._code(error) in ("NoSuchKey", "404"):
                return None
            raise self._error(error, f"reading signing key {name}") from error
        except Exception as error:
            raise self._error(error, f"reading signing key {name}") from error

    def list_key_objects(self) -> list[str]:
        prefix = self._key("keys", "")
        return sorted(
            item["Key"][len(prefix) :].removesuffix(".json")
            for item in self._list_keys(prefix)
            if item["Key"].endswith(".json")
        )

    # -- health --------------------------------------------------------------
    def check_writable(self) -> None:
        probe = self._key("locks", f"probe-{secrets.token_hex(4)}")
        if self._head_bucket_missing():
            raise StoreError(f"bucket {self.bucket} does not exist: create it or fix $JUPYTER_SPOT_STORE")
        with self._calling("checking that it is writable"):
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _head_bucket_missing(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if self._code(error) in ("404", "NoSuchBucket"):
                return True
            raise self._error(error, "checking the bucket") from error
        except Exception as error:
            raise self._error(error, "checking the bucket") from error
        return False

    def close(self) -> None:
        """Stop s3transfer's worker threads."""
        self._transfer.shutdown()

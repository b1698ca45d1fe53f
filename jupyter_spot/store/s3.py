"""Snapshots in an S3 bucket (or any S3-compatible store) through boto3.

Layout under ``s3://bucket/prefix`` mirrors the FileStore::

    blobs/ab/abcdef…             content-addressed bytes (multipart above 8 MB)
    sessions/<session>/<id>.json one signed manifest per snapshot
    sessions/<long…%~hash>/session-name  a session whose key would pass 1024 bytes: its real name
    records/<name>.json          the server's records
    keys/NNNNNN.json             signing keys wrapped by KMS (keys.py), written once each
    locks/…                      writers' leases and collectors' locks (s3_leases.py)

Why these choices:

* Blobs are verified against their SHA-256 on every read. A blob under 8 MiB —
  every chunk of a big buffer — is one conditional PUT carrying that SHA-256 as
  ``x-amz-checksum-sha256``, its body read from the caller's buffer, so S3
  itself refuses damaged bytes and never stores it twice (no HEAD first), and
  one GET hashed as it lands in the caller's buffer; a bigger one is looked up
  first and sent by s3transfer (multipart parts carry CRC32s).
* Chunks travel in parallel: the kernel's writer (and a restore) uses
  ``blob_workers`` threads, and at most ``max_concurrency`` blob requests of one
  store are in flight whoever asks, which the connection pool is sized for.
* The manifest commit is ``PutObject`` with ``If-None-Match: *``: S3 answers 412
  to the second writer of the same key, so no snapshot ever overwrites another.
* A blob this process knows is stored costs no request at all, which is what
  makes an unchanged snapshot nearly free; the lease protocol of s3_leases.py
  keeps garbage collection from deleting a blob a writer believes in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections.abc import Iterator
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
from .s3_leases import S3Leases
from .s3_objects import BufferReader, BufferWriter, parse_s3_url

#: The longest key S3 takes, in bytes.
S3_KEY_BYTES = 1024
#: Blobs at least this big go through s3transfer's multipart upload/download
#: (its pool sends ``max_concurrency`` parts at a time). A smaller one — every
#: chunk of a big buffer — is one request, sent from the caller's thread: the
#: kernel's writer runs ``blob_workers`` of them, and the store lets at most
#: ``max_concurrency`` blob requests be in flight whoever calls.
MULTIPART_THRESHOLD = 8 << 20
#: Blob bytes read from a response at a time (hashed as they land).
READ_BLOCK = 1 << 20


class S3Store(S3Leases, Store):
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
            # Every read is checked against its SHA-256 address here; botocore
            # hashing each response again would only cost a core.
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self._transfer = TransferManager(self.client, self.transfer_config)
        #: Single-request blob transfers in flight, across every thread using this store.
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._known: set[str] = set()
        # An S3 key holds at most 1024 bytes: prefix, "sessions/", the session, "/", "<id>.json".
        self.session_limit = max(128, S3_KEY_BYTES - len(self.prefix.encode()) - len("sessions//.json") - 128)
        self._named_sessions: set[str] = set()
        self._init_leases()

    # -- keys ----------------------------------------------------------------
    def _blob_key(self, digest: str) -> str:
        check_digest(digest)
        return self._key("blobs", digest[:2], digest)

    def _session_folder(self, session: str) -> str:
        return encode_session(session, self.session_limit)

    def _manifest_key(self, session: str, snapshot_id: str) -> str:
        return self._key("sessions", self._session_folder(session), f"{check_snapshot_id(snapshot_id)}.json")

    def _record_key(self, name: str) -> str:
        return self._key("records", f"{check_record_name(name)}.json")

    # -- blobs ---------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        if digest in self._known:
            return True
        if self._head(self._blob_key(digest)) is None:
            return False
        self._known.add(digest)
        return True

    @property
    def blob_workers(self) -> int:  # type: ignore[override]
        """As many blobs at once as the store lets requests be in flight: on S3 each
        chunk is its own object, and the network, not a core, is what they wait on."""
        return self.transfer_config.max_concurrency

    def put_blob(self, digest: str, data: Buffer) -> int:
        key = self._blob_key(digest)
        self._hold_lease()
        if digest in self._known:
            return 0
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size < MULTIPART_THRESHOLD:
            # Our address *is* the SHA-256, so S3 verifies the bytes for free, and the
            # condition answers "exists" without a HEAD. The body is read from ``data``.
            checksum = base64.b64encode(bytes.fromhex(digest)).decode()
            with self._slots:
                fault_point("blob-write")
                stored = self._put_if_absent(
                    key,
                    BufferReader(view),
                    f"uploading blob {digest[:12]}",
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
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
                    self._transfer.upload(BufferReader(view), self.bucket, key).result()
        self._known.add(digest)
        return written

    def get_blob(self, digest: str) -> Buffer:
        data, response = self._download(digest, None)
        if data is not None:
            return data
        # Too big for one request: s3transfer's ranged GETs, told what the first GET said.
        size, etag = response["ContentLength"], response.get("ETag")
        data = bytearray(size)
        with self._calling(f"downloading blob {digest[:12]}"):
            from s3transfer.subscribers import BaseSubscriber

            class Known(BaseSubscriber):  # spare s3transfer its own HEAD
                def on_queued(self, future: Any, **_: Any) -> None:
                    future.meta.provide_transfer_size(size)
                    future.meta.provide_object_etag(etag)

            key = self._blob_key(digest)
            self._transfer.download(self.bucket, key, BufferWriter(data), subscribers=[Known()]).result()
        if digest_of(data) != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.url} is corrupt (its checksum does not match)")
        return data

    def read_blob_into(self, digest: str, out: memoryview) -> None:
        """Straight into ``out`` with one GET (no HEAD: the response says the size)."""
        out = out.cast("B")
        if out.nbytes >= MULTIPART_THRESHOLD:
            super().read_blob_into(digest, out)  # through s3transfer, then one copy
        else:
            self._download(digest, out)

    def _download(self, digest: str, out: memoryview | None) -> tuple[bytearray | None, dict[str, Any]]:
        """One GET of a blob into ``out`` (exactly its size) or a new bytearray (returned with
        the response), hashed as it lands; with no ``out``, a blob of MULTIPART_THRESHOLD or
        more is not read: (None, the response that says its size and ETag)."""
        from botocore.exceptions import ClientError

        key, what = self._blob_key(digest), f"downloading blob {digest[:12]}"
        with self._slots, self._calling(what):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if self._code(error) in ("NoSuchKey", "404"):
                    raise MissingBlobError(f"blob {digest[:12]} is missing from {self.url}", [digest]) from None
                raise
            body, size = response["Body"], response["ContentLength"]
            made = None
            try:
                if out is None:
                    if size >= MULTIPART_THRESHOLD:
                        return None, response
                    made = bytearray(size)
                    out = memoryview(made)
                if size != out.nbytes:
                    raise CorruptBlobError(
                        f"blob {digest[:12]} in {self.url} holds {size} bytes, not the {out.nbytes} it was stored with"
                    )
                hasher, got = hashlib.sha256(), 0
                while got < size:
                    block = body.read(min(size - got, READ_BLOCK))
                    if not block:
                        break
                    out[got : got + len(block)] = block
                    hasher.update(block)
                    got += len(block)
            finally:
                body.close()
        if got != size:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.url} was cut short ({got} of {size} bytes)")
        if hasher.hexdigest() != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.url} is corrupt (its checksum does not match)")
        return made, response

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

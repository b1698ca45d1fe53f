"""The S3 requests S3Store is built from: keys, error translation, listing, conditional
PUTs, and file objects over buffers in memory for s3transfer.

Kept apart from the store's logic (s3.py) and the lease protocol (s3_leases.py),
which both speak to S3 only through these.
"""

from __future__ import annotations

import contextlib
import io
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from .base import Buffer
from .errors import StoreError


class BufferFile(io.RawIOBase):
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


class BufferReader(BufferFile):
    """The upload side: parts are read straight from the blob's buffer."""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(target)]
        target[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


class BufferWriter(BufferFile):
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


class S3Objects:
    """Requests on ``self.client`` for objects under ``s3://self.bucket/self.prefix``
    (the attributes S3Store sets), with boto's errors turned into StoreErrors that say what to do."""

    client: Any
    bucket: str
    prefix: str
    url: str

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

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

    def _put_if_absent(self, key: str, body: bytes | BufferReader, what: str, **extra: Any) -> bool:
        """One conditional PUT (``If-None-Match: *``); False when the key exists.

        S3 answers 412 to a write that lost, and 409 while a racing conditional
        write to the same key is in flight — then we ask again (a file body from its start).
        """
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            try:
                if isinstance(body, BufferReader):
                    body.seek(0)
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


"""Where snapshots go: a directory (local disk, EFS) or S3."""

from __future__ import annotations

from typing import Any

from .base import (
    CorruptBlobError,
    ManifestError,
    MissingBlobError,
    SnapshotExistsError,
    Store,
    StoreError,
    digest_of,
)
from .filesystem import FileStore
from .manifest import ManifestSigner
from .retention import GCReport, collect_garbage


def open_store(url: str, signer: Any = None) -> Store:
    """The store a URL names: ``s3://bucket/prefix`` or a directory path."""
    if url.startswith("s3://"):
        from .s3 import S3Store  # boto3 is only needed by those who use S3

        return S3Store(url, signer=signer)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return FileStore(url, signer=signer)


__all__ = [
    "CorruptBlobError",
    "FileStore",
    "GCReport",
    "ManifestError",
    "ManifestSigner",
    "MissingBlobError",
    "SnapshotExistsError",
    "Store",
    "StoreError",
    "collect_garbage",
    "digest_of",
    "open_store",
]

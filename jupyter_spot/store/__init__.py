"""Where snapshots go: a directory (local disk, EFS) or S3."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from .base import Store, digest_of
from .errors import CorruptBlobError, ManifestError, MissingBlobError, SnapshotExistsError, StoreError
from .filesystem import FileStore
from .keys import KmsAccessError, UnknownKeyError
from .manifest import ManifestSigner
from .retention import GCReport, collect_garbage

if TYPE_CHECKING:
    from .tiered import TieredStore

CACHE_ENV = "JUPYTER_SPOT_CACHE"

_tiered: dict[tuple[str, str, int], TieredStore] = {}
_tiered_lock = threading.Lock()


def open_store(url: str, signer: Any = None, cache: str | None = None) -> Store:
    """The store a URL names: ``s3://bucket/prefix`` or a directory path.

    An S3 store with a cache directory (``cache`` or ``$JUPYTER_SPOT_CACHE``: a
    local disk or EFS path) is tiered: writes land there first and reach S3 in
    the background, so a notice's short budget is spent on local writes.
    """
    if url.startswith("s3://"):
        from .s3 import S3Store  # boto3 is only needed by those who use S3

        cache = cache or os.environ.get(CACHE_ENV)
        if not cache:
            return S3Store(url, signer=signer)
        from .tiered import TieredStore

        # One replication thread per store and process, however often it is opened.
        with _tiered_lock:
            key = (url, os.path.realpath(cache), id(signer))
            if key not in _tiered or _tiered[key].closed:
                durable = S3Store(url, signer=signer)
                _tiered[key] = TieredStore(FileStore(cache, signer=durable.signer), durable)
            return _tiered[key]
    url = url.removeprefix("file://")
    return FileStore(url, signer=signer)


__all__ = [
    "CorruptBlobError",
    "FileStore",
    "GCReport",
    "KmsAccessError",
    "ManifestError",
    "ManifestSigner",
    "MissingBlobError",
    "SnapshotExistsError",
    "Store",
    "StoreError",
    "UnknownKeyError",
    "collect_garbage",
    "digest_of",
    "open_store",
]

"""What a store raises: a leaf module, so every store module (and the signer
under them) can name the errors without importing the store interface."""

from __future__ import annotations


class StoreError(Exception):
    """Anything a store cannot do; the message says what and where."""


class CorruptBlobError(StoreError):
    """A blob's bytes no longer hash to its address."""


class MissingBlobError(StoreError):
    """A manifest names a blob the store does not have; ``digests`` says which."""

    def __init__(self, message: str, digests: list[str] | None = None) -> None:
        super().__init__(message)
        self.digests: list[str] = list(digests or [])


class ManifestError(StoreError):
    """A manifest is missing, truncated, not JSON, or not signed by a trusted key."""


class SnapshotExistsError(StoreError):
    """Another writer already committed a snapshot with this id."""

"""Names the snapshot and restore paths share: blob content keys, snapshot id times, this kernel's id, versions."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from typing import Any

import xxhash

from .. import __version__


def content_key(data: Any) -> str:
    """A fast (non-cryptographic) name for bytes, used to skip unchanged blobs.

    The store still addresses blobs by SHA-256; this only avoids computing it
    — and rewriting the blob — for bytes we have seen before.
    """
    view = memoryview(data)
    return f"{xxhash.xxh3_128_hexdigest(view)}-{view.nbytes}"


def kernel_id() -> str:
    """The kernel's id from its connection file (``kernel-<id>.json``), as its server knows it; "" if none."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            name = os.path.basename(IPKernelApp.instance().connection_file)
            return name.removeprefix("kernel-").removesuffix(".json")
    except Exception:
        pass
    return ""


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "jupyter_spot": __version__}
    for name in ("numpy", "pandas", "sklearn", "torch", "dill"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


def parse_id_time(snapshot_id: str) -> datetime | None:
    try:
        return datetime.strptime(snapshot_id.split("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None

"""Sizes as people read them, the same in the magics, the CLI and the server."""

from __future__ import annotations


def human_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KB"`` (decimal units, as disks and S3 bills count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"

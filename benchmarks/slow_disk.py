"""A slower disk for a benchmark run: a write-bandwidth limit on the device under a directory.

This VM's disk writes 1 GiB in 0.7-0.8 s (about 1.4 GB/s), four times faster
than when issue 12's bars were set (2.75 s) and faster than most cloud volumes
(EBS gp3 gives 125-1,000 MB/s). What a snapshot spends besides writing (pickling,
hashing) weighs more against a fast disk, so a ratio to the disk depends on the
disk; ``--disk-mbps`` lets one machine show both.

The limit is cgroup v1's ``blkio.throttle.write_bps_device`` in the root group,
which covers every writer on the device, page-cache writeback included. It
needs root, and it is lifted (back to what it was) when the run ends.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BLKIO_WRITE_LIMIT = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")


class CannotLimit(Exception):
    """The disk under the directory cannot be limited here; the message says why."""


def whole_disk(directory: Path) -> str:
    """``major:minor`` of the disk (not the partition) that holds ``directory``."""
    device = os.stat(directory).st_dev
    node = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    if not node.exists():
        raise CannotLimit(f"{directory} is not on a local block device (a network, overlay or memory filesystem)")
    if (node / "partition").exists():
        node = node.resolve().parent
    return (node / "dev").read_text().strip()


def current_limit(device: str) -> int:
    """The write limit set on ``device`` now, in bytes per second (0: none)."""
    for line in BLKIO_WRITE_LIMIT.read_text().splitlines():
        name, _, limit = line.partition(" ")
        if name == device:
            return int(limit)
    return 0


@contextmanager
def write_limit(directory: Path, megabytes_per_second: float | None) -> Iterator[None]:
    """Limit writes to the disk under ``directory`` to this many MB/s (10^6 bytes) while inside."""
    if megabytes_per_second is None:
        yield
        return
    if not BLKIO_WRITE_LIMIT.exists():
        raise CannotLimit(f"there is no cgroup v1 blkio controller ({BLKIO_WRITE_LIMIT} is missing)")
    device = whole_disk(directory)
    before = current_limit(device)
    try:
        BLKIO_WRITE_LIMIT.write_text(f"{device} {int(megabytes_per_second * 1e6)}")
    except PermissionError:
        raise CannotLimit(f"writing {BLKIO_WRITE_LIMIT} needs root") from None
    try:
        yield
    finally:
        BLKIO_WRITE_LIMIT.write_text(f"{device} {before}")


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--disk-mbps``, for a benchmark script."""
    parser.add_argument("--disk-mbps", type=float, default=None,
                        help="limit writes to the disk under --dir to this many MB/s for the run (root, cgroup v1)")


@contextmanager
def option_applied(parser: argparse.ArgumentParser, args: argparse.Namespace, directory: Path) -> Iterator[None]:
    """:func:`write_limit` for ``--disk-mbps``; a disk it cannot limit is a usage error."""
    try:
        with write_limit(directory, args.disk_mbps):
            yield
    except CannotLimit as error:  # raised only before the run starts
        parser.error(f"--disk-mbps: {error}")


def print_limit(args: argparse.Namespace) -> None:
    """The report's line about ``--disk-mbps``, when it was given."""
    if args.disk_mbps:
        print(f"disk writes limited to {args.disk_mbps:g} MB/s for the run (--disk-mbps)")

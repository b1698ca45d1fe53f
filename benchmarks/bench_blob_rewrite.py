"""What a FileStore pays to never trust a damaged blob (issue 9 §2), per big blob.

    python benchmarks/bench_blob_rewrite.py [--mb 64 512] [--rounds 3] [--dir PATH]

A process storing bytes whose blob file already exists (a new kernel computing
the same values again) used to drop its copy when the file had the right size.
It now writes the blob again — temporary file, fsync, rename over the old
file — the first time in a process, and trusts it by size after that. Per
size this prints the best of ``--rounds``:

  new process   add_blob of an existing blob: write + hash + fsync + rename (now);
  trusted       the same in a process that wrote it already: write + hash, copy dropped
                (what every process paid before);
  verify        reading the existing file back and hashing it (the alternative).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from jupyter_spot.store import FileStore


def read_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(work: object) -> float:
    started = time.perf_counter()
    work()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rewrite-", dir=args.dir))
    try:
        for mb in args.mb:
            data = os.urandom(mb << 20)
            digest, _ = FileStore(root).add_blob(data)
            path = root / "blobs" / digest[:2] / digest
            fresh, trusted, verify = [], [], []
            for _ in range(args.rounds):
                store = FileStore(root)  # a new process: it has not written this blob
                fresh.append(timed(lambda: store.add_blob(data)))
                trusted.append(timed(lambda: store.add_blob(data)))
                verify.append(timed(lambda: read_and_hash(path)))
            print(
                f"{mb:5d} MiB  new process {min(fresh):6.3f} s   trusted {min(trusted):6.3f} s   "
                f"extra {min(fresh) - min(trusted):+6.3f} s   verify instead {min(verify):6.3f} s"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

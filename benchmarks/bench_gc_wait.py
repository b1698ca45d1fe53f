"""How long a writer waits for a garbage collection of an S3 store, against moto's server.

    python benchmarks/bench_gc_wait.py [--manifests 600] [--rounds 5]

The store holds ``--manifests`` signed manifests (20 sessions) naming 200
blobs. Each round starts ``collect_garbage`` (keep everything: it only scans
and ages blobs) and, once the collector has read a random 5-15% of the
manifests, times one ``put_blob`` of a new blob: the writer's lease, its wait
for the collector's lock to go, and the upload. docs/s3.md promises about a second, however many
manifests there are; before issue 9 the collector looked for writers only
after reading every manifest (2.8 s with 600).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test harness

import boto3
from harness.s3 import MotoServer

from jupyter_spot.store import collect_garbage, digest_of
from jupyter_spot.store.manifest import MANIFEST, snapshot_place
from jupyter_spot.store.s3 import S3Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("JUPYTER_SPOT_SIGNING_KEY", "bench-" + secrets.token_hex(8))
    server = MotoServer()
    try:
        run(server.url, args)
    finally:
        server.stop()


def run(endpoint: str, args: argparse.Namespace) -> None:
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-gc-wait")
    url = f"s3://bench-gc-wait/spot?endpoint_url={endpoint}"
    setup = S3Store(url)
    blobs = [f"blob {n}".encode() for n in range(200)]
    for data in blobs:
        setup.put_blob(digest_of(data), data)
    for number in range(args.manifests):
        named = [digest_of(blobs[(number * 7 + k) % len(blobs)]) for k in range(5)]
        manifest = {"session": f"nb{number % 20}.ipynb", "id": f"{number:05d}", "blobs": named}
        if number == args.manifests - 1:
            setup.commit_manifest(manifest)  # the last one drops the lease put_blob took
        else:  # the others straight in: the setup need not pay a lease per manifest
            place = snapshot_place(manifest["session"], manifest["id"])
            setup._write_manifest(manifest["session"], manifest["id"], setup.signer.encode(manifest, MANIFEST, place))

    started = time.perf_counter()
    collect_garbage(S3Store(url), keep=args.manifests, grace_seconds=0)
    alone = time.perf_counter() - started
    print(f"{args.manifests} manifests, {len(blobs)} blobs; a collection alone takes {alone:.2f} s")

    waits = []
    for round_ in range(args.rounds):
        collector = S3Store(url)
        arrive = threading.Event()
        reads = [0, int(args.manifests * random.uniform(0.05, 0.15))]

        def count(request: Any, **_: Any) -> None:
            if request.method == "GET" and "/sessions/" in request.url:
                reads[0] += 1
                if reads[0] >= reads[1]:
                    arrive.set()

        collector.client.meta.events.register("before-send.s3.GetObject", count)
        thread = threading.Thread(target=lambda: collect_garbage(collector, keep=args.manifests, grace_seconds=0))
        thread.start()
        arrive.wait(120)  # the writer arrives while the collector reads manifests
        writer = S3Store(url)
        data = f"new blob {round_} {secrets.token_hex(4)}".encode()
        began = time.perf_counter()
        writer.put_blob(digest_of(data), data)
        waits.append(time.perf_counter() - began)
        writer.commit_manifest({"session": "writer.ipynb", "id": f"w{round_:03d}", "blobs": [digest_of(data)]})
        thread.join()
        for store in (collector, writer):
            store.close()
    print(
        f"(e) writer arriving mid-collection waits: median {statistics.median(waits):.2f} s, "
        f"max {max(waits):.2f} s over {len(waits)} rounds ({', '.join(f'{w:.2f}' for w in waits)})"
    )


if __name__ == "__main__":
    main()

"""S3Store upload/download throughput against plain s3transfer, on moto's server, in one run.

    python benchmarks/bench_s3.py [--mb 256] [--blob-mb 32] [--small 1000] [--rounds 2]

Same bytes, same endpoint, same TransferConfig (multipart threshold, part size,
concurrency) for both sides:

  (a) big blobs: ``S3Store.put_blob`` (SHA-256 part checksums, HEAD to skip
      known blobs, lease) vs ``TransferManager.upload`` of a BytesIO, blob by blob;
  (b) small blobs (64 KiB): ``put_blob`` (one PUT with x-amz-checksum-sha256) vs
      ``upload`` of each, one after another as the kernel's writer sends them;
  (c) reading back: ``get_blob`` (verified, into a writable bytearray) vs
      ``download_fileobj`` into a BytesIO;
  (d) an unchanged second snapshot of (a): what it costs when nothing changed.

moto keeps everything in memory in a Python process, so absolute MB/s say more
about moto than S3; the ratios compare our overhead with s3transfer's own.
Each side runs ``--rounds`` times, alternating, and the best round counts.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test harness

import boto3
from harness.s3 import MotoServer, RequestLog
from s3transfer.manager import TransferManager

from jupyter_spot.store import digest_of
from jupyter_spot.store.s3 import S3Store


def best(times: list[float]) -> float:
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="total MB of big blobs")
    parser.add_argument("--blob-mb", type=int, default=32, help="size of each big blob")
    parser.add_argument("--small", type=int, default=1000, help="number of 64 KiB blobs")
    parser.add_argument("--rounds", type=int, default=2)
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
    client = boto3.client("s3", endpoint_url=endpoint)
    big = [os.urandom(args.blob_mb << 20) for _ in range(max(1, args.mb // args.blob_mb))]
    small = [os.urandom(64 << 10) for _ in range(args.small)]
    big_mb = sum(map(len, big)) / 2**20
    small_mb = sum(map(len, small)) / 2**20
    print(f"moto at {endpoint}; {len(big)} x {args.blob_mb} MB and {len(small)} x 64 KiB blobs")

    ours_big, plain_big, ours_small, plain_small, ours_get, plain_get = [], [], [], [], [], []
    unchanged: tuple[float, int, int] = (0.0, 0, 0)
    for round_ in range(args.rounds):
        bucket = f"bench-{round_}-{secrets.token_hex(4)}"
        client.create_bucket(Bucket=bucket)
        store = S3Store(f"s3://{bucket}/ours", endpoint_url=endpoint)
        plain = TransferManager(client, store.transfer_config)

        started = time.perf_counter()
        for i, data in enumerate(big):
            plain.upload(io.BytesIO(data), bucket, f"plain/big/{i}").result()
        plain_big.append(time.perf_counter() - started)

        started = time.perf_counter()
        digests = [digest_of(data) for data in big]  # the engine hashes anyway; we time the store
        for digest, data in zip(digests, big):
            store.put_blob(digest, data)
        store.commit_manifest({"session": "bench", "id": f"{round_:04d}", "blobs": digests})
        ours_big.append(time.perf_counter() - started)

        started = time.perf_counter()
        for i, data in enumerate(small):
            plain.upload(io.BytesIO(data), bucket, f"plain/small/{i}").result()
        plain_small.append(time.perf_counter() - started)

        small_digests = [digest_of(data) for data in small]
        started = time.perf_counter()
        for digest, data in zip(small_digests, small):
            store.put_blob(digest, data)
        ours_small.append(time.perf_counter() - started)

        started = time.perf_counter()
        for i in range(len(big)):
            sink = io.BytesIO()
            plain.download(bucket, f"plain/big/{i}", sink).result()
        plain_get.append(time.perf_counter() - started)

        reader = S3Store(f"s3://{bucket}/ours", endpoint_url=endpoint)
        started = time.perf_counter()
        for digest in digests:
            reader.get_blob(digest)
        ours_get.append(time.perf_counter() - started)

        log = RequestLog(store.client)
        started = time.perf_counter()
        for digest, data in zip(digests + small_digests, big + small):
            store.put_blob(digest, data)
        store.commit_manifest({"session": "bench", "id": f"{round_:04d}-again", "blobs": digests + small_digests})
        unchanged = (time.perf_counter() - started, log.count(), log.bytes_sent())
        plain.shutdown()
        store.close()
        reader.close()

    def line(label: str, mb: float, ours: list[float], plain: list[float]) -> None:
        o, p = best(ours), best(plain)
        print(f"{label:<34} ours {mb / o:8.1f} MB/s   s3transfer {mb / p:8.1f} MB/s   ratio {p / o:5.2f}x")

    print("throughput (ratio > 1: ours is faster)")
    line(f"(a) upload {big_mb:.0f} MB in big blobs", big_mb, ours_big, plain_big)
    line(f"(b) upload {small_mb:.0f} MB in 64 KiB blobs", small_mb, ours_small, plain_small)
    line(f"(c) download {big_mb:.0f} MB", big_mb, ours_get, plain_get)
    seconds, requests, sent = unchanged
    print(
        f"(d) unchanged snapshot of {big_mb + small_mb:.0f} MB: {seconds * 1000:.1f} ms, "
        f"{requests} requests, {sent} bytes sent (first upload took {best(ours_big) + best(ours_small):.2f} s)"
    )


if __name__ == "__main__":
    main()

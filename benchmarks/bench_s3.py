"""S3Store with chunked buffers against plain s3transfer, on moto's server, in one run.

    python benchmarks/bench_s3.py [--mb 512] [--chunk-mb 4] [--small 1000] [--rounds 2] [--kernel]

The baseline is s3transfer uploading (and downloading) the same bytes as ONE
file, with the store's own TransferConfig (8 MiB multipart threshold, 16 MiB
parts, 8 at a time): what "copy the array to S3" costs without jupyter-spot;
and, second, s3transfer sending the same chunks as files, all submitted at once
to its pool (read from the buffer without a copy): the same objects without our
SHA-256, checksums, conditions, lease and manifest.

  (a) a full snapshot: one ``--mb`` buffer cut into ``--chunk-mb`` chunks, sent
      through the kernel's Writer (``store.blob_workers`` threads calling
      ``add_blob``: SHA-256, one conditional PUT per chunk) and committed;
  (b) one element changed: the next snapshot through the same Writer — the
      blob PUTs and bytes it sends (RequestLog: every request the client sends);
  (c) reading it back: every chunk read in parallel straight into one
      allocation (``read_blob_into``, SHA-256 checked) vs s3transfer's download
      of the one file into a BytesIO;
  (d) an unchanged snapshot: what it costs when nothing changed;
  (e) 64 KiB blobs one after another (``put_blob``) vs s3transfer's upload of each;
  (f) with ``--kernel``: a real kernel whose namespace holds the buffer as a
      numpy array, ``%spot snapshot`` to S3, then ``a[0] = -1`` and another:
      the new objects under blobs/ and their bytes, counted in the bucket.

moto keeps everything in memory in one Python process on this 2-core machine, so
absolute MB/s say more about moto than S3; the ratios compare our path with
s3transfer's on the same server. Each side runs ``--rounds`` times, alternating,
and the best round counts.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test harness

import boto3
import xxhash
from harness.s3 import MotoServer, RequestLog
from s3transfer.manager import TransferManager

from jupyter_spot.kernel.results import SnapshotResult
from jupyter_spot.kernel.writer import Job, Writer
from jupyter_spot.store import digest_of
from jupyter_spot.store.s3 import S3Store
from jupyter_spot.store.s3_objects import BufferReader


def snapshot_through_writer(writer: Writer, snapshot_id: str, chunks: list[memoryview]) -> SnapshotResult:
    """What the engine hands the writer: every chunk under its content key (unchanged ones are
    skipped by the writer, which remembers what is durable), then the manifest listing them."""
    keys = [xxhash.xxh3_128_hexdigest(chunk) for chunk in chunks]  # the engine's content key
    result = SnapshotResult(id=snapshot_id, session="bench", kind="snapshot", execution_count=0)
    job = Job(
        result=result,
        blobs=list(zip(keys, chunks)),
        build_manifest=lambda durable: {"session": "bench", "id": snapshot_id, "blobs": [durable[k] for k in keys]},
    )
    writer.submit(job)
    writer.wait(job)
    if result.error:
        raise RuntimeError(result.error)
    return result


def blob_puts(log: RequestLog) -> tuple[int, int]:
    puts = [size for op, url, size in log.requests if op == "PutObject" and "/blobs/" in url]
    return len(puts), sum(puts)


def empty_bucket(client: Any, bucket: str) -> None:
    """Free moto's memory between rounds."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="size of the buffer")
    parser.add_argument("--chunk-mb", type=int, default=4, help="chunk size (the engine's default is 4 MiB)")
    parser.add_argument("--small", type=int, default=1000, help="number of 64 KiB blobs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kernel", action="store_true", help="also (f): a real kernel snapshotting to S3")
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("JUPYTER_SPOT_SIGNING_KEY", "bench-" + secrets.token_hex(8))
    server = MotoServer()
    try:
        run(server.url, args)
        if args.kernel:
            from bench_s3_kernel import one_element_change

            one_element_change(server.url, args.mb)
    finally:
        server.stop()


def run(endpoint: str, args: argparse.Namespace) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    buffer = bytearray(os.urandom(args.mb << 20))
    size = args.chunk_mb << 20
    view = memoryview(buffer)
    chunks = [view[i : i + size] for i in range(0, len(view), size)]
    small = [os.urandom(64 << 10) for _ in range(args.small)]
    mb, small_mb = len(buffer) / 2**20, len(small) * 64 / 1024
    print(f"moto at {endpoint}; a {mb:.0f} MB buffer in {len(chunks)} chunks of {args.chunk_mb} MiB")

    raw_up, ours_up, raw_down, ours_down, raw_small, ours_small = [], [], [], [], [], []
    files_up: list[float] = []
    files_down: list[float] = []
    change: tuple[float, int, int] = (0.0, 0, 0)
    unchanged: tuple[float, int, int] = (0.0, 0, 0)
    for round_ in range(args.rounds):
        buffer[0] = round_  # the first snapshot of each round starts from the same bytes
        bucket = f"bench-{round_}-{secrets.token_hex(4)}"
        client.create_bucket(Bucket=bucket)
        store = S3Store(f"s3://{bucket}/ours", endpoint_url=endpoint)
        plain = TransferManager(client, store.transfer_config)

        started = time.perf_counter()
        plain.upload(io.BytesIO(buffer), bucket, "plain/one-file").result()
        raw_up.append(time.perf_counter() - started)

        started = time.perf_counter()
        for future in [plain.upload(BufferReader(chunk), bucket, f"plain/chunk/{i}") for i, chunk in enumerate(chunks)]:
            future.result()
        files_up.append(time.perf_counter() - started)

        writer = Writer(store, {}, lambda manifest: None, None)
        started = time.perf_counter()
        snapshot_through_writer(writer, f"{round_}-0001", chunks)
        ours_up.append(time.perf_counter() - started)

        buffer[len(buffer) // 2] ^= 0xFF  # one element, in the middle
        log = RequestLog(store.client)
        started = time.perf_counter()
        result = snapshot_through_writer(writer, f"{round_}-0002", chunks)
        change = (time.perf_counter() - started, *blob_puts(log))
        assert result.bytes_written == size, result

        log.clear()
        started = time.perf_counter()
        snapshot_through_writer(writer, f"{round_}-0003", chunks)
        unchanged = (time.perf_counter() - started, log.count(), log.bytes_sent())

        started = time.perf_counter()
        plain.download(bucket, "plain/one-file", io.BytesIO()).result()
        raw_down.append(time.perf_counter() - started)

        started = time.perf_counter()
        for future in [plain.download(bucket, f"plain/chunk/{i}", io.BytesIO()) for i in range(len(chunks))]:
            future.result()
        files_down.append(time.perf_counter() - started)

        reader = S3Store(f"s3://{bucket}/ours", endpoint_url=endpoint)
        digests = reader.load_manifest("bench", f"{round_}-0003")["blobs"]
        started = time.perf_counter()
        whole = bytearray(len(buffer))
        target = memoryview(whole)
        with ThreadPoolExecutor(reader.blob_workers) as pool:
            list(pool.map(lambda i: reader.read_blob_into(digests[i], target[i * size : (i + 1) * size]),
                          range(len(digests))))
        ours_down.append(time.perf_counter() - started)
        assert whole == buffer

        started = time.perf_counter()
        for i, data in enumerate(small):
            plain.upload(io.BytesIO(data), bucket, f"plain/small/{i}").result()
        raw_small.append(time.perf_counter() - started)
        small_digests = [digest_of(data) for data in small]
        started = time.perf_counter()
        for digest, data in zip(small_digests, small):
            store.put_blob(digest, data)
        ours_small.append(time.perf_counter() - started)

        plain.shutdown()
        store.close()
        reader.close()
        empty_bucket(client, bucket)

    def line(label: str, megabytes: float, ours: list[float], raw: list[float]) -> None:
        o, p = min(ours), min(raw)
        print(f"{label:<40} ours {megabytes / o:7.1f} MB/s   s3transfer {megabytes / p:7.1f} MB/s   ratio {p / o:5.2f}x")

    print("throughput (ratio > 1: ours is faster)")
    line(f"(a) full snapshot of {mb:.0f} MB (one file)", mb, ours_up, raw_up)
    line("    the same, against its chunks as files", mb, ours_up, files_up)
    seconds, puts, sent = change
    print(f"(b) one element changed: {seconds * 1000:.0f} ms, {puts} blob PUT(s), {sent} bytes of blobs sent")
    line(f"(c) restore {mb:.0f} MB (one file)", mb, ours_down, raw_down)
    line("    the same, against its chunks as files", mb, ours_down, files_down)
    seconds, requests, sent = unchanged
    print(f"(d) unchanged snapshot: {seconds * 1000:.1f} ms, {requests} requests, {sent} bytes sent")
    line(f"(e) {small_mb:.0f} MB in 64 KiB blobs (each)", small_mb, ours_small, raw_small)


if __name__ == "__main__":
    main()

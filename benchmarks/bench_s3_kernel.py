"""bench_s3.py --kernel: a real kernel snapshotting a numpy array to S3 (moto), end to end.

A fresh bucket; the kernel holds ``mb`` of float64 and runs ``%spot snapshot``
(which returns once S3 has the snapshot), then ``a[size // 2] = -1`` and
``%spot snapshot`` again. What the change sent is counted in the bucket itself:
the objects under blobs/ that appeared, and their bytes. The baseline is
s3transfer uploading that many bytes as one file from this process, in the same
run; last, a fresh kernel restores and reads one element.
"""

from __future__ import annotations

import io
import os
import secrets
import time
from typing import Any

import boto3
from harness import Kernel, snapshot_line
from s3transfer.manager import TransferManager

from jupyter_spot.store.s3 import S3Store


def blob_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/blobs/"):
        sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return sizes


def timed(kernel: Kernel, code: str) -> tuple[float, str]:
    started = time.perf_counter()
    output = kernel.run(code)
    return time.perf_counter() - started, output


def one_element_change(endpoint: str, mb: int) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"kernel-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    env = {"JUPYTER_SPOT_STORE": f"s3://{bucket}/kernel", "AWS_ENDPOINT_URL": endpoint}
    elements = (mb << 20) // 8

    raw = TransferManager(client, S3Store(f"s3://{bucket}/raw", endpoint_url=endpoint).transfer_config)
    data = os.urandom(mb << 20)
    started = time.perf_counter()
    raw.upload(io.BytesIO(data), bucket, "raw/one-file").result()
    raw_seconds = time.perf_counter() - started
    raw.shutdown()
    del data

    with Kernel(session="bench-s3.ipynb", load=True, env=env) as kernel:
        kernel.run(f"import numpy as np\na = np.random.default_rng(1).random({elements})")
        first, output = timed(kernel, "%spot snapshot")
        snapshot_line(output)
        before = blob_objects(client, bucket, "kernel")
        kernel.run("a[a.size // 2] = -1")
        change, output = timed(kernel, "%spot snapshot")
        snapshot_line(output)
        after = blob_objects(client, bucket, "kernel")
    new = {key: size for key, size in after.items() if key not in before}

    with Kernel(session="bench-s3.ipynb", load=True, env=env) as fresh:
        restore, output = timed(fresh, "%spot restore latest")
        assert "restored snapshot" in output, output
        read, value = timed(fresh, "print(a[a.size // 2], a.size)")
        assert value.split() == ["-1.0", str(elements)], value

    print(f"(f) a kernel with a {mb} MB float64 array, %spot snapshot to S3 (moto), end to end:")
    print(f"    first snapshot {first:.2f} s ({mb / first:.1f} MB/s); s3transfer, the same bytes as one file, "
          f"{raw_seconds:.2f} s ({mb / raw_seconds:.1f} MB/s): ratio {raw_seconds / first:.2f}x")
    print(f"    after a[size // 2] = -1: {change * 1000:.0f} ms, {len(new)} new object(s) under blobs/ "
          f"({', '.join(str(size) for size in sorted(new.values(), reverse=True))} bytes)")
    print(f"    fresh kernel: %spot restore latest {restore:.2f} s, then a cell reading one element {read:.2f} s")

"""What a change costs with chunked buffers (issue 12), against baselines from the same run.

    python benchmarks/bench_chunks.py [--gb 1.0] [--rows 300000] [--rounds 4] [--dir DIR] [--skip-pandas]
                                      [--disk-mbps MB_PER_S]

The issue's namespace, in real ipykernel kernels on a local store: a ``--gb`` GiB
float64 array ``a`` plus ``--rows`` small dicts in a list. Measured:

  * first full snapshot vs the disk's write + fsync of as many bytes, and
    ``dill.dump_module`` of the same namespace. The disk is shared and its speed
    drifts, so the first snapshot is also taken ``--rounds`` times in fresh kernels
    and stores, each beside a disk write (which goes first alternates), and best
    is compared with best. Each round also takes the format before chunks
    (``chunk_size=0``), beside its own disk write, for the same comparison;
  * one element changed, then ``jupyter_spot.snapshot()`` (what ``%spot snapshot``
    runs): seconds and bytes the store grew by, manifest included; and the same
    snapshot with nothing changed, which is what re-checking every variable costs;
    and the same change with automatic snapshots on: the cell's round trip and its snapshot;
  * 1% of the array changed in one contiguous range: bytes written vs the bytes of
    the chunks the range touches;
  * ten snapshots, each after a 1% change elsewhere: the store's bytes vs one snapshot's;
  * the median pause a one-line cell gets from its automatic snapshot;
  * restore-to-usable in a fresh kernel (``%spot restore latest``, then a cell that
    reads one element and the list's length), chunked vs the same snapshot stored
    unchunked (``chunk_size=0``, i.e. the format before chunks), alternated;
  * a DataFrame of ``--gb`` GiB (10 float64 columns) gaining one column: bytes
    written vs that column's bytes.

``--disk-mbps`` runs it all on a disk limited to that many MB/s (slow_disk.py): a
ratio to the disk depends on how fast the disk is against the CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import slow_disk
from bench_snapshot import DILL_DUMP, OUR_SNAPSHOT, OUR_STATUS, Kernel, describe_rounds, first_snapshots, mb

NAMESPACE = """
import numpy as np
a = np.random.default_rng(0).random(int({gb} * 2**30 / 8))
rows = [{{"id": i, "name": f"row-{{i}}", "score": i * 0.5}} for i in range({rows})]
small = 0
"""

FRAME = """
import numpy as np, pandas as pd
n = int({gb} * 2**30 / 8 / 10)
df = pd.DataFrame({{f"c{{i}}": np.random.default_rng(i).random(n) for i in range(10)}})
"""

USE = "print(a[12345], len(rows))"


def store_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def spot_env(work: Path, store: str, key: str) -> dict[str, str]:
    return {**os.environ, "JUPYTER_SPOT_STORE": str(work / store), "JUPYTER_SPOT_SESSION": "bench",
            "JUPYTER_SPOT_SIGNING_KEY": key, "JUPYTER_DATA_DIR": str(work / "data"), "JUPYTER_SPOT_CLOUD": "none"}


def snap(kernel: Kernel) -> dict[str, Any]:
    return kernel.json(OUR_SNAPSHOT)


def changed(kernel: Kernel, root: Path, cell: str) -> dict[str, Any]:
    """Run ``cell`` (automatic snapshots off), then an explicit snapshot: its result and the store's growth."""
    kernel.run(cell)
    before = store_bytes(root)
    result = snap(kernel)
    result["store_growth"] = store_bytes(root) - before
    return result


def bench_snapshots(work: Path, gb: float, rows: int, chunk: int, key: str) -> dict[str, Any]:
    env = spot_env(work, "store", key)
    root = work / "store"
    kernel = Kernel(work, env, extra=[f"--SpotSettings.chunk_size={chunk}"])
    out: dict[str, Any] = {}
    try:
        kernel.run("%load_ext jupyter_spot")
        kernel.run("%spot off", store_history=False)
        kernel.run(NAMESPACE.format(gb=gb, rows=rows))
        out["dill"] = kernel.json(DILL_DUMP.format(path=str(work / "dill.pkl")))
        (work / "dill.pkl").unlink(missing_ok=True)
        out["full"] = snap(kernel)
        out["full_store"] = store_bytes(root)
        out["recheck"] = [snap(kernel) for _ in range(3)]
        out["one"] = [changed(kernel, root, f"a[{i * 1000}] = -1") for i in range(3)]
        n = kernel.json("print(__import__('json').dumps({'n': len(a)}))")["n"]
        span = n // 100
        start_at = n // 3 + 1  # not on a chunk edge
        out["percent"] = changed(kernel, root, f"a[{start_at}:{start_at + span}] += 1")
        first_chunk, last_chunk = start_at * 8 // chunk, ((start_at + span) * 8 - 1) // chunk
        out["percent_touched"] = (last_chunk - first_chunk + 1) * chunk
        # ten snapshots, 1% elsewhere each, in a store of their own
        base = store_bytes(root)
        for i in range(10):
            offset = (i * 9 + 5) * n // 100
            changed(kernel, root, f"a[{offset}:{offset + span}] *= 1.5")
        out["ten_growth"] = store_bytes(root) - base
        kernel.run("%spot on", store_history=False)
        kernel.run("small += 1")
        out["one_auto"] = []
        for i in range(3):
            before = store_bytes(root)
            seconds = kernel.run(f"a[{i * 1000 + 7}] = -2")[0]
            while (status := kernel.json(OUR_STATUS))["pending_blobs"]:
                time.sleep(0.01)
            out["one_auto"].append({"cell": seconds, "store_growth": store_bytes(root) - before,
                                    **status["last_snapshot"]})
        out["cell_auto"] = statistics.median(kernel.run("small += 1")[0] for _ in range(15))
        kernel.run("%spot off", store_history=False)
        out["cell_off"] = statistics.median(kernel.run("small += 1")[0] for _ in range(15))
    finally:
        kernel.close()
    return out


def bench_restore(work: Path, gb: float, rows: int, chunk: int, key: str, rounds: int) -> dict[str, list[float]]:
    """The same namespace snapshotted chunked and unchunked; fresh kernels restore each, alternately."""
    for store, size in (("r-chunked", chunk), ("r-whole", 0)):
        kernel = Kernel(work, spot_env(work, store, key), extra=[f"--SpotSettings.chunk_size={size}"])
        try:
            kernel.run("%load_ext jupyter_spot")
            kernel.run("%spot off", store_history=False)
            kernel.run(NAMESPACE.format(gb=gb, rows=rows))
            snap(kernel)
        finally:
            kernel.close()
    times: dict[str, list[float]] = {"r-chunked": [], "r-whole": [], "r-chunked-use": [], "r-whole-use": []}
    for _ in range(rounds):
        for store in ("r-chunked", "r-whole"):
            kernel = Kernel(work, spot_env(work, store, key))
            try:
                kernel.run("%load_ext jupyter_spot")
                seconds, text = kernel.run("%spot restore latest")
                assert "restored snapshot" in text, text
                times[store].append(seconds)
                times[store + "-use"].append(kernel.run(USE)[0])
            finally:
                kernel.close()
    return times


def bench_frame(work: Path, gb: float, chunk: int, key: str) -> dict[str, Any]:
    root = work / "frame-store"
    kernel = Kernel(work, spot_env(work, "frame-store", key), extra=[f"--SpotSettings.chunk_size={chunk}"])
    try:
        kernel.run("%load_ext jupyter_spot")
        kernel.run("%spot off", store_history=False)
        kernel.run(FRAME.format(gb=gb))
        first = snap(kernel)
        result = changed(kernel, root, "df['extra'] = np.arange(n, dtype=np.float64)")
        column = kernel.json("print(__import__('json').dumps({'b': int(df['extra'].nbytes)}))")["b"]
    finally:
        kernel.close()
    return {"first": first, "added": result, "column": column}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of the array (and of the frame)")
    parser.add_argument("--rows", type=int, default=300_000, help="small dicts in the list")
    parser.add_argument("--chunk", type=int, default=4 << 20, help="chunk size (bytes)")
    parser.add_argument("--restore-rounds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="first snapshots (each beside a disk write; the order alternates) to take")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    parser.add_argument("--skip-pandas", action="store_true")
    slow_disk.add_option(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spot-chunks-", dir=args.dir))
    key = "bench-" + uuid.uuid4().hex
    try:
        with slow_disk.option_applied(parser, args, work):
            ours = bench_snapshots(work, args.gb, args.rows, args.chunk, key)
            shutil.rmtree(work / "store")
            chunked, whole = first_snapshots(work, NAMESPACE.format(gb=args.gb, rows=args.rows), args.rounds,
                                             [[f"--SpotSettings.chunk_size={args.chunk}"], ["--SpotSettings.chunk_size=0"]])
            ours["full"]["seconds"] = min(ours["full"]["seconds"], *(seconds for seconds, _ in chunked))
            ours["rounds"], ours["rounds_whole"] = chunked, whole
            disk = min(seconds for _, seconds in chunked + whole)
            restore = bench_restore(work, args.gb, args.rows, args.chunk, key, args.restore_rounds)
            shutil.rmtree(work / "r-chunked"), shutil.rmtree(work / "r-whole")
            frame = None if args.skip_pandas else bench_frame(work, args.gb, args.chunk, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, ours, disk, restore, frame)


def report(args: Any, ours: dict[str, Any], disk: float, restore: dict[str, list[float]], frame: Any) -> None:
    full, dill = ours["full"], ours["dill"]
    med = statistics.median
    one = ours["one"]
    recheck = ours["recheck"]
    print(f"\nnamespace: {args.gb:g} GiB float64 array + {args.rows:,} small dicts; chunks of {mb(args.chunk)}; "
          f"Python {sys.version.split()[0]}")
    slow_disk.print_limit(args)
    print(f"{'':56}{'seconds':>10}{'written':>14}")
    print(f"{'dill.dump_module + fsync':56}{dill['seconds']:>10.3f}{mb(dill['bytes']):>14}")
    print(f"{'first full snapshot (durable), best':56}{full['seconds']:>10.3f}{mb(full['bytes_written']):>14}")
    print(f"{'disk: write + fsync of as many bytes, best':56}{disk:>10.3f}{mb(full['bytes_written']):>14}")
    print("  " + describe_rounds(ours["rounds"], "first snapshot", "disk"))
    whole = min(seconds for seconds, _ in ours["rounds_whole"])
    print(f"{'first full snapshot, format before chunks, best':56}{whole:>10.3f}{'':>14}  (chunk_size=0, "
          "in the same rounds)")
    print("  " + describe_rounds(ours["rounds_whole"], "unchunked", "disk"))
    print(f"{'one element changed, then %spot snapshot (median of 3)':56}{med(r['seconds'] for r in one):>10.3f}"
          f"{mb(med(r['store_growth'] for r in one)):>14}  (store growth, manifest included)")
    auto = ours["one_auto"]
    print(f"{'one element changed, automatic snapshot: cell round trip':56}{med(r['cell'] for r in auto):>10.3f}"
          f"{mb(med(r['store_growth'] for r in auto)):>14}  (its snapshot until durable: "
          f"{med(r['seconds'] for r in auto):.3f} s)")
    print(f"{'  nothing changed, %spot snapshot (median of 3)':56}{med(r['seconds'] for r in recheck):>10.3f}"
          f"{mb(med(r['bytes_written'] for r in recheck)):>14}")
    pct = ours["percent"]
    print(f"{'1% contiguous change, then %spot snapshot':56}{pct['seconds']:>10.3f}{mb(pct['store_growth']):>14}"
          f"  (chunks touched: {mb(ours['percent_touched'])})")
    print(f"{'ten snapshots, 1% changed before each: store growth':56}{'':>10}{mb(ours['ten_growth']):>14}")
    print(f"{'one-line cell, automatic snapshots off (median of 15)':56}{ours['cell_off']:>10.4f}")
    print(f"{'one-line cell, automatic snapshots on (median of 15)':56}{ours['cell_auto']:>10.4f}")
    for store, label in (("r-whole", "unchunked"), ("r-chunked", "chunked")):
        print(f"{'restore latest, fresh kernel, ' + label + ' (median)':56}{med(restore[store]):>10.3f}"
              f"   all: {', '.join(f'{s:.2f}' for s in restore[store])}")
        print(f"{'  then a cell reading a[12345] and len(rows) (median)':56}{med(restore[store + '-use']):>10.3f}"
              f"   all: {', '.join(f'{s:.2f}' for s in restore[store + '-use'])}")
    if frame:
        print(f"{'DataFrame first snapshot':56}{frame['first']['seconds']:>10.3f}"
              f"{mb(frame['first']['bytes_written']):>14}")
        print(f"{'DataFrame gains one column, then %spot snapshot':56}{frame['added']['seconds']:>10.3f}"
              f"{mb(frame['added']['store_growth']):>14}  (the column: {mb(frame['column'])})")
    print("\nratios (same run, same machine):")
    print(f"  one-element change: {med(r['store_growth'] for r in one) / full['bytes_written']:.4f} of the first "
          f"snapshot's bytes, {full['seconds'] / med(r['seconds'] for r in one):.1f}x faster than it")
    print(f"  1% change wrote {pct['store_growth'] / ours['percent_touched']:.2f}x the chunks it touched")
    print(f"  ten 1% snapshots: store = {(full['bytes_written'] + ours['ten_growth']) / full['bytes_written']:.2f}x "
          "one snapshot's bytes")
    print(f"  first snapshot: {disk / full['seconds']:.2f} of the disk's write+fsync bandwidth; "
          f"{dill['seconds'] / full['seconds']:.2f}x faster than dill.dump_module; the format before chunks: "
          f"{disk / whole:.2f}")
    restore_ratio = (med(restore["r-chunked"]) + med(restore["r-chunked-use"])) / (
        med(restore["r-whole"]) + med(restore["r-whole-use"]))
    print(f"  restore-to-usable, chunked / unchunked: {restore_ratio:.2f}")
    if frame:
        print(f"  DataFrame + one column wrote {frame['added']['store_growth'] / frame['column']:.3f}x the column")


if __name__ == "__main__":
    main()

"""Fault campaign: real kernels on real stores, killed or failed at random points; nothing may be lost.

    python benchmarks/faults.py                    # 200 trials, seed 1 (~15 minutes on 2 cores)
    python benchmarks/faults.py --trials 20 --seed 7
    python benchmarks/faults.py --replay 123456    # re-run one trial, with its story

Each trial draws its plan from its own seed (printed with any failure): which
store (directory, moto S3, S3 behind a local cache), which fault and where
(see fault_campaign/plan.py), and what is mixed in — a second kernel on the
session, cells run by the new kernel before it restores, a damaged manifest or
blob, S3 answering 503 SlowDown / 500 InternalError. fault_campaign/checks.py
says what "nothing lost" means. Prints a table; exits 1 on any loss.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_campaign.checks import CHECKS, run_trial  # noqa: E402
from fault_campaign.plan import FAULTS, trial_seed  # noqa: E402
from fault_campaign.stores import Campaign  # noqa: E402
from fault_campaign.trial import TrialResult  # noqa: E402


def table(results: list[TrialResult]) -> str:
    """Per fault: trials, on which stores, with what mixed in, how often it fired, and the outcome."""
    rows = [("fault", "trials", "fs/s3/tiered", "fired", "mixed in", "passed", "failed checks")]
    for fault in FAULTS:
        mine = [r for r in results if r.plan.fault == fault]
        if not mine:
            continue
        stores = collections.Counter(r.plan.store for r in mine)
        mixed = collections.Counter()
        for r in mine:
            mixed["2k"] += r.plan.two_kernels
            mixed["pre"] += bool(r.plan.cells_before_restore)
            mixed["dmg"] += r.plan.damage is not None
            mixed["5xx"] += r.plan.s3_error_rate > 0
        failed = collections.Counter(check for r in mine for check in {c for c, _ in r.failures})
        errors = sum(r.error is not None for r in mine)
        rows.append((
            fault,
            str(len(mine)),
            f"{stores['fs']}/{stores['s3']}/{stores['tiered']}",
            str(sum(r.fired for r in mine)),
            " ".join(f"{key} {value}" for key, value in mixed.items() if value),
            str(sum(r.ok for r in mine)),
            ", ".join(f"{name} {count}" for name, count in failed.most_common())
            + (f"{', ' if failed else ''}harness error {errors}" if errors else ""),
        ))
    total_failed = collections.Counter(check for r in results for check in {c for c, _ in r.failures})
    rows.append(("all", str(len(results)), "", str(sum(r.fired for r in results)), "",
                 str(sum(r.ok for r in results)), ", ".join(f"{n} {c}" for n, c in total_failed.most_common())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    legend = ("mixed in: 2k = two kernels on the session, pre = the new kernel ran cells before restoring, "
              "dmg = a manifest or blob flipped/truncated/deleted, 5xx = S3 answered 503 SlowDown / 500 "
              "InternalError to 3-6% of requests")
    by_check = "  ".join(f"{name}: {total_failed.get(name, 0)}" for name in CHECKS)
    return "\n".join(lines) + "\n" + legend + "\nfailed trials by check: " + by_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="campaign seed: picks every trial's own seed")
    parser.add_argument("--replay", type=int, default=None, metavar="SEED", help="run the one trial with this seed")
    parser.add_argument("--no-s3", action="store_true", help="directory store only (no moto)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    seeds = [args.replay] if args.replay is not None else [trial_seed(args.seed, i) for i in range(args.trials)]
    campaign = Campaign(with_s3=not args.no_s3)
    started = time.perf_counter()
    results: list[TrialResult] = []
    try:
        for index, seed in enumerate(seeds, 1):
            result = run_trial(campaign, seed, verbose=args.verbose or args.replay is not None)
            results.append(result)
            if not args.verbose and args.replay is None:
                mark = "." if result.ok else ("E" if result.error else "F")
                print(mark, end="" if index % 50 else f" {index}\n", flush=True)
    finally:
        campaign.close()
    print()
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.plan.describe()}")
        for check, text in r.failures:
            print(f"    {check}: {text}")
        if r.error:
            print(f"    harness error: {r.error}")
        print("    what happened: " + " | ".join(r.events))
        print(f"    replay: python benchmarks/faults.py --replay {r.plan.seed}")
    print(table(results))
    injected = campaign.proxy.injected if campaign.proxy is not None else {}
    if injected:
        print("S3 error answers injected: " + ", ".join(f"{k} x{v}" for k, v in sorted(injected.items())))
    print(f"{len(results)} trials in {time.perf_counter() - started:.0f}s; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

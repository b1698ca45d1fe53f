"""One trial's plan, drawn from its seed alone, so ``--replay SEED`` repeats it."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Where the fault hits (issue 9 §4's list).
FAULTS = (
    "auto-snapshot",  # SIGKILL at a random moment of a cell and its automatic snapshot
    "explicit-snapshot",  # automatic snapshots off; SIGKILL / a fault point during `%spot snapshot`
    "blob-write",  # $JUPYTER_SPOT_FAULTS blob-write=kill|raise@N
    "manifest-commit",  # manifest-commit=kill|raise@N
    "replicate",  # tiered store: replicate=kill|raise@N (blobs in S3, manifest not yet)
    "gc",  # a collector process (killed at gc-delete@N, or not) while the kernel writes
    "restore",  # the restoring kernel is killed (or fails) after loading the manifest
    "notice-flush",  # an interruption notice during a long cell; SIGKILL before, during or after its flush
)
STORES = ("fs", "s3", "tiered")


@dataclass(frozen=True)
class Plan:
    seed: int
    fault: str
    store: str
    #: kill | raise (fault points), sigkill (at a random moment), complete / fresh-kernel (notice), …
    action: str
    hit: int  # which occurrence of the fault point fires
    cells: int  # state cells the first victim runs
    blob_size: int
    kill_fraction: float  # when a random SIGKILL lands, as a fraction of the cell's usual time
    two_kernels: bool  # a second kernel writes the same session at the same time
    cells_before_restore: int  # the restoring kernel runs cells of its own first
    damage: tuple[str, str] | None  # ("manifest" | "blob", "flip" | "truncate" | "delete")
    damage_newest: bool  # damage the newest snapshot (else a random one)
    s3_error_rate: float  # share of S3 requests answered 503 SlowDown / 500 InternalError
    gc_keep: int
    #: snapshots with more than 100 kB of new data are written in the background (the
    #: cell returns first), as those above ``SpotSettings.background_threshold`` (8 MB) are
    background: bool

    def describe(self) -> str:
        extras = [f"{self.cells} cells", f"blob {self.blob_size // 1000} kB"]
        if self.two_kernels:
            extras.append("two kernels")
        if self.cells_before_restore:
            extras.append(f"{self.cells_before_restore} cell(s) before restore")
        if self.damage:
            extras.append(f"{self.damage[1]} {'newest ' if self.damage_newest else ''}{self.damage[0]}")
        if self.background:
            extras.append("background writes")
        if self.s3_error_rate:
            extras.append(f"S3 errors {self.s3_error_rate:.0%}")
        if self.fault == "gc":
            extras.append(f"gc keep {self.gc_keep}")
        return f"seed {self.seed}: {self.fault} {self.action}@{self.hit} on {self.store}; " + ", ".join(extras)


ACTIONS = {
    "auto-snapshot": ("sigkill",),
    "explicit-snapshot": ("sigkill", "kill-blob", "kill-commit"),
    "blob-write": ("kill", "raise"),
    "manifest-commit": ("kill", "raise"),
    "replicate": ("kill", "raise"),
    "gc": ("kill", "complete", "complete", "slow"),
    "restore": ("kill", "raise"),
    "notice-flush": ("complete", "kill", "sigkill", "fresh-kernel"),
}


def trial_seed(campaign_seed: int, index: int) -> int:
    return random.Random(f"campaign-{campaign_seed}-{index}").randrange(1, 10**9)


def make_plan(seed: int, with_s3: bool = True) -> Plan:
    rng = random.Random(seed)
    fault = FAULTS[rng.randrange(len(FAULTS))]
    stores = STORES if with_s3 else ("fs",)
    store = "tiered" if fault == "replicate" else rng.choice(stores)
    if fault == "replicate" and not with_s3:
        fault, store = "blob-write", "fs"
    action = rng.choice(ACTIONS[fault])
    cells = rng.randint(3 if fault == "gc" else 2, 5)
    hit = rng.randint(1, cells * (3 if fault == "blob-write" else 1))
    blob_size = rng.choice((20_000, 20_000, 300_000, 1_500_000))
    damage = None
    if fault not in ("gc",) and rng.random() < 0.3:
        damage = (rng.choice(("manifest", "blob")), rng.choice(("flip", "truncate", "delete")))
    remote = store in ("s3", "tiered")
    return Plan(
        seed=seed,
        fault=fault,
        store=store,
        action=action,
        hit=hit,
        cells=cells,
        blob_size=blob_size,
        kill_fraction=rng.random() * 1.2,
        two_kernels=rng.random() < 0.2,
        cells_before_restore=rng.choice((0, 0, 0, 1, 2)),
        damage=damage,
        damage_newest=rng.random() < 0.6,
        s3_error_rate=rng.choice((0.0, 0.0, 0.03, 0.06)) if remote else 0.0,
        background=rng.random() < 0.3,
        gc_keep=rng.choice((1, 1, 2)),
    )

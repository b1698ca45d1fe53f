"""kill -9 in the middle of a large ``%spot snapshot``: restore must load the last
snapshot that was committed, whole — never a torn one, never a missing blob.

Each generation g writes ~75 MB of new array data whose contents encode g, next to
a small marker. Trial t: the kernel (itself restored by trial t-1) makes generation
t, starts ``%spot snapshot``, and is SIGKILLed after a seeded random delay spread
over the length of a snapshot. A fresh kernel then restores and must find exactly
the generation of the store's newest committed manifest: t if the commit beat the
kill, otherwise the previous committed one. Every fourth trial the kernel kills
itself at a named fault point instead (right before the manifest commit, or after
its second blob), so both outcomes occur whatever the machine's speed.
"""

from __future__ import annotations

import pytest

import random
import time
from contextlib import ExitStack
from pathlib import Path

from harness import Kernel, until

from jupyter_spot.store import collect_garbage, open_store

SESSION = "crash-safety"
TRIALS = 20
SEED = 20261129
#: Trials whose kill comes from inside the kernel at an exact step: the commit cannot win those.
FAULT_TRIALS = {1: "manifest-commit=kill", 2: "blob-write=kill@2"}

#: One generation: 50 MB + 25 MB of arrays whose values say which generation made them.
MAKE_GENERATION = """
gen = {gen}
block = np.full(6_250_000, float(gen))
ramp = np.arange(3_125_000, dtype=np.float64) + gen
marker = {{"gen": gen, "arrays": ["block", "ramp"]}}
"""

#: The generation each variable belongs to (-1: an array mixing generations).
READ_GENERATION = """
print(gen, marker["gen"],
      int(block[0]) if (block == block[0]).all() else -1,
      int(ramp[0]) if (ramp - np.arange(ramp.size) == ramp[0]).all() else -1)
"""

pytestmark = [pytest.mark.faults]


def prepare(kernel: Kernel) -> Kernel:
    """Load the extension and turn per-cell snapshots off: only %spot snapshot writes."""
    assert kernel.execute("%load_ext jupyter_spot", store_history=False).error is None
    kernel.spot("off")
    return kernel


def generations_in(kernel: Kernel) -> list[int]:
    """gen, marker, block and ramp generations as the kernel sees them."""
    result = kernel.execute(READ_GENERATION, store_history=False)
    assert result.error is None, result.error
    return [int(v) for v in result.text.split()]


def test_kill_during_snapshot_always_restores_last_commit(spot_env: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    store = open_store(str(spot_env))
    committed = 0
    outcomes = {"kill won": 0, "commit won": 0}
    with ExitStack() as kernels:

        def boot() -> Kernel:
            """The next trial's kernel starts while this one works."""
            return kernels.enter_context(Kernel(tmp_path, SESSION))

        kernel, booting = prepare(boot()), boot()
        assert kernel.execute("import numpy as np\n" + MAKE_GENERATION.format(gen=0)).error is None
        began = time.perf_counter()
        kernel.spot("snapshot")
        window = (time.perf_counter() - began) * 2  # kills land before, during and after the commit
        for trial in range(1, TRIALS + 1):
            assert kernel.execute(MAKE_GENERATION.format(gen=trial)).error is None
            fault = FAULT_TRIALS.get(trial % 4)
            if fault:
                kernel.execute(f"import os\nos.environ['JUPYTER_SPOT_FAULTS'] = {fault!r}", store_history=False)
            kernel.kc.execute("%spot snapshot", store_history=False)
            if fault:
                process = kernel.km.provisioner.process  # type: ignore[union-attr]
                until(lambda: process.poll() is not None, 120, f"the kernel to kill itself at {fault}")
            else:
                time.sleep(rng.uniform(0, window))
            kernel.kill()

            latest, problems = store.latest_manifest(SESSION)
            assert latest is not None and not problems, problems
            kernel = prepare(booting)
            if trial < TRIALS:
                booting = boot()
            report = kernel.spot("restore latest")
            assert latest["id"] in report, f"trial {trial}: restored something else than {latest['id']}:\n{report}"
            gen, marker, block, ramp = generations_in(kernel)
            assert gen == marker == block == ramp, f"trial {trial}: torn state {gen, marker, block, ramp}"
            assert gen in (committed, trial), f"trial {trial}: restored generation {gen}, last committed {committed}"
            assert not (fault and gen == trial), f"trial {trial}: killed at {fault}, yet generation {gen} was committed"
            outcomes["commit won" if gen == trial else "kill won"] += 1
            committed = gen
    print(f"crash safety over {TRIALS} kills (window {window:.2f}s): {outcomes}")
    assert outcomes["kill won"] >= len([t for t in range(1, TRIALS + 1) if t % 4 in FAULT_TRIALS])

    # What the kills left half-written goes with the next collection; the last commit stays whole.
    report = collect_garbage(store, keep=1, grace_seconds=0)
    assert not list(spot_env.rglob(".*.tmp")), report
    latest, problems = store.latest_manifest(SESSION)
    assert latest is not None and not problems, problems
    for digest in latest["blobs"]:
        store.get_blob(digest)  # verified against its address

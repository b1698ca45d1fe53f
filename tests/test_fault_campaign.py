"""A seeded subset of the fault campaign (benchmarks/faults.py): about 20 trials, each its own test.

Each trial is a real kernel on a real store (directory, moto S3, S3 behind a
local cache) killed or failed at a random point; the checks are issue 9's
"nothing lost" promises (benchmarks/fault_campaign/checks.py). A failure names
its seed: ``python benchmarks/faults.py --replay SEED`` re-runs it with its story.

Run alone with ``-m faults``; leave it out with ``-m "not faults"``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fault_campaign.checks import run_trial  # noqa: E402
from fault_campaign.plan import FAULTS, make_plan, trial_seed  # noqa: E402
from fault_campaign.stores import Campaign  # noqa: E402

pytestmark = pytest.mark.faults

CAMPAIGN_SEED = 1
PER_FAULT = 2
TRIALS = 20
#: Trials of the campaign kept in the subset for what they reproduce: a collector on a
#: directory store deletes a blob the kernel believes stored, and the next commit names it.
ALSO = [327349022]


def subset() -> list[int]:
    """The campaign's first trials of each fault on different stores (so every fault point and
    store is hit), then the campaign's next trials."""
    chosen: list[int] = []
    pairs: set[tuple[str, str]] = set()
    per_fault: dict[str, int] = {}
    index = 0
    while len(chosen) < len(FAULTS) * PER_FAULT and index < 2000:
        seed = trial_seed(CAMPAIGN_SEED, index)
        plan = make_plan(seed)
        new_store = (plan.fault, plan.store) not in pairs or plan.fault == "replicate"  # tiered only
        if per_fault.get(plan.fault, 0) < PER_FAULT and new_store:
            per_fault[plan.fault] = per_fault.get(plan.fault, 0) + 1
            pairs.add((plan.fault, plan.store))
            chosen.append(seed)
        index += 1
    chosen += [seed for seed in ALSO if seed not in chosen]
    index = 0
    while len(chosen) < TRIALS:
        seed = trial_seed(CAMPAIGN_SEED, index)
        if seed not in chosen:
            chosen.append(seed)
        index += 1
    return chosen


@pytest.fixture(scope="module")
def campaign() -> Iterator[Campaign]:
    """One moto server, error proxy and kernel pool for every trial, as the full campaign has."""
    shared = Campaign()
    yield shared
    shared.close()


@pytest.mark.parametrize("seed", subset())
def test_nothing_lost(campaign: Campaign, seed: int) -> None:
    result = run_trial(campaign, seed)
    story = "\n".join(f"  {event}" for event in result.events)
    problems = "\n".join(f"  {check}: {text}" for check, text in result.failures)
    assert result.error is None, f"{result.plan.describe()}\nthe trial itself failed: {result.error}\n{story}"
    assert result.ok, (
        f"{result.plan.describe()}\n{problems}\nwhat happened:\n{story}\n"
        f"replay: python benchmarks/faults.py --replay {seed}"
    )

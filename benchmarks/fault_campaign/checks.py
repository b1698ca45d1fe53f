"""After the fault: restore in a new kernel and hold the store and the restore to issue 9's promises.

* every committed manifest loads (unless the trial damaged it);
* GC never removed a blob a committed manifest names (nor did a commit name one it lacks);
* every snapshot a victim confirmed durable is still there, or a newer one of its line is;
* ``%spot restore latest`` returns the newest usable state of the interrupted lines —
  or says, naming it, why it chose another one;
* no silent fallback: every newer snapshot of those lines it passed over is named in its report;
* every interrupted line is still restorable, with the values its cells computed.
"""

from __future__ import annotations

import ast
import re
import time

from .kernel import CellTimeout, KernelDied, TrialKernel
from .states import PROBE, fingerprint, state_of
from .stores import Snapshot, read_session
from .trial import CELL_TIMEOUT, RESTORE_TIMEOUT, Trial, TrialResult, confirm

_RESTORED = re.compile(r"restored snapshot (\S+) ")

SILENT_ROLLBACK = "silent rollback"
ROLLBACK = "older state restored"
SILENT_FALLBACK = "silent fallback"
UNREADABLE = "unreadable committed snapshot"
MISSING_BLOB = "manifest names a missing blob"
LOST_CONFIRMED = "confirmed snapshot lost"
LINE_LOST = "interrupted line not restorable"
WRONG_VALUES = "wrong values restored"
BLOCKED = "blocked"
CHECKS = (SILENT_ROLLBACK, ROLLBACK, SILENT_FALLBACK, UNREADABLE, MISSING_BLOB, LOST_CONFIRMED, LINE_LOST, WRONG_VALUES,
          BLOCKED)


def _probe(kernel: TrialKernel, line: str) -> dict:
    """The probe's line of the cell's output (a warning on stderr may come with it)."""
    text = kernel.run(PROBE.format(line=line), timeout=CELL_TIMEOUT).text
    found = [row for row in text.splitlines() if row.startswith("PROBE ")]
    if not found:
        raise RuntimeError(f"the probe printed no result: {text[-300:]!r}")
    return ast.literal_eval(found[0].removeprefix("PROBE "))


def _state(snapshot: Snapshot) -> tuple[str, int] | None:
    return None if snapshot.manifest is None else state_of(snapshot.manifest.get("variables", {}))


def restore_phase(trial: Trial, result: TrialResult) -> None:
    plan, kernels, ledger = trial.plan, trial.kernels, trial.ledger
    if trial.campaign.proxy is not None:  # a little S3 trouble while restoring too
        trial.campaign.proxy.configure(plan.s3_error_rate / 4, plan.seed + 1)
    if "Q" in kernels:  # a restore killed after it loaded the manifest, before the namespace
        queued = kernels["Q"]
        queued.run("%load_ext jupyter_spot", timeout=CELL_TIMEOUT)
        try:
            queued.run("%spot restore latest", timeout=RESTORE_TIMEOUT)
            trial.log("kernel Q's restore was not killed (nothing to restore?)")
        except KernelDied:
            ledger.fired = True
            trial.log("kernel Q killed in the middle of its restore")
    kernel = kernels["R"]
    kernel.run("%load_ext jupyter_spot", timeout=CELL_TIMEOUT)
    for i in range(plan.cells_before_restore):
        kernel.run(f"other{i} = {i}", timeout=CELL_TIMEOUT)
        confirm(kernel, "R", 0, ledger)
    kernel.run("%spot off", timeout=CELL_TIMEOUT)  # the checks' own cells are not snapshots
    snapshots = read_session(trial.store, trial.session)
    cell = kernel.run("%spot restore latest", timeout=RESTORE_TIMEOUT)
    if plan.fault == "restore" and plan.action == "raise":
        if "injected fault" in cell.text:
            ledger.fired = True
            trial.log(f"first restore failed visibly: {cell.error}")
        cell = kernel.run("%spot restore latest", timeout=RESTORE_TIMEOUT)
    report = cell.text
    trial.log(f"restore latest: {report.strip()[:160]!r}")
    check(trial, result, kernel, snapshots, report)


def check(trial: Trial, result: TrialResult, kernel: TrialKernel, snapshots: dict[str, Snapshot], report: str) -> None:
    fail = lambda check, text: result.failures.append((check, text))  # noqa: E731
    store, ledger = trial.store, trial.ledger
    interrupted = {"A", "B"}
    damaged_blobs = store.damaged_blobs

    def damaged_by_trial(snapshot: Snapshot | None, snapshot_id: str) -> bool:
        if snapshot_id in store.damaged_manifests:
            return True
        return snapshot is not None and snapshot.manifest is not None and bool(
            damaged_blobs & set(snapshot.manifest.get("blobs", [])))

    for blocked in ledger.blocked:
        fail(BLOCKED, blocked)
    # every committed manifest loads; every blob it names is there
    for snapshot in snapshots.values():
        if snapshot.manifest is None and snapshot.id not in store.damaged_manifests:
            fail(UNREADABLE, f"{snapshot.id}: {snapshot.problem}")
        elif snapshot.missing_blobs and not set(snapshot.missing_blobs) <= damaged_blobs:
            state = _state(snapshot)
            fail(MISSING_BLOB, f"{snapshot.id} (state {state}) names blob(s) no tier has intact: "
                               f"{', '.join(d[:12] for d in snapshot.missing_blobs if d not in damaged_blobs)}")
    if "s3" in store.tiers() and store.kind == "tiered":
        s3 = store.tiers()["s3"]
        for snapshot_id in s3.list_snapshots(trial.session):
            try:
                manifest = s3.load_manifest(trial.session, snapshot_id)
            except Exception:
                continue
            lacking = [d for d in manifest.get("blobs", []) if d not in damaged_blobs and not s3.has_blob(d)]
            if lacking:
                fail(MISSING_BLOB, f"S3 holds manifest {snapshot_id} but not its blob(s) "
                                   f"{', '.join(d[:12] for d in lacking)}")

    # a tiered store's notice flush said these reached S3: the machine's cache may be gone, S3 alone restores them
    for snapshot_id in sorted(ledger.in_s3 - store.damaged_manifests):
        s3 = store.tiers()["s3"]
        try:
            manifest = s3.load_manifest(trial.session, snapshot_id)
            lacking = [d for d in manifest.get("blobs", []) if d not in damaged_blobs and not s3.has_blob(d)]
        except Exception as error:
            lacking = [f"its manifest ({error})"]
        if lacking:
            fail(LOST_CONFIRMED, f"the notice flush said {snapshot_id} was in S3; S3 lacks {', '.join(lacking)[:200]}")

    # newest usable state of each interrupted line
    newest: dict[str, tuple[str, int]] = {}
    for snapshot in snapshots.values():
        state = _state(snapshot)
        if snapshot.usable and state is not None and state[0] in interrupted:
            newest[state[0]] = (snapshot.id, state[1])  # ids sort by time: the last one wins
    lost: dict[str, tuple[str, int]] = {}  # per line, the newest confirmed state that is gone
    for snapshot_id, (line, k) in sorted(ledger.confirmed.items()):
        if line not in interrupted or damaged_by_trial(snapshots.get(snapshot_id), snapshot_id):
            continue
        have = newest.get(line)
        if (have is None or have[1] < k) and k >= lost.get(line, ("", 0))[1]:
            lost[line] = (snapshot_id, k)
    for line, (snapshot_id, k) in sorted(lost.items()):
        fail(LOST_CONFIRMED, f"{snapshot_id} (line {line}, cell {k}) was confirmed durable; "
                             f"newest usable of line {line} now: {newest.get(line)}")
    expected = max(((sid, line, k) for line, (sid, k) in newest.items()), default=None)

    # what `%spot restore latest` did
    match = _RESTORED.search(report)
    restored_id = match.group(1) if match else None
    result.restored = restored_id or "(nothing)"
    restored = snapshots.get(restored_id) if restored_id else None
    restored_state = _state(restored) if restored is not None else None
    if expected is not None:
        exp_id, exp_line, exp_k = expected
        if restored_id is None:
            fail(LINE_LOST, f"restore latest failed though {exp_id} (line {exp_line}, cell {exp_k}) is usable: "
                            f"{report.strip()[-300:]}")
        elif restored_id != exp_id:
            what = (f"restore latest loaded {restored_id} (state {restored_state}) instead of {exp_id} "
                    f"(line {exp_line}, cell {exp_k}), the newest usable committed state")
            exp_line_id = (snapshots[exp_id].manifest or {}).get("line")
            if exp_id not in report and not (isinstance(exp_line_id, str) and f"line {exp_line_id}" in report):
                fail(SILENT_ROLLBACK, what + ", without naming it or its line")
            elif restored_state is not None and restored_state[0] == exp_line:
                fail(ROLLBACK, what + f" (it said: {report.strip()[:200]!r})")
    # no silent fallback: newer snapshots of interrupted lines it passed over are named in the report,
    # by id or by their line (restore names another interrupted line it did not load, with its newest id)
    if restored_id is not None:
        for snapshot in snapshots.values():
            state = _state(snapshot)
            line_id = (snapshot.manifest or {}).get("line")
            named = snapshot.id in report or (isinstance(line_id, str) and f"line {line_id}" in report)
            if snapshot.id > restored_id and not snapshot.usable and (state is None or state[0] in interrupted) \
                    and not named:
                fail(SILENT_FALLBACK, f"restore passed over {snapshot.id} ({snapshot.problem}) without a word")
    # the values are those the state's cells computed
    checked: set[str] = set()
    if restored_state is not None:
        line, k = restored_state
        got, want = _probe(kernel, line), fingerprint(line, k, trial.plan.blob_size)
        checked.add(line)
        if got != want:
            fail(WRONG_VALUES, f"after restoring {restored_id} (line {line}, cell {k}): "
                               + ", ".join(f"{key}: {got.get(key)!r} != {want[key]!r}" for key in want
                                           if got.get(key) != want[key])[:400])
    # every interrupted line is still restorable
    for line, (snapshot_id, k) in sorted(newest.items()):
        if restored_state == (line, k) and restored_id == snapshot_id:
            continue
        cell = kernel.run(f"%spot restore {snapshot_id}", timeout=RESTORE_TIMEOUT)
        again = _RESTORED.search(cell.text)
        if again is None or again.group(1) != snapshot_id:
            fail(LINE_LOST, f"line {line}'s newest snapshot {snapshot_id} did not restore: {cell.text.strip()[-300:]}")
            continue
        got, want = _probe(kernel, line), fingerprint(line, k, trial.plan.blob_size)
        if got != want:
            fail(WRONG_VALUES, f"after restoring {snapshot_id} (line {line}, cell {k}): values differ")


def run_trial(campaign, seed: int, verbose: bool = False) -> TrialResult:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    trial = Trial(campaign, seed, verbose)
    result = TrialResult(trial.plan)
    if verbose:
        print(trial.plan.describe(), flush=True)
    try:
        if campaign.proxy is not None:
            campaign.proxy.configure(trial.plan.s3_error_rate, seed)
        trial.start()
        trial.run_victims()
        if campaign.proxy is not None:
            campaign.proxy.configure(0.0, seed)
        trial.damage()
        restore_phase(trial, result)
    except (KernelDied, CellTimeout) as error:
        result.failures.append((BLOCKED if isinstance(error, CellTimeout) else LINE_LOST, f"during the checks: {error}"))
    except Exception as error:  # the harness, not jupyter-spot: reported apart
        import traceback

        result.error = f"{type(error).__name__}: {error}"
        if verbose:
            traceback.print_exc()
    finally:
        trial.close()
        if campaign.proxy is not None:
            campaign.proxy.configure(0.0, seed)
    result.events = trial.ledger.events
    result.fired = trial.ledger.fired
    result.seconds = time.perf_counter() - started
    if verbose:
        for check_name, text in result.failures:
            print(f"  FAIL {check_name}: {text}")
        if result.error:
            print(f"  HARNESS ERROR: {result.error}")
        print(f"  restored {result.restored}; {'ok' if result.ok else 'FAILED'} in {result.seconds:.1f}s", flush=True)
    return result

"""One trial: kernels write a session, a fault strikes, the machine dies, a new kernel restores.

The trial keeps a ledger of what the victims *confirmed* durable — ``%spot
status`` after a cell, ``%spot snapshot``'s answer, a notice flush's printed
result — and which state each confirmed snapshot holds. ``checks`` then compares
the store and the restore with it.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from jupyter_spot.notice.kernel_watch import deliver_notice_to_kernel
from jupyter_spot.notice.model import Notice, deadline_in

from .kernel import CellTimeout, KernelDied, TrialKernel
from .plan import Plan, make_plan
from .states import cell_code
from .stores import Campaign, TrialStore

CELL_TIMEOUT = 20.0  # a cell whose snapshot waits longer than this is "blocked"
RESTORE_TIMEOUT = 60.0
#: GC spares blobs younger than this (15 minutes in production, scaled down to the
#: trial's pace; the trial waits this long before it starts a collector).
GC_GRACE = 1.0

_SNAPSHOT_LINE = re.compile(r"snapshot (\S+): \d+ stored, .* written in [0-9.]+s(?P<rest>.*)")


@dataclass
class Ledger:
    """What the victims confirmed, and what happened to them."""

    confirmed: dict[str, tuple[str, int]] = field(default_factory=dict)  # snapshot id → (line, k)
    events: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    fired: bool = False  # the planned fault took effect (a death, an error, a notice flush)
    in_s3: set[str] = field(default_factory=set)  # snapshots a notice flush said had reached S3

    def note(self, text: str) -> None:
        self.events.append(text)


@dataclass
class TrialResult:
    plan: Plan
    failures: list[tuple[str, str]] = field(default_factory=list)  # (check, what went wrong)
    events: list[str] = field(default_factory=list)
    fired: bool = False
    restored: str = ""
    seconds: float = 0.0
    error: str | None = None  # the harness itself failed (not a finding about jupyter-spot)

    @property
    def ok(self) -> bool:
        return not self.failures and self.error is None


def _status(kernel: TrialKernel) -> dict[str, str]:
    text = kernel.run("%spot status", timeout=CELL_TIMEOUT, store_history=False).text
    status = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            status[key.strip()] = value.strip()
    return status


def confirm(kernel: TrialKernel, line: str, k: int, ledger: Ledger) -> None:
    """Wait until nothing is pending, then record the last snapshot if it is the one committed."""
    deadline = time.monotonic() + CELL_TIMEOUT
    while True:
        status = _status(kernel)
        if status.get("pending") == "0":
            break
        if time.monotonic() > deadline:
            raise CellTimeout(f"kernel {kernel.name}: snapshot still pending after {CELL_TIMEOUT:.0f}s")
        time.sleep(0.05)
    committed = status.get("last committed", "None")
    last = status.get("last snapshot", "").split(" ")[0]
    if committed != "None" and committed == last:
        ledger.confirmed.setdefault(committed, (line, k))
    if "injected fault" in status.get("last error", ""):
        ledger.fired = True


def _confirm_output(text: str, line: str, k: int, ledger: Ledger) -> None:
    """``%spot snapshot`` or a notice flush printed its result: durable unless it says otherwise."""
    for match in _SNAPSHOT_LINE.finditer(text):
        if "still being written" not in match.group("rest"):
            ledger.confirmed.setdefault(match.group(1), (line, k))
    if "injected fault" in text:
        ledger.fired = True


def _typical(durations: list[float]) -> float:
    return sorted(durations)[len(durations) // 2] if durations else 0.3


class Trial:
    def __init__(self, campaign: Campaign, seed: int, verbose: bool = False) -> None:
        self.campaign = campaign
        self.plan = make_plan(seed, with_s3=campaign.moto is not None)
        self.rng = random.Random(seed * 7 + 1)
        self.verbose = verbose
        self.started = time.perf_counter()
        self.store = TrialStore.create(campaign, self.plan.store, seed)
        self.session = f"campaign/trial-{seed}.ipynb"
        self.ledger = Ledger()
        self.kernels: dict[str, TrialKernel] = {}
        self.gc: subprocess.Popen | None = None

    def log(self, text: str) -> None:
        self.ledger.note(text)
        if self.verbose:
            print(f"  [{time.perf_counter() - self.started:5.2f}s] {text}", flush=True)

    # -- setup --------------------------------------------------------------------------
    def kernel_env(self, name: str, faults: str = "") -> dict[str, str]:
        env = self.store.env(self.campaign, self.session, through_proxy=self.plan.s3_error_rate > 0)
        env["JUPYTER_SPOT_NOTICE_FILE"] = str(self.store.directory / f"notice-{name}.json")
        if faults:
            env["JUPYTER_SPOT_FAULTS"] = faults
        return env

    def victim_faults(self) -> str:
        plan = self.plan
        if plan.fault in ("blob-write", "manifest-commit", "replicate"):
            return f"{plan.fault}={plan.action}@{plan.hit}"
        if plan.fault == "explicit-snapshot" and plan.action != "sigkill":
            point = "blob-write" if plan.action == "kill-blob" else "manifest-commit"
            return f"{point}=kill@{plan.hit}"
        if plan.fault == "notice-flush" and plan.action == "kill":
            return "notice-flush=kill"
        return ""

    def start(self) -> None:
        plan = self.plan
        specs = [("A", self.kernel_env("A", self.victim_faults()))]
        if plan.two_kernels:
            specs.append(("B", self.kernel_env("B")))
        if plan.fault == "notice-flush" and plan.action == "fresh-kernel":
            specs.append(("F", self.kernel_env("F")))
        if plan.fault == "restore" and plan.action == "kill":
            specs.append(("Q", self.kernel_env("Q", "restore=kill")))
        specs.append(("R", self.kernel_env("R", "restore=raise" if plan.fault == "restore" and plan.action == "raise"
                                            else "")))
        config = ["SpotSettings.background_threshold = 100000"] if plan.background else []
        for name, env in specs:
            self.kernels[name] = self.campaign.pool.take(name, env, config)
        self.log(f"kernels {', '.join(name for name, _ in specs)} started")

    # -- the victims' phase ---------------------------------------------------------------
    def run_victims(self) -> None:
        plan = self.plan
        victims = [self.kernels[name] for name in ("A", "B") if name in self.kernels]
        for kernel in victims:
            kernel.run("%load_ext jupyter_spot", timeout=CELL_TIMEOUT)
            if plan.fault == "explicit-snapshot":
                kernel.run("%spot off", timeout=CELL_TIMEOUT)
        durations: dict[str, list[float]] = {kernel.name: [] for kernel in victims}
        target = min(plan.hit, plan.cells)
        # mostly after cell 2, whose `data` is an int: the list of cell 1 is then unreferenced
        # (keep 1) when it comes back in cell 3 — the kernel believes it is stored
        gc_after = 2 if plan.hit % 3 else min(plan.hit, plan.cells - 1)
        for k in range(1, plan.cells + 1):
            for kernel in victims:
                if not kernel.alive():
                    continue
                victim = kernel.name == "A"
                try:
                    if victim and plan.fault == "notice-flush" and plan.action != "fresh-kernel" and k == plan.cells:
                        self.notice_during_cell(kernel, k)
                        continue
                    code = cell_code(kernel.name, k, plan.blob_size)
                    if victim and plan.fault == "auto-snapshot" and k == target:
                        self.kill_during(kernel, code, _typical(durations["A"]), f"cell {k} and its snapshot")
                        continue
                    started = time.perf_counter()
                    kernel.run(code, timeout=CELL_TIMEOUT)
                    durations[kernel.name].append(time.perf_counter() - started)
                    if plan.fault == "explicit-snapshot":
                        if victim and plan.action == "sigkill" and k == target:
                            self.kill_during(kernel, "%spot snapshot", 0.15, f"`%spot snapshot` after cell {k}")
                            continue
                        cell = kernel.run("%spot snapshot", timeout=CELL_TIMEOUT)
                        _confirm_output(cell.text, kernel.name, k, self.ledger)
                    else:
                        confirm(kernel, kernel.name, k, self.ledger)
                except KernelDied:
                    self.ledger.fired = True
                    self.log(f"kernel {kernel.name} died in cell {k} (the injected fault)")
                except CellTimeout as error:
                    self.ledger.blocked.append(str(error))
                    self.log(f"blocked: {error}")
                    kernel.kill()
            if plan.fault == "gc" and k == gc_after and self.kernels["A"].alive():
                self.start_gc()
                if plan.action != "slow":  # between two cells; "slow" runs alongside the next ones
                    self.finish_gc()
        self.finish_gc()
        for kernel in victims:
            if kernel.alive():
                kernel.kill()
        self.log(f"victims killed; confirmed {len(self.ledger.confirmed)} snapshot(s)")
        if plan.fault == "replicate" and plan.action == "raise":
            # the replication thread retries quietly: the point was reached if that many snapshots were sent
            self.ledger.fired = plan.hit <= sum(line == "A" for line, _ in self.ledger.confirmed.values())
        if plan.fault == "notice-flush" and plan.action == "fresh-kernel":
            self.fresh_kernel_notice()

    def kill_during(self, kernel: TrialKernel, code: str, typical: float, what: str) -> None:
        cell = kernel.send(code)
        delay = self.plan.kill_fraction * typical
        try:
            kernel.wait(cell, delay, until=lambda c: c.done)
        except CellTimeout:
            pass
        kernel.kill()
        self.ledger.fired = True
        self.log(f"SIGKILL {kernel.name} {delay:.3f}s into {what} ({'after it finished' if cell.done else 'mid-way'})")

    def _deliver_notice(self, kernel: TrialKernel) -> None:
        notice = Notice(kind="interruption", action="terminate", deadline=deadline_in(30), source="campaign",
                        event_id=f"campaign-{kernel.name}-{datetime.now(timezone.utc).timestamp()}")
        deliver_notice_to_kernel(kernel.pid, notice, self.store.directory / f"notice-{kernel.name}.json")

    def notice_during_cell(self, kernel: TrialKernel, k: int) -> None:
        release = self.store.directory / "never-released"
        code = (cell_code(kernel.name, k, self.plan.blob_size) + "import time, os\nprint('cell-started', flush=True)\n"
                f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.01)\n")
        cell = kernel.send(code)
        kernel.wait(cell, CELL_TIMEOUT, until=lambda c: "cell-started" in c.text)
        self._deliver_notice(kernel)
        self.ledger.fired = True
        if self.plan.action == "kill":
            died = kernel.wait_dead(CELL_TIMEOUT)
            self.log(f"notice during cell {k}: {'killed at notice-flush' if died else 'did not die at notice-flush'}")
            return
        if self.plan.action == "sigkill":
            time.sleep(self.plan.kill_fraction * 0.3)
            kernel.kill()
            self.log(f"notice during cell {k}; SIGKILL {self.plan.kill_fraction * 0.3:.3f}s later")
            return
        # "⚠ jupyter-spot: … Saving this session now." then "⚠ jupyter-spot: <what the flush did>"
        kernel.wait(cell, CELL_TIMEOUT, until=lambda c: c.text.count("jupyter-spot:") >= 2)
        _confirm_output(cell.text, kernel.name, k, self.ledger)
        if self.store.kind == "tiered" and _SNAPSHOT_LINE.search(cell.text) and "not yet in S3" not in cell.text:
            # the flush waited for S3: the machine (and its cache) may go now
            self.ledger.in_s3.add(_SNAPSHOT_LINE.search(cell.text).group(1))
        self.log(f"notice during cell {k} flushed: {cell.text.strip().splitlines()[-1][:120]}")
        kernel.kill()

    def fresh_kernel_notice(self) -> None:
        """A new kernel in the session, that restored nothing, sees a notice and flushes."""
        kernel = self.kernels["F"]
        cell = kernel.run("%load_ext jupyter_spot", timeout=CELL_TIMEOUT)
        self._deliver_notice(kernel)
        said = lambda c: c.text + kernel.stray.text  # noqa: E731 -- idle: its output may belong to no request
        try:
            kernel.wait(cell, CELL_TIMEOUT, until=lambda c: said(c).count("jupyter-spot:") >= 2)
        except CellTimeout:
            self.ledger.blocked.append(f"a fresh kernel said nothing within {CELL_TIMEOUT:.0f}s of a notice")
        self.log(f"fresh kernel F saw a notice: {said(cell).strip()[-120:]!r}")
        kernel.kill()

    # -- GC concurrent with a writer -----------------------------------------------------
    def start_gc(self) -> None:
        time.sleep(GC_GRACE + 0.2)  # the blobs written so far age past the (scaled) grace period
        faults = {"kill": f"gc-delete=kill@{self.plan.hit}", "slow": "gc-delete=sleep:0.2@1+"}.get(self.plan.action, "")
        env = self.kernel_env("gc", faults)
        code = ("import sys\nfrom jupyter_spot.store import open_store, collect_garbage\n"
                "print(collect_garbage(open_store(sys.argv[1]), int(sys.argv[2]), grace_seconds=float(sys.argv[3])))")
        self.gc = subprocess.Popen([sys.executable, "-c", code, self.store.url, str(self.plan.gc_keep), str(GC_GRACE)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log(f"collector started (keep {self.plan.gc_keep}, faults {faults or 'none'})")

    def finish_gc(self) -> None:
        if self.gc is None or self.gc.returncode is not None:
            return
        try:
            out, _ = self.gc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.gc.kill()
            out, _ = self.gc.communicate()
            self.ledger.blocked.append("the collector did not finish in 60s")
        # the collector ran to its end, or was killed at its planned deletion
        self.ledger.fired = self.gc.returncode == (-9 if self.plan.action == "kill" else 0)
        self.log(f"collector exited {self.gc.returncode}: {out.strip()[-160:]!r}")

    # -- damage -----------------------------------------------------------------------------
    def damage(self) -> None:
        from .stores import read_session

        if self.plan.damage is None:
            return
        snapshots = [s for s in read_session(self.store, self.session).values() if s.manifest is not None]
        if not snapshots:
            self.log("nothing to damage")
            return
        target = snapshots[-1] if self.plan.damage_newest else self.rng.choice(snapshots)
        what, how = self.plan.damage
        assert target.manifest is not None
        self.log("damaged: " + self.store.damage(self.rng, what, how, self.session, target.id, target.manifest))

    def close(self) -> None:
        for kernel in self.kernels.values():
            try:
                kernel.close()
            except Exception:
                pass
        if self.gc is not None and self.gc.poll() is None:
            self.gc.kill()


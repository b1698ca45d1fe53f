"""How fast a notice is seen, and what the IMDS hop-limit fallback costs, against the simulator.

Run: ``python benchmarks/notice_latency.py``. Each number is printed with its
baseline from the same run: notice latency against the poll interval (the
expected mean is half of it), and polls after the IMDSv1 fallback against the
first poll, which pays the token timeout once.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from jupyter_spot.notice import AWSSource, AzureSource, GCPSource, NoticeSource, NoticeWatcher
from jupyter_spot.notice.simulator import Simulator

ROUNDS = 7


def notice_latency(provider: str, make: Callable[[Simulator], NoticeSource], settle: float) -> list[float]:
    """Seconds from the simulator posting the notice to the watcher's callback, per round."""
    latencies = []
    for _ in range(ROUNDS):
        with Simulator(provider, imdsv2_only=provider == "aws") as sim:
            seen: list[float] = []
            event = threading.Event()
            watcher = NoticeWatcher([make(sim)], [lambda n: (seen.append(time.monotonic()), event.set())]).start()
            time.sleep(settle)
            fired = time.monotonic()
            sim.fire()
            event.wait(10)
            latencies.append(seen[0] - fired)
            watcher.stop(0.1)
    return latencies


def main() -> None:
    interval = 0.5
    cases: list[tuple[str, Callable[[Simulator], NoticeSource], float]] = [
        ("aws", lambda s: AWSSource(s.url, interval=interval), interval * 1.3),
        ("azure", lambda s: AzureSource(s.url, interval=interval), interval * 1.3),
        ("gcp", lambda s: GCPSource(f"127.0.0.1:{s.port}", wait=10), 0.2),
    ]
    print(f"notice latency ({ROUNDS} rounds; poll interval {interval} s where the cloud is polled)")
    for provider, make, settle in cases:
        latency = notice_latency(provider, make, settle)
        median = statistics.median(latency)
        print(
            f"  {provider:6} median {median * 1000:6.0f} ms  max {max(latency) * 1000:6.0f} ms  "
            f"= {median / interval:.2f} x poll interval"
        )

    timeout = 1.0
    with Simulator("aws", hang_token_put=True) as sim:
        source = AWSSource(sim.url, timeout=timeout)
        started = time.monotonic()
        source.poll()
        first = time.monotonic() - started
        later = []
        for _ in range(30):
            started = time.monotonic()
            source.poll()
            later.append(time.monotonic() - started)
    with Simulator("aws", imdsv2_only=True) as sim:
        source = AWSSource(sim.url)
        source.poll()
        v2 = []
        for _ in range(30):
            started = time.monotonic()
            source.poll()
            v2.append(time.monotonic() - started)
    later_median = statistics.median(later)
    print(
        f"hop limit 1 (token PUT hangs, timeout {timeout:g} s): first poll {first * 1000:.0f} ms, "
        f"later polls median {later_median * 1000:.1f} ms = {later_median / first:.4f} x the first"
    )
    print(
        f"IMDSv2 poll (3 GETs) median {statistics.median(v2) * 1000:.1f} ms; "
        f"IMDSv1 after fallback = {later_median / statistics.median(v2):.2f} x that"
    )


if __name__ == "__main__":
    main()

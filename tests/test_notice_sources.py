"""Each cloud's notice source against the simulator on 127.0.0.1, including IMDS's traps.

These tests check what is seen, in which order, and how often — with generous time
bounds only. How fast a notice is seen is measured in benchmarks/notice_latency.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from harness import free_port, until

from jupyter_spot.notice import AWSSource, AzureSource, GCPSource, Notice, NoticeWatcher
from jupyter_spot.notice.fetch import request
from jupyter_spot.notice.model import utcnow
from jupyter_spot.notice.simulator import Simulator


class Recorder:
    """A callback that remembers what it was given and when."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.times: list[float] = []
        self.event = threading.Event()

    def __call__(self, notice: Notice) -> None:
        self.notices.append(notice)
        self.times.append(time.monotonic())
        self.event.set()


#: Generous bound for anything "at once" or "within a poll" on a loaded 2-core machine.
SOON = 30.0


def polled(sim: Simulator, more: int, path: str = "") -> None:
    """Until the simulator has served ``more`` further requests (for ``path``): the watcher's thread
    polls again only after its callbacks for the last answer returned, so whatever that answer
    would have caused has happened by then."""
    def count() -> int:
        return sum(path in requested for _, requested in list(sim.requests))

    start = count()
    until(lambda: count() >= start + more, SOON, f"{more} more request(s) to the simulator for {path or 'anything'}")


def hanging_in_wait_for_change(sim: Simulator, keys: int = 1) -> None:
    """Until the GCP source's hanging GETs (``wait_for_change``) are out for ``keys`` keys."""
    until(
        lambda: len({path.split("?")[0] for _, path in list(sim.requests) if "wait_for_change=true" in path}) >= keys,
        SOON,
        "the GCP source to hang in wait_for_change",
    )


# -- AWS ------------------------------------------------------------------------------


def test_aws_notice_seen_by_the_polling_watcher() -> None:
    interval = 0.3
    with Simulator("aws", imdsv2_only=True) as sim:
        rec = Recorder()
        with NoticeWatcher([AWSSource(sim.url, interval=interval)], [rec]):
            polled(sim, 3, "instance-action")  # a few empty polls first
            assert rec.notices == []
            sim.fire("stop")
            assert rec.event.wait(SOON)
    (notice,) = rec.notices
    assert (notice.kind, notice.action, notice.source) == ("interruption", "stop", "aws")
    assert 90 < notice.seconds_left() <= 121


def test_aws_html_404_is_no_notice() -> None:
    with Simulator("aws") as sim:
        raw = request(sim.url, "GET", "/latest/meta-data/spot/instance-action")
        assert raw.status == 404 and raw.body.lstrip().startswith(b"<?xml")
        source = AWSSource(sim.url)
        assert source.poll() is None
        sim.fire("hibernate")
        notice = source.poll()
    assert notice is not None and notice.action == "hibernate"


def test_aws_expired_token_is_refreshed_once() -> None:
    with Simulator("aws", imdsv2_only=True) as sim:
        source = AWSSource(sim.url)
        assert source.poll() is None
        assert sim.token_puts == 1
        sim.expire_tokens()  # the next GET gets a 401
        assert source.poll() is None
        assert sim.token_puts == 2
        assert source.poll() is None
        assert sim.token_puts == 2  # the new token is reused, not fetched per poll
        sim.fire()
        notice = source.poll()
    assert notice is not None and notice.action == "terminate"
    assert not source.imdsv1_only


def test_aws_token_is_renewed_before_its_ttl_runs_out() -> None:
    with Simulator("aws", imdsv2_only=True, token_ttl=16) as sim:  # 16 s: inside the 15 s refresh margin after 1 s
        source = AWSSource(sim.url)
        assert source.poll() is None
        time.sleep(1.1)
        assert source.poll() is None
        statuses = sim.token_puts
    assert statuses == 2


def test_aws_hanging_token_put_falls_back_to_imdsv1_and_stays(caplog: pytest.LogCaptureFixture) -> None:
    timeout = 0.5
    with Simulator("aws", hang_token_put=True) as sim:
        source = AWSSource(sim.url, timeout=timeout)
        started = time.monotonic()
        assert source.poll() is None
        first = time.monotonic() - started
        for _ in range(5):
            assert source.poll() is None
        sim.fire()
        notice = source.poll()
        puts = sim.token_puts
    assert source.imdsv1_only
    assert first >= timeout  # the first poll waited for the token that never came…
    assert puts == 1  # …and no later poll asked for one again (what that saves: benchmarks/notice_latency.py)
    assert notice is not None and notice.kind == "interruption"
    assert sum("hop limit" in r.getMessage() for r in caplog.records) == 1


def test_aws_imdsv2_required_behind_hop_limit_1_says_what_to_fix() -> None:
    with Simulator("aws", imdsv2_only=True, hang_token_put=True) as sim:
        source = AWSSource(sim.url, timeout=0.3)
        with pytest.raises(OSError, match="hop limit to 2"):
            source.poll()
        with pytest.raises(OSError, match="hop limit to 2"):
            source.poll()
        puts = sim.token_puts
    assert puts == 1  # the watcher's retries do not ask (and wait) for a token again


def test_aws_unparsable_notice_time_is_a_notice_without_deadline() -> None:
    with Simulator("aws") as sim:
        sim.fire()
        sim.notice = {"action": "terminate", "time": "not-a-time"}
        notice = AWSSource(sim.url).poll()
    assert notice is not None and notice.kind == "interruption"
    assert notice.deadline is None and notice.seconds_left() is None


def test_aws_rebalance_is_reported_once_then_the_interruption() -> None:
    with Simulator("aws") as sim:
        rec = Recorder()
        with NoticeWatcher([AWSSource(sim.url, interval=0.05)], [rec], min_gap=0.05):
            sim.rebalance()
            until(lambda: len(rec.notices) == 1, SOON, "the rebalance recommendation")
            polled(sim, 20, "rebalance")  # many more polls see it again
            assert len(rec.notices) == 1
            sim.fire()
            until(lambda: len(rec.notices) == 2, SOON, "the interruption notice")
            polled(sim, 6, "instance-action")  # both still standing: a repeat would be in by now
    assert [n.kind for n in rec.notices] == ["rebalance", "interruption"]
    assert rec.notices[0].deadline is None


def test_the_interruption_is_seen_while_the_rebalance_is_still_being_handled() -> None:
    """A rebalance's snapshot has no deadline and may take long; the source is polled meanwhile."""
    with Simulator("aws") as sim:
        rec = Recorder()
        rebalance_handled = threading.Event()

        def slow_snapshot(notice: Notice) -> None:
            if notice.kind == "rebalance":
                rebalance_handled.wait(SOON)

        with NoticeWatcher([AWSSource(sim.url, interval=0.05)], [slow_snapshot, rec], min_gap=0.05):
            sim.rebalance()
            polled(sim, 2, "rebalance")
            sim.fire()
            until(lambda: [n.kind for n in rec.notices] == ["interruption"], SOON,
                  "the interruption, while the rebalance's callback still runs")
            rebalance_handled.set()
            until(lambda: len(rec.notices) == 2, SOON, "the rebalance's callbacks to finish")
    assert [n.kind for n in rec.notices] == ["interruption", "rebalance"]


def test_aws_scheduled_maintenance() -> None:
    with Simulator("aws") as sim:
        source = AWSSource(sim.url)
        assert source.poll() is None
        sim.schedule_maintenance("instance-stop", after=600)
        notice = source.poll()
    assert notice is not None
    assert (notice.kind, notice.action) == ("maintenance", "stop")
    assert 590 < notice.seconds_left() <= 601
    assert "instance-stop" in notice.detail


def test_aws_endpoint_settings_as_in_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_spot.notice.fetch import split_endpoint

    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", raising=False)
    assert AWSSource().endpoint == "http://169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert split_endpoint(AWSSource().endpoint) == ("fd00:ec2::254", 80, "")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1338/")
    assert split_endpoint(AWSSource().endpoint) == ("127.0.0.1", 1338, "")
    with pytest.raises(ValueError, match="http://host"):
        split_endpoint("https://169.254.169.254")


# -- GCP ------------------------------------------------------------------------------


def test_gcp_wait_for_change_sees_preemption_at_once() -> None:
    with Simulator("gcp") as sim:
        rec = Recorder()
        with NoticeWatcher([GCPSource(f"127.0.0.1:{sim.port}", wait=60)], [rec]):
            hanging_in_wait_for_change(sim, keys=2)
            sim.fire()
            assert rec.event.wait(SOON)  # well before the 60 s wait is over: the hanging GET answered
    (notice,) = rec.notices
    assert (notice.kind, notice.action, notice.source) == ("interruption", "preempt", "gcp")
    assert 0 < notice.seconds_left() <= 30


def test_gcp_quiet_vm_answers_at_once_then_waits() -> None:
    with Simulator("gcp") as sim:
        source = GCPSource(f"127.0.0.1:{sim.port}", wait=8)
        started = time.monotonic()
        assert source.poll() is None  # last_etag=0: the current values, at once
        first = time.monotonic() - started
        durations = []
        for _ in range(2):  # then both keys hang until a change or the wait is over
            started = time.monotonic()
            assert source.poll() is None
            durations.append(time.monotonic() - started)
        flavor = {"Metadata-Flavor": "Google"}
        maintenance = request(sim.url, "GET", "/computeMetadata/v1/instance/maintenance-event", headers=flavor)
        assert request(sim.url, "GET", "/computeMetadata/v1/instance/preempted").status == 403  # no flavor header
    assert first < 7.5  # not a whole wait: answered at once
    assert 7.9 < max(durations) < 60, durations  # then a wait for a change, not a busy poll
    assert (maintenance.status, maintenance.text()) == (200, "NONE")


def test_gcp_preemption_standing_at_start_is_seen_at_once() -> None:
    with Simulator("gcp") as sim:
        sim.fire()
        rec = Recorder()
        with NoticeWatcher([GCPSource(f"127.0.0.1:{sim.port}", wait=60)], [rec]):
            assert rec.event.wait(SOON)  # not after a 60 s wait: the first answer carries it
    assert rec.notices[0].action == "preempt"


def test_gcp_terminate_on_host_maintenance_seen_within_one_wait_then_preemption() -> None:
    with Simulator("gcp") as sim:
        rec = Recorder()
        with NoticeWatcher([GCPSource(f"127.0.0.1:{sim.port}", wait=60)], [rec]):
            hanging_in_wait_for_change(sim, keys=2)
            sim.fire("terminate-on-host-maintenance")
            until(lambda: len(rec.notices) == 1, SOON, "the host maintenance notice (before the 60 s wait ends)")
            sim.fire()  # the preemption watch runs on beside it
            until(lambda: len(rec.notices) == 2, SOON, "the preemption notice (before the 60 s wait ends)")
    maintenance, preemption = rec.notices
    assert (maintenance.kind, maintenance.action, maintenance.source) == ("maintenance", "stop", "gcp")
    assert maintenance.detail == "TERMINATE_ON_HOST_MAINTENANCE"
    assert 55 < maintenance.seconds_left() <= 60
    assert (preemption.kind, preemption.action) == ("interruption", "preempt")


def test_gcp_live_migration_is_logged_once_and_no_notice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jupyter_spot.notice")
    with Simulator("gcp") as sim:
        rec = Recorder()
        with NoticeWatcher([GCPSource(f"127.0.0.1:{sim.port}", wait=1)], [rec]):
            hanging_in_wait_for_change(sim, keys=2)
            sim.fire("migrate-on-host-maintenance", lead_time=2.5)  # served through two waits that time out
            until(lambda: sim.state()["maintenance_event"] is None, SOON, "the live migration to pass")
            polled(sim, 2, "maintenance-event")  # the source has seen the event come and go
            assert rec.notices == []
            sim.fire("terminate-on-host-maintenance")  # the next event after the migration still counts
            assert rec.event.wait(SOON)
    migrations = [r for r in caplog.records if "live-migrate" in r.getMessage()]
    assert len(migrations) == 1 and migrations[0].levelno == logging.INFO
    assert [(n.kind, n.action) for n in rec.notices] == [("maintenance", "stop")]


def test_gcp_unknown_maintenance_value_is_a_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    with Simulator("gcp") as sim:
        sim.gcp_maintenance_event = "SOMETHING_NEW_ON_HOST_MAINTENANCE"
        source = GCPSource(f"127.0.0.1:{sim.port}", wait=1)
        results = [source.poll() for _ in range(4)]  # the first answers at once, later ones repeat it per wait
        served = sum(path.startswith("/computeMetadata/v1/instance/maintenance-event") for _, path in sim.requests)
    assert results == [None] * 4
    assert served >= 2
    warnings = [r for r in caplog.records if "SOMETHING_NEW" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_gcp_metadata_without_maintenance_event_still_delivers_preemption(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="jupyter_spot.notice")
    with Simulator("gcp", maintenance_event=False) as sim:
        flavor = {"Metadata-Flavor": "Google"}
        assert request(sim.url, "GET", "/computeMetadata/v1/instance/maintenance-event", headers=flavor).status == 404
        rec = Recorder()
        with NoticeWatcher([GCPSource(f"127.0.0.1:{sim.port}", wait=60)], [rec]):
            hanging_in_wait_for_change(sim, keys=1)
            sim.fire()
            assert rec.event.wait(SOON)
        asked = [path for _, path in sim.requests if "maintenance-event" in path]
    assert [(n.kind, n.action) for n in rec.notices] == [("interruption", "preempt")]
    assert len(asked) == 2  # ours above, then the source's one: a 404 turns that watch off
    records = [r for r in caplog.records if r.name == "jupyter_spot.notice" and "maintenance" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]


def test_gcp_simulate_command_fires_host_maintenance() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from jupyter_spot.cli import main; main()",
            "simulate",
            "gcp",
            "--port",
            "0",
            "--notice-after",
            "0.5",
            "--action",
            "terminate-on-host-maintenance",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        host = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if "export GCE_METADATA_HOST=" in line:
                host = line.split("=", 1)[1].strip()
                break
        assert host and host.startswith("127.0.0.1:")
        rec = Recorder()
        with NoticeWatcher([GCPSource(host, wait=10)], [rec]):
            assert rec.event.wait(15)
    finally:
        proc.terminate()
        proc.wait(10)
    assert [(n.kind, n.action) for n in rec.notices] == [("maintenance", "stop")]


def test_host_maintenance_actions_are_gcp_only() -> None:
    with pytest.raises(ValueError, match="simulate gcp"):
        Simulator("aws", action="terminate-on-host-maintenance")
    with Simulator("azure") as sim:
        answer = request(sim.url, "POST", "/__simulator/notice", body=b'{"action": "migrate-on-host-maintenance"}')
        assert answer.status == 400 and "simulate gcp" in answer.text()
        assert sim.notice is None


# -- Azure ------------------------------------------------------------------------------


def test_azure_preempt_seen_and_acknowledged_after_the_callback() -> None:
    with Simulator("azure") as sim:
        acks_during_callback: list[list[str]] = []

        def slow_flush(notice: Notice) -> None:
            time.sleep(0.2)
            acks_during_callback.append(list(sim.acks))

        rec = Recorder()
        with NoticeWatcher([AzureSource(sim.url, interval=0.2)], [slow_flush, rec]):
            polled(sim, 2, "scheduledevents")
            event = sim.fire()
            assert rec.event.wait(SOON)
            until(lambda: sim.acks == [event["EventId"]], SOON, "Azure to be told the event is handled")
            polled(sim, 3, "scheduledevents")  # the event still stands: a second ack would be in by now
    (notice,) = rec.notices
    assert (notice.kind, notice.action, notice.source, notice.event_id) == (
        "interruption",
        "preempt",
        "azure",
        event["EventId"],
    )
    assert 25 < notice.seconds_left() <= 31
    assert acks_during_callback == [[]]  # not approved before the flush was done
    assert sim.acks == [event["EventId"]]  # and approved once


def test_azure_ignores_events_for_other_vms_and_freezes() -> None:
    with Simulator("azure") as sim:
        source = AzureSource(sim.url)
        sim.fire("terminate")
        sim.notice["Resources"] = ["someone-else"]
        assert source.poll() is None
        sim.notice["Resources"] = ["spot-simulated-vm"]
        sim.notice["EventType"] = "Freeze"
        assert source.poll() is None
        sim.notice["EventType"] = "Terminate"
        notice = source.poll()
    assert notice is not None and notice.action == "terminate"


# -- all clouds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda port: AWSSource(f"http://127.0.0.1:{port}", interval=0.02),
        lambda port: GCPSource(f"127.0.0.1:{port}", wait=1),
        lambda port: AzureSource(f"http://127.0.0.1:{port}", interval=0.02),
    ],
    ids=["aws", "gcp", "azure"],
)
def test_dead_endpoint_no_crash_no_log_flood(make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="jupyter_spot.notice")
    source = make(free_port())  # nobody listens there
    watcher = NoticeWatcher([source], max_backoff=0.2)
    calls = []
    original = source.poll

    def counting_poll():
        calls.append(1)
        return original()

    source.poll = counting_poll  # count attempts on the real poll
    with watcher:
        until(lambda: len(calls) >= 3, SOON, "the watcher to try the dead endpoint again")
        assert all(t.is_alive() for t in watcher._threads)
    records = [r for r in caplog.records if r.name == "jupyter_spot.notice"]
    assert len(calls) >= 3  # it kept trying…
    assert len(records) == 1, [r.getMessage() for r in records]  # …and said so once
    assert records[0].levelno == logging.WARNING
    assert watcher.notices == []


def test_watcher_survives_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    def broken(notice: Notice) -> None:
        raise RuntimeError("boom")

    with Simulator("aws") as sim:
        rec = Recorder()
        sim.fire()
        with NoticeWatcher([AWSSource(sim.url, interval=0.05)], [broken, rec]):
            assert rec.event.wait(SOON)
            polled(sim, 3, "instance-action")  # the thread lives on, and the standing notice is not repeated
    assert len(rec.notices) == 1
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_notice_round_trips_through_json() -> None:
    notice = Notice("interruption", "hibernate", utcnow() + timedelta(seconds=90), "aws", event_id="x")
    again = Notice.from_dict(notice.to_dict())
    assert again == notice and again.key == notice.key
    assert 85 < again.seconds_left() <= 90
    with pytest.raises(ValueError, match="kind"):
        Notice("reboot", "stop", None, "aws")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        Notice("interruption", "stop", notice.deadline.replace(tzinfo=None), "aws")

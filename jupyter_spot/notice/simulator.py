"""A local stand-in for a cloud's metadata service, for rehearsals and tests.

What AWS's amazon-ec2-metadata-mock does, in Python and for three clouds:
``jupyter spot simulate aws|gcp|azure`` serves the provider's protocol on
127.0.0.1 and fires an interruption notice when told (after N seconds, or at
once via ``POST /__simulator/notice`` or :meth:`Simulator.fire`); on GCP the
notice is a preemption or a host-maintenance event. It also reproduces the
failure modes real clients trip over: IMDSv2-only (401 without a valid token),
short-lived tokens, a token PUT that never answers (a container behind hop
limit 1), HTML 404 bodies, and a GCE metadata server without
``maintenance-event``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Enum, Float, Int

from .._version import __version__
from . import aws, azure, gcp
from .model import deadline_in

PROVIDERS = ("aws", "gcp", "azure")
LEAD_TIME = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}  # seconds from notice to the end, as the clouds give
# GCP's host-maintenance actions and the maintenance-event value each one shows.
GCP_MAINTENANCE = {
    "terminate-on-host-maintenance": gcp.TERMINATE_ON_HOST_MAINTENANCE,
    "migrate-on-host-maintenance": gcp.MIGRATE_ON_HOST_MAINTENANCE,
}
CONTROL = "/__simulator/"
VM_NAME = "spot-simulated-vm"
HTML_404 = (
    b'<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head><title>404 - Not Found</title>'
    b"</head><body><h1>404 - Not Found</h1></body></html>\n"
)


class Simulator:
    """A threaded HTTP server speaking ``provider``'s metadata protocol on ``host:port`` (0: any free port)."""

    def __init__(
        self,
        provider: str,
        port: int = 0,
        host: str = "127.0.0.1",
        notice_after: float | None = None,
        action: str | None = None,
        rebalance_after: float | None = None,
        imdsv2_only: bool = False,
        token_ttl: int | None = None,
        hang_token_put: bool = False,
        maintenance_event: bool = True,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
        _check_action(provider, action)
        self.provider = provider
        self.host = host
        self.port = port
        self.notice_after = notice_after
        self.default_action = action or {"aws": "terminate", "gcp": "preempt", "azure": "preempt"}[provider]
        self.rebalance_after = rebalance_after
        self.imdsv2_only = imdsv2_only
        self.token_ttl = token_ttl
        self.hang_token_put = hang_token_put
        self.serves_maintenance_event = maintenance_event  # False: 404, as a metadata server without the key
        # State, guarded by _cond (GCP's hanging GET waits on it).
        self._cond = threading.Condition()
        self.notice: dict[str, Any] | None = None
        self.gcp_maintenance_event = gcp.NO_MAINTENANCE
        self.rebalance_notice: dict[str, Any] | None = None
        self.maintenance_events: list[dict[str, Any]] = []
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.token_puts = 0
        self.acks: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._incarnation = 1
        self._closing = threading.Event()
        self._timers: list[threading.Timer] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> Simulator:
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.simulator = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="spot-simulator", daemon=True)
        self._thread.start()
        for delay, fn in ((self.notice_after, self.fire), (self.rebalance_after, self.rebalance)):
            if delay is not None:
                timer = threading.Timer(delay, fn)
                timer.daemon = True
                timer.start()
                self._timers.append(timer)
        return self

    def stop(self) -> None:
        self._closing.set()
        for timer in self._timers:
            timer.cancel()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs to talk to this simulator instead of the cloud."""
        name = {"aws": aws.ENDPOINT_ENV, "gcp": gcp.HOST_ENV, "azure": azure.ENDPOINT_ENV}[self.provider]
        value = f"{self.host}:{self.port}" if self.provider == "gcp" else self.url
        return {name: value}

    # -- scenario --------------------------------------------------------------
    def fire(self, action: str | None = None, lead_time: float | None = None) -> dict[str, Any]:
        """Post the interruption notice now; returns what the metadata service will show.

        On GCP, ``terminate-on-host-maintenance`` and ``migrate-on-host-maintenance``
        set ``maintenance-event`` instead of ``preempted``; a migration is over
        (back to NONE) after ``lead_time`` seconds (60 by default).
        """
        action = action or self.default_action
        if action in GCP_MAINTENANCE:
            return self._gcp_maintenance(action, gcp.MAINTENANCE_LEAD_TIME if lead_time is None else lead_time)
        deadline = deadline_in(LEAD_TIME[self.provider] if lead_time is None else lead_time)
        with self._cond:
            if self.provider == "aws":
                self.notice = {"action": action, "time": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")}
            elif self.provider == "gcp":
                self.notice = {"preempted": True}
            else:
                self.notice = _azure_event("Terminate" if action == "terminate" else "Preempt", deadline)
                self._incarnation += 1
            self._cond.notify_all()
            return dict(self.notice)

    def _gcp_maintenance(self, action: str, lead_time: float) -> dict[str, Any]:
        _check_action(self.provider, action)
        value = GCP_MAINTENANCE[action]
        with self._cond:
            self.gcp_maintenance_event = value
            self._cond.notify_all()
        if value == gcp.MIGRATE_ON_HOST_MAINTENANCE:  # the VM lives on: the event ends with the migration
            timer = threading.Timer(lead_time, self._maintenance_over, args=(value,))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)
        return {"maintenance-event": value}

    def _maintenance_over(self, value: str) -> None:
        with self._cond:
            if self.gcp_maintenance_event == value:
                self.gcp_maintenance_event = gcp.NO_MAINTENANCE
                self._cond.notify_all()

    def rebalance(self) -> None:
        """AWS's rebalance recommendation: interruption risk is up, no deadline yet."""
        with self._cond:
            self.rebalance_notice = {"noticeTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def schedule_maintenance(self, code: str = "system-reboot", after: float = 3600.0) -> None:
        """An EC2 scheduled event (or an Azure Reboot) ``after`` seconds from now."""
        when = deadline_in(after)
        with self._cond:
            if self.provider == "azure":
                self.maintenance_events.append(_azure_event("Reboot", when))
                self._incarnation += 1
            else:
                self.maintenance_events.append(
                    {
                        "NotBefore": when.strftime("%d %b %Y %H:%M:%S GMT"),
                        "Code": code,
                        "Description": "simulated scheduled maintenance",
                        "EventId": "instance-event-" + secrets.token_hex(8),
                        "NotAfter": deadline_in(after + 1800).strftime("%d %b %Y %H:%M:%S GMT"),
                        "State": "active",
                    }
                )

    def expire_tokens(self) -> None:
        """Every IMDSv2 token issued so far stops working (as after its TTL)."""
        with self._cond:
            self.tokens.clear()

    def state(self) -> dict[str, Any]:
        with self._cond:
            maintenance = self.gcp_maintenance_event if self.gcp_maintenance_event != gcp.NO_MAINTENANCE else None
            return {
                "provider": self.provider,
                "notice": self.notice,
                "maintenance_event": maintenance,
                "rebalance": self.rebalance_notice,
                "token_puts": self.token_puts,
                "acks": list(self.acks),
                "requests": len(self.requests),
            }


def _check_action(provider: str, action: str | None) -> None:
    """Host-maintenance events exist on GCP only; elsewhere they would serve a notice no client knows."""
    if action in GCP_MAINTENANCE and provider != "gcp":
        raise ValueError(f"{action} is a GCP host-maintenance event: simulate gcp to fire it, not {provider}")


def _azure_event(event_type: str, not_before: datetime) -> dict[str, Any]:
    return {
        "EventId": str(uuid.uuid4()).upper(),
        "EventStatus": "Scheduled",
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": [VM_NAME],
        "NotBefore": format_datetime(not_before, usegmt=True),
        "Description": f"Simulated {event_type} event.",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }


class _Handler(BaseHTTPRequestHandler):
    server_version = "spot-simulator"
    protocol_version = "HTTP/1.0"

    @property
    def sim(self) -> Simulator:
        return self.server.simulator  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # the CLI prints notices, not every poll
        pass

    def _send(self, status: int, body: bytes | str, content_type: str = "text/plain", **headers: str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: object, **headers: str) -> None:
        self._send(status, json.dumps(obj), "application/json", **headers)

    def _dispatch(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        with self.sim._cond:
            self.sim.requests.append((method, self.path))
        if parts.path.startswith(CONTROL):
            return self._control(method, parts.path[len(CONTROL) :])
        handler = getattr(self, f"_{self.sim.provider}")
        handler(method, parts.path, urllib.parse.parse_qs(parts.query))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # -- control ---------------------------------------------------------------
    def _control(self, method: str, what: str) -> None:
        sim = self.sim
        if method == "GET" and what == "state":
            return self._json(200, sim.state())
        if method == "POST" and what == "notice":
            try:
                options = json.loads(self._body() or b"{}")
            except ValueError:
                return self._json(400, {"error": 'body must be JSON, e.g. {"action": "stop"}'})
            try:
                return self._json(200, sim.fire(options.get("action"), options.get("lead_time")))
            except ValueError as e:
                return self._json(400, {"error": str(e)})
        if method == "POST" and what == "rebalance":
            sim.rebalance()
            return self._json(200, sim.state())
        self._json(404, {"error": f"unknown simulator control {method} {what}"})

    # -- AWS IMDS ----------------------------------------------------------------
    def _aws(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        sim = self.sim
        if path == aws.TOKEN_PATH:
            if method != "PUT":
                return self._send(405, "")
            with sim._cond:
                sim.token_puts += 1
            if sim.hang_token_put:  # hop limit 1: the answer never reaches the container
                sim._closing.wait(30.0)
                self.close_connection = True
                return
            try:
                ttl = int(self.headers.get(aws.TOKEN_TTL_HEADER, ""))
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= 21600:
                return self._send(400, "")
            granted = min(ttl, sim.token_ttl) if sim.token_ttl else ttl
            token = secrets.token_urlsafe(32)
            with sim._cond:
                sim.tokens[token] = time.monotonic() + granted
            return self._send(200, token, **{aws.TOKEN_TTL_HEADER: str(granted)})
        if method != "GET":
            return self._send(405, "")
        presented = self.headers.get(aws.TOKEN_HEADER)
        with sim._cond:
            valid = presented is not None and sim.tokens.get(presented, 0.0) > time.monotonic()
            notice, rebalance, events = sim.notice, sim.rebalance_notice, list(sim.maintenance_events)
        if (presented is not None and not valid) or (presented is None and sim.imdsv2_only):
            return self._send(401, "", "text/html")
        if path == aws.INSTANCE_ACTION_PATH and notice:
            return self._json(200, notice)
        if path == aws.REBALANCE_PATH and rebalance:
            return self._json(200, rebalance)
        if path == aws.MAINTENANCE_PATH:
            return self._json(200, events)
        if path == "/latest/meta-data/":
            return self._send(200, "instance-id\ninstance-type\nspot/\nevents/\n")
        if path == "/latest/meta-data/instance-id":
            return self._send(200, "i-0simulated000000")
        self._send(404, HTML_404, "text/html")

    # -- GCE metadata ---------------------------------------------------------------
    def _gcp(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        sim = self.sim
        flavor = {"Metadata_Flavor": "Google"}
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._send(403, "Missing Metadata-Flavor:Google header.", **flavor)
        if method != "GET":
            return self._send(405, "", **flavor)
        keys: dict[str, Callable[[], str]] = {gcp.PREEMPTED_PATH: lambda: "TRUE" if sim.notice else "FALSE"}
        if sim.serves_maintenance_event:
            keys[gcp.MAINTENANCE_PATH] = lambda: sim.gcp_maintenance_event
        value = keys.get(path)
        if value is None:
            return self._send(404, HTML_404, "text/html", **flavor)

        def etag(v: str) -> str:
            return "etag-" + v.lower()

        if query.get("wait_for_change", [""])[0] == "true":
            last = query.get("last_etag", [""])[0]
            timeout = float(query.get("timeout_sec", ["3600"])[0])
            end = time.monotonic() + timeout
            with sim._cond:
                start = value()
                # Without last_etag, wait for a change from now; with it, answer at once if it differs.
                while (etag(value()) == last if last else value() == start) and not sim._closing.is_set():
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    sim._cond.wait(remaining)
        current = value()
        self._send(200, current, "application/text", ETag=etag(current), **flavor)

    # -- Azure scheduled events ---------------------------------------------------------
    def _azure(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        sim = self.sim
        if self.headers.get("Metadata") != "true":
            return self._json(400, {"error": "Bad request. Required metadata header not specified"})
        if path == "/metadata/instance/compute/name":
            return self._send(200, VM_NAME)
        if path == "/metadata/instance":
            return self._json(200, {"compute": {"name": VM_NAME, "priority": "Spot"}})
        if path != "/metadata/scheduledevents":
            return self._json(404, {"error": "Not found"})
        if method == "GET":
            with sim._cond:
                events = ([sim.notice] if sim.notice else []) + list(sim.maintenance_events)
                return self._json(200, {"DocumentIncarnation": sim._incarnation, "Events": events})
        if method != "POST":
            return self._json(405, {"error": "method not allowed"})
        try:
            ids = [r["EventId"] for r in json.loads(self._body())["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"error": 'body must be {"StartRequests": [{"EventId": ...}]}'})
        with sim._cond:
            for event in ([sim.notice] if sim.notice else []) + sim.maintenance_events:
                if event["EventId"] in ids:
                    event["EventStatus"], event["NotBefore"] = "Started", ""
            sim.acks.extend(ids)
            sim._incarnation += 1
        self._send(200, "")


class SimulateApp(JupyterApp):
    """``jupyter spot simulate aws|gcp|azure``: rehearse an interruption on your own machine."""

    name = "jupyter-spot-simulate"
    version = __version__
    description = (
        "Serve a cloud's metadata protocol (aws, gcp or azure) on 127.0.0.1 and fire an interruption "
        "notice, so you can watch jupyter-spot flush your kernels before the real thing."
    )
    examples = (
        "jupyter spot simulate aws --notice-after 60\n"
        "jupyter spot simulate aws --imdsv2-only --rebalance-after 10 --notice-after 40\n"
        "jupyter spot simulate gcp --port 8081\n"
        "jupyter spot simulate gcp --notice-after 30 --action terminate-on-host-maintenance\n"
    )
    port = Int(1338, help="Port on 127.0.0.1 (1338 like amazon-ec2-metadata-mock; 0: any free port).").tag(config=True)
    notice_after = Float(-1.0, help="Seconds until the interruption notice (<0: only on request).").tag(config=True)
    rebalance_after = Float(-1.0, help="AWS: seconds until a rebalance recommendation (<0: never).").tag(config=True)
    action = Enum(
        ["", "terminate", "stop", "hibernate", "preempt", *GCP_MAINTENANCE],
        "",
        help="What the notice announces (default: terminate on AWS, preempt on GCP/Azure; "
        "GCP also: terminate-on-host-maintenance, migrate-on-host-maintenance).",
    ).tag(config=True)
    imdsv2_only = Bool(False, help="AWS: refuse requests without a valid IMDSv2 token (401).").tag(config=True)
    token_ttl = Int(0, help="AWS: cap on token lifetime in seconds (0: as requested).").tag(config=True)
    hang_token_put = Bool(False, help="AWS: never answer the token PUT (a container behind hop limit 1).").tag(
        config=True
    )

    aliases = {
        **base_aliases,
        "port": "SimulateApp.port",
        "notice-after": "SimulateApp.notice_after",
        "rebalance-after": "SimulateApp.rebalance_after",
        "action": "SimulateApp.action",
        "token-ttl": "SimulateApp.token_ttl",
    }
    flags = {
        **base_flags,
        "imdsv2-only": ({"SimulateApp": {"imdsv2_only": True}}, "AWS: require IMDSv2 tokens."),
        "hang-token-put": ({"SimulateApp": {"hang_token_put": True}}, "AWS: never answer the token PUT."),
    }

    def start(self) -> None:
        if len(self.extra_args) != 1 or self.extra_args[0] not in PROVIDERS:
            self.log.critical("Say which cloud to simulate: jupyter spot simulate aws|gcp|azure")
            self.exit(2)
        try:
            sim = Simulator(
                self.extra_args[0],
                port=self.port,
                notice_after=self.notice_after if self.notice_after >= 0 else None,
                action=self.action or None,
                rebalance_after=self.rebalance_after if self.rebalance_after >= 0 else None,
                imdsv2_only=self.imdsv2_only,
                token_ttl=self.token_ttl or None,
                hang_token_put=self.hang_token_put,
            )
        except ValueError as e:
            self.log.critical("%s", e)
            self.exit(2)
        try:
            sim.start()
        except OSError as e:
            self.log.critical("Cannot listen on 127.0.0.1:%s (%s); pick another with --port", self.port, e)
            self.exit(1)
        ((name, value),) = sim.env.items()
        print(f"Simulating {sim.provider} metadata at {sim.url}. In the shell that starts Jupyter:\n")
        print(f"    export {name}={value}\n")
        if sim.notice_after is not None:
            print(f"The {sim.default_action} notice comes in {sim.notice_after:g} s.")
        print(f"Fire it now with:  curl -X POST {sim.url}{CONTROL}notice")
        if sim.provider == "gcp":
            body = json.dumps({"action": "terminate-on-host-maintenance"})
            print(f"A host-maintenance event instead:  curl -X POST {sim.url}{CONTROL}notice -d '{body}'")
        print("Ctrl-C stops the simulator.", flush=True)
        shown: Any = None
        fields = ("notice", "maintenance_event", "rebalance", "acks")
        try:
            while True:
                time.sleep(0.5)
                state = sim.state()
                if tuple(state[k] for k in fields) != shown:
                    shown = tuple(state[k] for k in fields)
                    if any(shown):
                        print("now serving:", json.dumps({k: state[k] for k in fields}), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            sim.stop()

"""``jupyter spot list | show | gc | doctor``: the store from a terminal.

They read the same store a server would (``--store``, else
``$JUPYTER_SPOT_STORE``, else the Jupyter data dir) and describe sessions with
the same rules as the REST API (server/catalog.py); a terminal knows no live
kernels, so every session not closed cleanly counts as interrupted.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Float, Int, Unicode

from .._version import __version__
from ..config import resolve_keep_interrupted_days, resolve_store_url
from ..store import ManifestError, Store, StoreError, collect_garbage, open_store
from ..store.keys import KMS_ENV
from ..store.lines import KEEP_INTERRUPTED_DAYS
from ..units import human_bytes
from . import catalog
from .doctor_keys import signing_key_checks


class StoreApp(JupyterApp):
    """Shared options: which store, JSON or text."""

    version = __version__
    store = Unicode("", help="Store URL (directory or s3://bucket/prefix); default: $JUPYTER_SPOT_STORE.").tag(
        config=True
    )
    json_output = Bool(False, help="Print JSON instead of text.").tag(config=True)
    aliases = {**base_aliases, "store": "StoreApp.store"}
    flags = {**base_flags, "json": ({"StoreApp": {"json_output": True}}, "Print JSON instead of text.")}

    def store_url(self) -> str:
        """``--store`` given on the command line wins over $JUPYTER_SPOT_STORE."""
        return self.store or resolve_store_url()

    def open(self) -> Store:
        url = self.store_url()
        try:
            return open_store(url)
        except (StoreError, ImportError) as error:
            self.fail(f"cannot open store {url}: {error}")

    def fail(self, message: str) -> NoReturn:
        print(f"jupyter spot {self.name.rsplit('-', 1)[-1]}: {message}", file=sys.stderr)
        raise SystemExit(1)

    def emit(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=1) if self.json_output else text)


class ListApp(StoreApp):
    name = "jupyter-spot-list"
    description = "List the sessions in the store: latest snapshot, size, and whether it was interrupted."
    session = Unicode("", help="Show this session's snapshots instead.").tag(config=True)
    aliases = {**StoreApp.aliases, "session": "ListApp.session"}

    def start(self) -> None:
        store = self.open()
        try:
            if self.session:
                snapshots = catalog.list_snapshot_summaries(store, catalog.check_session_name(self.session))
                lines = [
                    f"{s['id']}  {s['created']}  {s['kind']:<8} cell {s['execution_count']:<4} "
                    f"{human_bytes(s['size']):>9}  {s['variable_count']} vars"
                    for s in snapshots
                ]
                self.emit({"snapshots": snapshots}, "\n".join(lines) or f"no snapshots for {self.session!r}")
                return
            sessions = catalog.describe_sessions(store, live=[])
            unverifiable = catalog.unverifiable_sessions(store, None, {s["id"] for s in sessions})
            missing = None if sessions or unverifiable else store.missing_reason()
        except (StoreError, catalog.BadId) as error:
            self.fail(str(error))
        lines = []
        for s in sessions:
            latest = s["latest"]
            elsewhere = s["live_elsewhere"]
            flag = (
                "INTERRUPTED" if s["interrupted"]
                else f"live on {elsewhere['host']} ({elsewhere['server']})" if elsewhere
                else "closed"
            )
            lines.append(
                f"{s['id']}\n    {flag}  latest {latest['id']} ({latest['created']}, {latest['kind']}), "
                f"{human_bytes(latest['size'])}, {latest['variable_count']} variables"
                + (f", {len(latest['skipped'])} skipped" if latest["skipped"] else "")
                + (f"\n    reason: {s['reason']}" if s["reason"] else "")
            )
        for u in unverifiable:
            lines.append(
                f"{u['id']}\n    UNVERIFIED  {u['snapshots']} snapshot(s) signed with key {u['key_id'] or '?'}, "
                f"which this machine does not have\n    fix: {u['fix']}"
            )
        self.emit({"sessions": sessions, "unverifiable": unverifiable},
                  "\n".join(lines) or f"no sessions in {store.url}" + (f" ({missing})" if missing else ""))


class ShowApp(StoreApp):
    name = "jupyter-spot-show"
    description = (
        "Show one snapshot (an id from `jupyter spot list`) or a session's latest: variables, skipped objects."
    )
    session = Unicode("", help="The session the snapshot belongs to (default: search every session).").tag(config=True)
    aliases = {**StoreApp.aliases, "session": "ShowApp.session"}

    def find(self, store: Store, wanted: str) -> dict[str, Any]:
        sessions = [self.session] if self.session else store.list_sessions()
        if wanted in sessions or (self.session and wanted == "latest"):
            manifest, problems = store.latest_manifest(self.session or wanted)
            if manifest is None:
                raise ManifestError("; ".join(problems) or f"no snapshots for {wanted!r}")
            return manifest
        for session in sessions:
            if wanted in store.list_snapshots(session):
                return store.load_manifest(session, wanted)
        raise ManifestError(f"no session or snapshot {wanted!r} in {store.url}")

    def start(self) -> None:
        if len(self.extra_args) != 1:
            self.fail("give one snapshot id or session name (see `jupyter spot list`)")
        store = self.open()
        try:
            manifest = self.find(store, self.extra_args[0])
        except StoreError as error:
            self.fail(str(error))
        summary = catalog.snapshot_summary(manifest)
        lines = [
            f"snapshot {summary['id']} of {summary['session']}",
            f"  created {summary['created']}, kind {summary['kind']}"
            + (f" (taken during cell {summary['during_cell']})" if summary["during_cell"] is not None else "")
            + f", after cell {summary['execution_count']}",
            f"  {human_bytes(summary['size'])}, {summary['variable_count']} variables",
        ]
        for name, info in sorted((manifest.get("variables") or {}).items()):
            info = info if isinstance(info, dict) else {}
            lines.append(f"    {name:<24} {str(info.get('type', '?')):<32} {human_bytes(info.get('size') or 0):>9}")
        if summary["skipped"]:
            lines.append("  not stored (recreate them by re-running their cell):")
            for item in summary["skipped"]:
                lines.append(f"    {item['name']:<24} {item['type']}: {item['reason']} (cell {item['cell']})")
        self.emit(manifest, "\n".join(lines))


class GCApp(StoreApp):
    name = "jupyter-spot-gc"
    description = (
        "Keep the newest N snapshots of each session, and the newest of every line nobody restored or "
        "discarded (for --keep-interrupted-days), and delete blobs no kept snapshot uses."
    )
    keep = Int(20, help="Snapshots to keep per session (at least 1).").tag(config=True)
    session = Unicode("", help="Collect only this session's old snapshots.").tag(config=True)
    keep_interrupted_days = Float(
        KEEP_INTERRUPTED_DAYS,
        help="Spare the newest snapshot of every line nobody restored or discarded for this many days. "
        "$JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS wins.",
    ).tag(config=True)
    aliases = {
        **StoreApp.aliases,
        "keep": "GCApp.keep",
        "session": "GCApp.session",
        "keep-interrupted-days": "GCApp.keep_interrupted_days",
    }

    def start(self) -> None:
        store = self.open()
        try:
            days = resolve_keep_interrupted_days(self.keep_interrupted_days)
            report = collect_garbage(store, self.keep, session=self.session or None, keep_interrupted_days=days)
        except (StoreError, ValueError) as error:
            self.fail(str(error))
        data = {
            "snapshots_deleted": report.snapshots_deleted,
            "blobs_deleted": report.blobs_deleted,
            "blobs_kept": report.blobs_kept,
        }
        self.emit(data, str(report))


class KeyApp(StoreApp):
    name = "jupyter-spot-key"
    description = (
        "Show the store's signing keys, or `jupyter spot key rotate`: make a new KMS-wrapped key "
        "that signs from now on (every older key still verifies)."
    )

    def start(self) -> None:
        action = self.extra_args[0] if self.extra_args else "show"
        if action not in ("show", "rotate") or len(self.extra_args) > 1:
            self.fail("usage: jupyter spot key [show|rotate]")
        store = self.open()
        ring = store.signer.ring
        if ring.kms is None:
            if action == "rotate":
                self.fail(
                    f"rotation needs signing keys kept in the store: set {KMS_ENV}=<KMS key id, alias or ARN> "
                    f"(see docs/s3.md); this machine signs with its own key ({ring.source})"
                )
            key = ring.signing_key()
            self.emit({"source": ring.source, "current": key.id, "keys": [key.id]}, f"{key.id}  current  ({ring.source})")
            return
        try:
            rotated = ring.kms.rotate() if action == "rotate" else None
            keys, current = ring.kms.all(), ring.signing_key()
        except StoreError as error:
            self.fail(str(error))
        lines = [f"{key.id}  {'current' if key.id == current.id else 'verifies'}" for key in keys]
        if rotated is not None:
            lines.append(f"rotated: new snapshots are signed with {rotated.id}; older ones still verify")
        self.emit(
            {"source": ring.source, "current": current.id, "keys": [key.id for key in keys]},
            f"{ring.source}\n" + "\n".join(lines),
        )


class DoctorApp(StoreApp):
    name = "jupyter-spot-doctor"
    description = (
        "Check that snapshots can be written and notices can be seen on this machine, and that the "
        "signing key will be there when another machine restores them."
    )
    probe = Bool(True, help="Probe the cloud metadata address when no cloud is configured.").tag(config=True)
    flags = {
        **StoreApp.flags,
        "no-probe": ({"DoctorApp": {"probe": False}}, "Do not probe 169.254.169.254 (detect from DMI/env only)."),
    }

    def checks(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []

        def check(name: str, ok: bool, detail: str, required: bool = True) -> None:
            results.append({"check": name, "ok": ok, "detail": detail, "required": required})

        url = self.store_url()
        store: Store | None = None
        try:
            store = open_store(url)
            store.check_writable()
            check("store", True, f"{url} ({store.kind}) is writable")
        except ValueError as error:  # the signing key is unusable: its check below says how to fix it
            check("store", False, f"{url}: not opened: {error}")
        except (StoreError, ImportError, OSError) as error:
            hint = " (pip install 'jupyter-spot[s3]' and set AWS credentials)" if url.startswith("s3://") else ""
            check("store", False, f"{url}: {error}{hint}")
        if url.startswith("s3://"):
            check("s3 credentials", *self._s3_credentials())
        for name, ok, detail, required in signing_key_checks(url, store):
            check(name, ok, detail, required)
        try:
            import jupyter_spot.kernel  # noqa: F401  (kernels load it; a broken install shows here)

            check("kernel extension", True, "jupyter_spot.kernel imports")
        except Exception as error:  # noqa: BLE001 - report any import failure as is
            check("kernel extension", False, f"jupyter_spot.kernel does not import: {error}")
        check("notices", *self._notices(), required=False)
        return results

    @staticmethod
    def _s3_credentials() -> tuple[bool, str]:
        try:
            import boto3
        except ImportError:
            return False, "boto3 is not installed: pip install 'jupyter-spot[s3]'"
        credentials = boto3.session.Session().get_credentials()
        if credentials is None:
            return False, "no AWS credentials (instance profile, AWS_ACCESS_KEY_ID, or ~/.aws/credentials)"
        return True, f"found ({credentials.method})"

    def _notices(self) -> tuple[bool, str]:
        from ..notice import cloud_sources, detect_cloud

        cloud = detect_cloud(probe=self.probe)
        if cloud is None:
            return False, "not on a cloud VM jupyter-spot knows (set JUPYTER_SPOT_CLOUD to force); SIGTERM still works"
        (source,) = cloud_sources(cloud)
        try:
            notice = source.poll()
        except OSError as error:
            return False, f"{cloud}: metadata endpoint unreachable ({error})"
        state = notice.describe() if notice else "no notice standing"
        return True, f"{cloud}: metadata endpoint answers ({state})"

    def start(self) -> None:
        results = self.checks()
        text = "\n".join(
            f"{'ok  ' if r['ok'] else ('FAIL' if r['required'] else 'warn')}  {r['check']:<17} {r['detail']}"
            for r in results
        )
        self.emit({"checks": results}, text)
        if not all(r["ok"] for r in results if r["required"]):
            self.exit(1)

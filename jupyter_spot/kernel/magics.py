"""``%spot …``: the notebook user's handle on snapshots."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..store import StoreError, UnknownKeyError
from .engine import SnapshotEngine
from .lines import describe_holder
from ..units import human_bytes

COMMANDS = ("snapshot", "restore", "discard", "list", "status", "on", "off", "exclude", "gc")


@magics_class
class SpotMagics(Magics):
    def __init__(self, shell: Any, engine: SnapshotEngine) -> None:
        super().__init__(shell)
        self.engine = engine

    @magic_arguments()
    @argument("command", choices=COMMANDS, help="what to do")
    @argument(
        "args",
        nargs="*",
        help="restore: latest or a snapshot id; discard: a snapshot id of the line to discard "
        "(default: the interrupted line); exclude: variable names",
    )
    @argument("--session", default=None, help="restore: another session's snapshots (e.g. another notebook's)")
    @argument("--clean", action="store_true", help="restore: the newest snapshot not taken in the middle of a cell")
    @argument("--keep", type=int, default=None, help="gc: snapshots to keep per session")
    @line_magic
    def spot(self, line: str) -> None:
        """Snapshots of this kernel's state: snapshot, restore, discard, list, status, on, off, exclude, gc."""
        args = parse_argstring(self.spot, line)
        getattr(self, f"_{args.command}")(args)

    def _snapshot(self, args: Any) -> None:
        print(self.engine.snapshot(kind="explicit"))

    def _restore(self, args: Any) -> None:
        if len(args.args) > 1:
            raise UsageError("%spot restore takes one snapshot: latest or an id")
        report = self.engine.restore(args.args[0] if args.args else "latest", session=args.session, clean=args.clean)
        print(report)

    def _discard(self, args: Any) -> None:
        if len(args.args) > 1:
            raise UsageError("%spot discard takes at most one snapshot id (default: the interrupted line)")
        if args.session:
            raise UsageError("%spot discard works on this kernel's session only")
        self.engine.wait_until_durable(timeout=60)
        try:
            print(self.engine.lines.discard(self.engine.session, args.args[0] if args.args else None))
        except StoreError as error:
            raise UsageError(str(error)) from None

    def _list(self, args: Any) -> None:
        engine = self.engine
        session = args.session or engine.session
        engine.wait_until_durable(timeout=60)
        ids = engine.store.list_snapshots(session)
        if not ids:
            print(f"no snapshots of session {session!r} in {engine.store.url}")
            return
        print(f"snapshots of session {session!r} in {engine.store.url} (oldest first):")
        fixes: set[str] = set()
        for snapshot_id in ids:
            try:
                manifest = engine.store.load_manifest(session, snapshot_id)
            except UnknownKeyError as error:
                print(f"  {snapshot_id}  unusable: signed with key {error.key_id or '?'}, which this machine does not have")
                fixes.add(error.fix)
                continue
            except StoreError as error:
                print(f"  {snapshot_id}  unusable: {error}")
                continue
            where = (f"during cell {manifest['during_cell']}" if manifest.get("during_cell") is not None
                     else f"after cell {manifest.get('execution_count')}")
            line = manifest.get("line") or "legacy"
            print(f"  {snapshot_id}  {manifest.get('kind'):8}  {where:16}  {manifest.get('variable_count')} vars  "
                  f"{human_bytes(manifest.get('size', 0)):>9}  {len(manifest.get('skipped', {}))} skipped  "
                  f"line {'(this kernel) ' if line == engine.lines.line else ''}{line}")
        if session == engine.session:
            interrupted, lines, live = engine.lines.interrupted_and_live(session)
            if interrupted is not None:
                print(f"interrupted line: {interrupted.id} (newest {interrupted.newest_id}): `%spot restore` "
                      "loads it, `%spot discard` stops offering it")
            for line_id, holder in live.items():
                newest = lines[line_id].newest_id
                print(f"live line: {line_id} (newest {newest}) is live in {describe_holder(holder)}: "
                      f"`%spot restore {newest}` copies it here as a line of this kernel's own")
        for fix in sorted(fixes):
            print(f"to use them (nothing unverified is ever loaded): {fix}")

    def _status(self, args: Any) -> None:
        status = self.engine.status()
        pending = status["pending_snapshots"]
        last = status["last_snapshot"]
        print(f"store: {status['store']} ({status['store_kind']})")
        print(f"session: {status['session']}")
        print(f"auto-snapshot: {'on' if status['auto_snapshot'] else 'off'}")
        if last is not None:
            print(f"last snapshot: {last['id']} ({last['kind']}, cell {last['execution_count']})")
        print(f"last committed: {status['last_committed']}")
        if pending == 0:
            print("pending: 0")
        else:  # the first number stays non-zero until the last manifest is committed
            print(f"pending: {pending} snapshot(s), {status['pending_blobs']} blobs "
                  f"({human_bytes(status['pending_bytes'])}) still being written")
        if status["excluded"]:
            print(f"excluded: {', '.join(status['excluded'])}")
        if status["last_error"]:
            print(f"last error: {status['last_error']}")

    def _on(self, args: Any) -> None:
        self.engine.auto = True
        print("jupyter-spot: snapshot after every cell")

    def _off(self, args: Any) -> None:
        self.engine.auto = False
        print("jupyter-spot: automatic snapshots off (`%spot snapshot` still works; `%spot on` resumes)")

    def _exclude(self, args: Any) -> None:
        if not args.args:
            raise UsageError("%spot exclude NAME…: which variables never to snapshot")
        self.engine.excluded.update(args.args)
        print(f"jupyter-spot: not snapshotting {', '.join(sorted(self.engine.excluded))}")

    def _gc(self, args: Any) -> None:
        keep = args.keep if args.keep is not None else self.engine.settings.keep
        if keep < 1:
            raise UsageError("%spot gc --keep N needs N >= 1: the latest snapshot is always kept")
        print(self.engine.gc(keep))

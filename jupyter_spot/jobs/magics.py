"""``%%spot_job`` runs a cell as a job; ``%spot_job list|status|wait|cancel`` looks after jobs."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..store import StoreError
from . import engines, pack, record
from .watch import JobWatcher, elapsed

COMMANDS = ("list", "status", "wait", "cancel")


@magics_class
class JobMagics(Magics):
    def __init__(self, shell: Any, watcher: JobWatcher) -> None:
        super().__init__(shell)
        self.watcher = watcher

    @magic_arguments(name="%spot_job")
    @argument("--name", default=None, help="what to call the job in %spot_job status/wait/cancel (default: its id)")
    @argument("--outputs", default=None,
              help="comma-separated names to bring back (default: every name the cell assigns at top level); "
                   "with --shell: files, relative to the notebook's directory, stored at the end and put back there")
    @argument("--shell", action="store_true", help="the cell is a bash script (compile and run programs)")
    @argument("--sync-every", type=float, default=60.0,
              help="--shell: seconds between syncs of $SPOT_CHECKPOINT_DIR to the store (also on SIGTERM and at exit)")
    @argument("--grace", type=float, default=30.0,
              help="--shell: seconds the program gets after SIGTERM (a notice, cancel) before SIGKILL")
    @argument("--engine", default=None, choices=engines.ENGINES,
              help="where the job runs (default: c.SpotJobs.engine): local, or ray (a Ray cluster)")
    @cell_magic("spot_job")
    def spot_job_cell(self, line: str, cell: str) -> None:
        """Run this cell as a job that outlives the kernel: the variables it reads are sent along,
        the ones it assigns come back into the namespace at the next cell after it finishes.
        With --shell, the cell is a bash script; its --outputs files come back into the notebook's directory."""
        args = parse_argstring(self.spot_job_cell, line)
        try:
            if args.shell:
                job = self.watcher.submit_shell(cell, args.name, args.outputs, args.sync_every, args.grace,
                                                args.engine)
            else:
                job = self.watcher.submit(cell, args.name, args.outputs, args.engine)
        except ValueError as error:
            raise UsageError(f"%%spot_job: {error}. Nothing was started.") from None
        except pack.CannotSend as error:
            raise UsageError(f"%%spot_job: cannot send {', '.join(error.problems)} to a job: {error}. "
                             "Nothing was started; recreate it inside the cell instead.") from None
        outputs = ", ".join(job["outputs"]) or "none"
        title = job["id"] if job["name"] == job["id"] else f"{job['id']} ({job['name']})"
        where = "" if job.get("engine", "local") == "local" else f" on the {job['engine']} cluster"
        what = "output files" if job.get("kind") == "shell" else "outputs"
        print(f"jupyter-spot: job {title} started{where}; {what} {outputs} arrive at the next cell "
              f"after it finishes (`%spot_job status {job['name']}`, `%spot_job wait {job['name']}`)")

    @magic_arguments(name="%spot_job")
    @argument("command", choices=COMMANDS, help="what to do")
    @argument("name", nargs="?", help="status, wait, cancel: the job's name or id")
    @argument("--timeout", type=float, default=None, help="wait: give up waiting after this many seconds")
    @line_magic("spot_job")
    def spot_job_line(self, line: str) -> None:
        """This session's jobs: list, status NAME, wait NAME, cancel NAME."""
        args = parse_argstring(self.spot_job_line, line)
        if args.command != "list" and not args.name:
            raise UsageError(f"%spot_job {args.command} NAME: which job (`%spot_job list` shows them)")
        try:
            if args.command == "list":
                self._list()
            elif args.command == "status":
                self._status(self.watcher.find(args.name))
            elif args.command == "wait":
                self.watcher.wait(args.name, args.timeout)
            else:
                print(f"jupyter-spot: {self.watcher.cancel(args.name)}")
        except (record.JobError, StoreError) as error:
            raise UsageError(f"%spot_job {args.command}: {error}") from None

    def _list(self) -> None:
        jobs = self.watcher.jobs()
        session = self.watcher.engine.session
        if not jobs:
            print(f"no jobs in session {session!r}")
            return
        print(f"jobs of session {session!r} (oldest first):")
        for job in jobs:
            collected = ", collected" if job.get("collected_at") else ""
            print(f"  {job['id']}  {job['name']:16}  {job['state']:9}  {elapsed(job):>8}{collected}  "
                  f"outputs: {', '.join(job['outputs']) or '-'}")

    def _status(self, job: dict[str, Any]) -> None:
        kind = "shell job" if job.get("kind") == "shell" else "job"
        print(f"{kind} {job['id']} ({job['name']}): {job['state']}, attempt {job.get('attempt', 1)}, "
              f"engine {job.get('engine', 'local')}")
        print(f"  inputs: {', '.join(job['inputs']) or '-'}")
        print(f"  outputs: {', '.join(job['outputs']) or '-'}")
        print(f"  host: {job.get('host')}, pid {job.get('pid')}")
        print(f"  created {job.get('created')}, started {job.get('started')}, finished {job.get('finished')} "
              f"({elapsed(job)})")
        progress = self.watcher.progress(job["id"])
        if progress:
            print(f"  checkpoint: {progress}")
        if job.get("collected_at"):
            print(f"  outputs collected at {job['collected_at']}")
        if job.get("skipped"):
            print("  not returned: " + ", ".join(f"{name} ({why})" for name, why in job["skipped"].items()))
        print(f"  log: {job.get('log')}")
        if job.get("error"):
            print(f"  error: {job['error']}")
        if job.get("traceback"):
            print("  " + job["traceback"].rstrip().replace("\n", "\n  "))

"""``python -m jupyter_spot.jobs.runner <store-url> <job-id>``: run one job to the end.

Started detached by the kernel (its own session and process group, stdin
closed, output to the job's log file), so the kernel dying does not stop it.
Everything it needs is in the store — the signed source and input blobs — so
the same command on another machine that sees the store runs the job again;
``checkpoint`` lets the job resume there instead of starting over.
"""

from __future__ import annotations

import argparse
import linecache
import os
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any

from ..store import Store, open_store
from ..store.manifest import JOB_RESULT, JOB_RUNNER
from . import checkpoint, pack, record, shell, submit

#: Set by a cluster engine: the pid of the actor process the runner must not outlive.
PARENT_ENV = "JUPYTER_SPOT_RUNNER_PARENT"
#: How often a runner checks that the record still names it (and not a successor).
FENCE_SECONDS = 2.0
#: How long a finished job waits for a tiered store to copy its record and outputs to S3.
REPLICATION_SECONDS = 60.0


def _job_traceback(error: BaseException, filename: str) -> str:
    """The traceback from the job's own code down (the runner's frames say nothing)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))


def _outputs(namespace: dict[str, Any], wanted: list[str], explicit: bool) -> tuple[pack.Dumped, dict[str, str]]:
    """The outputs pickled, and why any were left out.

    Outputs found by reading the cell are best effort: one that is not set or
    cannot be pickled (an open file, a generator) is left out and named. Outputs
    asked for with ``--outputs`` must all come back, or the job fails.
    """
    skipped = {name: "not set by the job" for name in wanted if name not in namespace}
    if explicit and skipped:
        raise NameError(f"--outputs {', '.join(skipped)}: not set by the job")
    values = {name: namespace[name] for name in wanted if name in namespace}
    while True:
        try:
            return pack.dump(values), skipped
        except pack.CannotSend as error:
            problems = error.problems
        if explicit:
            raise pack.CannotSend(problems)
        skipped.update(problems)
        values = {name: value for name, value in values.items() if name not in problems}


class _Heartbeat(threading.Thread):
    """Stamps the record now and then, so a kernel on another machine can tell
    a job that still runs from one whose machine is gone; and ends this runner
    (its whole process group) once the record names another runner or none, so
    a runner taken for lost (its node partitioned, its actor restarted elsewhere,
    its job re-run by a restore) never goes on writing beside its successor."""

    def __init__(self, store: Store, job_id: str, claim: str) -> None:
        super().__init__(name="jupyter-spot-job-heartbeat", daemon=True)
        self.store, self.job_id, self.claim = store, job_id, claim
        self.lock = threading.Lock()  # the record is read-modified-written: one writer at a time
        self.stopped = threading.Event()

    def run(self) -> None:
        stamped = time.monotonic()
        while not self.stopped.wait(FENCE_SECONDS):
            with self.lock:
                if self.stopped.is_set():
                    return
                current = record.read(self.store, self.job_id)
                if current.get("runner") != self.claim:
                    print(f"the job's record names another runner (attempt {current.get('attempt')}, "
                          f"{current.get('state')}): this one stops", file=sys.stderr, flush=True)
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                if time.monotonic() - stamped >= record.HEARTBEAT_SECONDS:
                    record.update(self.store, self.job_id, heartbeat=record.now())
                    stamped = time.monotonic()

    def finish(self, **fields: Any) -> None:
        with self.lock:
            self.stopped.set()
            record.update(self.store, self.job_id, finished=record.now(), **fields)


def run(store_url: str, job_id: str) -> int:
    store = open_store(store_url)
    job = record.read(store, job_id)
    spec = record.spec(store, job)  # signed for this job of the record's session, or nothing runs
    session = job["session"]
    attempt = job.get("attempt", 1)
    claim = record.sign(store, record.claim(job_id, attempt), JOB_RUNNER, session, job_id)
    job = record.update(store, job_id, state="running", pid=os.getpid(), host=record.host(), runner=claim,
                        started=record.now(), heartbeat=record.now(), finished=None, error=None, traceback=None)
    print(f"jupyter-spot job {job_id} ({spec['name']}), attempt {job.get('attempt', 1)}, "
          f"pid {os.getpid()} on {record.host()}", flush=True)
    heartbeat = _Heartbeat(store, job_id, claim)
    heartbeat.start()
    _die_with_parent()
    if spec.get("kind") == "shell":
        code = _run_shell(store, session, job_id, spec, attempt, heartbeat)
    else:
        code = _run_python(store, session, job_id, spec, heartbeat)
    replicate = getattr(store, "flush_replication", None)
    if replicate is not None:  # a tiered store: the record must reach S3 before this process goes
        replicate(time.time() + REPLICATION_SECONDS)
    return code


class _Stopped(BaseException):
    """SIGTERM reached a Python job: not an error of the job (``except Exception`` in it lets this through)."""


def _stop_python_job(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Stopped(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """Under a cluster engine's actor: end the whole group (the job's programs too) once the actor is gone,
    so that the actor Ray restarts elsewhere is the only one running the job."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.2)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="jupyter-spot-parent-watch", daemon=True).start()


def _run_shell(store: Store, session: str, job_id: str, spec: dict[str, Any], attempt: int,
               heartbeat: _Heartbeat) -> int:
    run = shell.ShellRun(store, session, job_id, spec)
    signal.signal(signal.SIGTERM, run.on_sigterm)
    notices = shell.watch_notices(run.on_notice)
    try:
        fields = run.run(attempt)
    except Exception as error:  # the store failing mid-run, …: the record says so, not only the log
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        fields = {"state": "failed", "error": traceback.format_exception_only(type(error), error)[-1].strip(),
                  "traceback": trace}
    finally:
        if notices is not None:
            notices.stop()
    if "result" in fields:
        fields["result"] = record.sign(store, fields["result"], JOB_RESULT, session, job_id)
    heartbeat.finish(**fields)
    if fields["state"] == "failed":
        print(f"failed: {fields['error']}", file=sys.stderr, flush=True)
    return {"done": 0, "interrupted": 3}.get(fields["state"], 1)


def _run_python(store: Store, session: str, job_id: str, spec: dict[str, Any], heartbeat: _Heartbeat) -> int:
    # A fresh __main__, as `python job.py` would have: functions and classes the
    # job defines belong to it, and pickle finds them there.
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    namespace = module.__dict__
    filename = f"<spot_job {spec['name']}>"
    source = spec["source"]
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.path[:0] = [path for path in spec.get("sys_path", []) if path not in sys.path]
    signal.signal(signal.SIGTERM, _stop_python_job)
    try:
        os.chdir(spec["cwd"] if spec.get("cwd") and os.path.isdir(spec["cwd"]) else submit.work_directory(job_id))
        namespace.update(pack.load(store, spec["inputs"], namespace))
        checkpoint.attach(store, session, job_id)
        try:
            exec(compile(source, filename, "exec"), namespace)
        except SystemExit as exit_:  # sys.exit() / sys.exit(0): the job ends early, successfully
            if exit_.code:
                raise
        dumped, skipped = _outputs(namespace, spec["outputs"], spec["explicit_outputs"])
        result = {"outputs": pack.write(store, dumped), "skipped": skipped}
    except _Stopped as stopped:  # its checkpoint holds what it finished: a restore re-runs it from there
        print(f"stopped by {stopped}", file=sys.stderr, flush=True)
        heartbeat.finish(state="interrupted",
                         error=f"stopped by {stopped}; a restore re-runs it from its checkpoint")
        code = 3
    except (Exception, SystemExit) as error:
        trace = _job_traceback(error, filename)
        print(trace, file=sys.stderr, flush=True)
        heartbeat.finish(state="failed", error=traceback.format_exception_only(type(error), error)[-1].strip(),
                         traceback=trace)
        code = 1
    else:
        heartbeat.finish(state="done", result=record.sign(store, result, JOB_RESULT, session, job_id),
                         outputs_stored=pack.names(result["outputs"]), skipped=skipped,
                         blobs=pack.blob_keys(spec["inputs"]) + pack.blob_keys(result["outputs"]))
        print(f"done; outputs: {', '.join(pack.names(result['outputs'])) or '(none)'}", flush=True)
        code = 0
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jupyter_spot.jobs.runner", description=__doc__.splitlines()[0])
    parser.add_argument("store_url", help="the store the job's record and blobs are in")
    parser.add_argument("job_id", help="the job to run")
    args = parser.parse_args(argv)
    try:
        return run(args.store_url, args.job_id)
    except record.JobError as error:
        print(f"jupyter-spot job {args.job_id}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

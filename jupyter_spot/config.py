"""Where snapshots go and whose they are: environment first, then traitlets.

The same resolution runs in a kernel (IPython config: ``c.SpotSettings.store``)
and in the server (``c.SpotApp.store``), so a kernel started by the server and
one started by nbclient agree on the store and session without being told twice.
"""

from __future__ import annotations

import os
from pathlib import Path

from traitlets import Bool, Float, Int, List, Unicode
from traitlets.config import Configurable

from .store.lines import KEEP_INTERRUPTED_DAYS

STORE_ENV = "JUPYTER_SPOT_STORE"
SESSION_ENV = "JUPYTER_SPOT_SESSION"
NOTEBOOK_PATH_ENV = "JPY_SESSION_NAME"
KEEP_INTERRUPTED_DAYS_ENV = "JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS"


def default_store_url() -> str:
    from jupyter_core.paths import jupyter_data_dir

    return str(Path(jupyter_data_dir()) / "jupyter_spot" / "store")


def resolve_store_url(configured: str = "") -> str:
    """``$JUPYTER_SPOT_STORE``, else the configured value, else the Jupyter data dir."""
    return os.environ.get(STORE_ENV) or configured or default_store_url()


def resolve_session(configured: str = "", kernel_id: str = "") -> str:
    """``$JUPYTER_SPOT_SESSION``, else config, else the notebook path, else the kernel id.

    ``JPY_SESSION_NAME`` ending in a separator names a folder (a client opened the
    notebook with an empty session name): every notebook there would share it.
    """
    notebook = os.environ.get(NOTEBOOK_PATH_ENV, "")
    if notebook.endswith(("/", os.sep)):
        notebook = ""
    return os.environ.get(SESSION_ENV) or configured or notebook or kernel_id or f"pid-{os.getpid()}"


def resolve_keep_interrupted_days(configured: float = KEEP_INTERRUPTED_DAYS) -> float:
    """``$JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS`` (the server sets it for its kernels), else the configured value."""
    raw = os.environ.get(KEEP_INTERRUPTED_DAYS_ENV, "").strip()
    if not raw:
        return configured
    try:
        days = float(raw)
    except ValueError:
        raise ValueError(f"${KEEP_INTERRUPTED_DAYS_ENV} must be a number of days, not {raw!r}") from None
    if days < 0:
        raise ValueError(f"${KEEP_INTERRUPTED_DAYS_ENV} must not be negative ({raw!r})")
    return days


class SpotSettings(Configurable):
    """jupyter-spot's settings inside a kernel (``c.SpotSettings.…`` in ipython_kernel_config.py)."""

    store = Unicode("", help="Store URL: a directory or s3://bucket/prefix. $JUPYTER_SPOT_STORE wins.").tag(
        config=True
    )
    session = Unicode("", help="Session name. $JUPYTER_SPOT_SESSION wins; default: the notebook path.").tag(
        config=True
    )
    kms_key_id = Unicode(
        "",
        help="KMS key (id, alias or ARN) that wraps the signing keys kept in the store, so snapshots "
        "verify on any machine allowed to use it. $JUPYTER_SPOT_KMS_KEY wins.",
    ).tag(config=True)
    auto_snapshot = Bool(True, help="Snapshot after every cell.").tag(config=True)
    exclude = List(Unicode(), help="Variable names never snapshotted.").tag(config=True)
    keep = Int(20, help="Snapshots kept per session when retention runs after a snapshot (0: keep all).").tag(
        config=True
    )
    keep_interrupted_days = Float(
        KEEP_INTERRUPTED_DAYS,
        help="Retention spares the newest snapshot of every line nobody restored or discarded for this "
        "many days. $JUPYTER_SPOT_KEEP_INTERRUPTED_DAYS wins.",
    ).tag(config=True)
    background_threshold = Int(
        8 << 20,
        help="New data above this many bytes after a cell is written in the background, "
        "so the prompt comes back at once; %spot snapshot and notice flushes still wait for it.",
    ).tag(config=True)
    chunk_size = Int(
        4 << 20,
        help="Out-of-band buffers (numpy, pandas, bytes) larger than this many bytes are stored as chunks "
        "of this size, so a snapshot writes only the chunks that changed; 0 stores each buffer whole.",
    ).tag(config=True)
    watch_notices = Bool(
        True, help="Watch for interruption notices from inside the kernel when no server extension does."
    ).tag(config=True)
    notice_poll_interval = Float(5.0, help="Seconds between polls of the cloud's metadata service.").tag(config=True)


RAY_ADDRESS_ENV = "JUPYTER_SPOT_RAY_ADDRESS"


class SpotJobs(Configurable):
    """Where ``%%spot_job`` runs jobs (``c.SpotJobs.…`` in ipython_kernel_config.py)."""

    engine = Unicode("local", help="Where jobs run unless a cell says --engine: 'local' (a detached process "
                     "on the notebook's machine) or 'ray' (a detached actor on a Ray cluster).").tag(config=True)
    ray_address = Unicode("", help="The Ray cluster's address (ray://host:10001, host:6379 or 'auto'). "
                          f"${RAY_ADDRESS_ENV} wins; default 'auto': the cluster this machine is part of.").tag(
        config=True
    )
    shared_store = Bool(False, help="The store is a directory every node of the cluster mounts at the same "
                        "path (NFS, EFS), so --engine ray may use it.").tag(config=True)
    ray_num_cpus = Float(1.0, help="CPUs a Ray job's actor reserves on its node.").tag(config=True)

    def resolved_ray_address(self) -> str:
        return os.environ.get(RAY_ADDRESS_ENV) or self.ray_address or "auto"

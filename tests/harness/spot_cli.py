"""``jupyter spot …`` run as a user runs it: a subprocess of this Python, on the test's environment."""

from __future__ import annotations

import os
import subprocess
import sys

SPOT = [sys.executable, "-c", "from jupyter_spot.cli import main; main()"]


def spot(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """``jupyter spot ARGS`` in a subprocess (no cloud detection unless ``env`` asks for one);
    with ``check`` a non-zero exit fails the test."""
    env = {**os.environ, "JUPYTER_SPOT_CLOUD": "none", **env}
    result = subprocess.run([*SPOT, *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result

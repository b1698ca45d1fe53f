"""Process state outside ``user_ns`` that a notebook's results depend on.

Random number generators, the working directory, ``sys.path`` and environment
changes, and imported modules are captured next to the variables, so the
restored kernel draws the same random numbers and finds the same files and
modules as the one that was interrupted.
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import sys
from dataclasses import dataclass, field
from typing import Any

#: Variables a kernel's launcher sets per process; carrying them over would
#: point the restored kernel at its predecessor's connection or session.
_PER_PROCESS_ENV = ("JPY_", "JUPYTER_SPOT_", "KERNEL_", "IPY_", "PYDEVD_", "MPLBACKEND")


def _per_process(name: str) -> bool:
    return name.startswith(_PER_PROCESS_ENV)


@dataclass
class Baseline:
    """What the kernel looked like before the notebook changed it."""

    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))
    modules: set[str] = field(default_factory=lambda: set(sys.modules))


def _imported_since(baseline: Baseline) -> list[str]:
    """Modules imported since the extension loaded, as a notebook names them.

    Deeper submodules are a package's internals, imported again by the
    package itself; a restored ``sklearn.linear_model`` attribute needs only
    the first two levels.
    """
    names = []
    for name in list(sys.modules):
        if name in baseline.modules or name == "__main__":
            continue
        parts = name.split(".")
        if len(parts) > 2 or any(part.startswith("_") for part in parts):
            continue
        names.append(name)
    return names


def capture(baseline: Baseline, module_aliases: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    """The environment as JSON, and the RNG states as a (small) pickle."""
    environ = os.environ
    env_set = {k: v for k, v in environ.items() if baseline.environ.get(k) != v and not _per_process(k)}
    env_unset = sorted(k for k in baseline.environ if k not in environ and not _per_process(k))
    added_path = [[i, p] for i, p in enumerate(sys.path) if p not in baseline.sys_path]
    rng: dict[str, Any] = {"random": random.getstate()}
    if "numpy" in sys.modules:
        rng["numpy"] = sys.modules["numpy"].random.get_state()
    if "torch" in sys.modules:
        rng["torch"] = sys.modules["torch"].random.get_rng_state()
    info = {
        "cwd": os.getcwd(),
        "sys_path_added": added_path,
        "env_set": env_set,
        "env_unset": env_unset,
        "modules": module_aliases,
        "imported": _imported_since(baseline),
    }
    return info, pickle.dumps(rng, protocol=5)


def import_modules(info: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Re-import what the notebook had imported; the aliases bound in the namespace."""
    notes: list[str] = []
    for index, path in info.get("sys_path_added", []):
        if path not in sys.path:
            sys.path.insert(min(index, len(sys.path)), path)
    for name in info.get("imported", []):
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # a submodule that only imports as part of its parent
                pass
    bound: dict[str, Any] = {}
    for alias, module_name in info.get("modules", {}).items():
        try:
            bound[alias] = importlib.import_module(module_name)
        except Exception as error:
            notes.append(f"module {module_name} (as {alias}) could not be imported: {error}")
    return bound, notes


def apply(info: dict[str, Any], rng_state: bytes | None) -> list[str]:
    """Restore cwd, environment and RNG states; notes for what could not be."""
    notes: list[str] = []
    cwd = info.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as error:
            notes.append(f"working directory {cwd} is not available here ({error.strerror}); stayed in {os.getcwd()}")
    for key, value in info.get("env_set", {}).items():
        os.environ[key] = value
    for key in info.get("env_unset", []):
        os.environ.pop(key, None)
    if rng_state is not None:
        states = pickle.loads(rng_state)
        random.setstate(states["random"])
        if "numpy" in states:
            importlib.import_module("numpy").random.set_state(states["numpy"])
        if "torch" in states:
            try:
                importlib.import_module("torch").random.set_rng_state(states["torch"])
            except ImportError:
                notes.append("torch's random state was not restored: torch is not installed here")
    return notes

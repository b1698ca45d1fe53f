"""What a trial's cells put in the namespace, as a deterministic function of (kernel, cell).

Kernel ``A``'s cell ``k`` binds ``A_cell_1 … A_cell_k`` (one new name per cell), so
a manifest's variable names alone tell which kernel's line and which state it
holds — without unpickling anything. The other variables are rebound by every
cell to values derived from (kernel, k): a list that comes back every other cell
(the same bytes: stored once, then found "already stored"), bytes of a size
chosen per trial, a numpy array (out-of-band buffers), and two names sharing one
object. A restore is compared with :func:`fingerprint` through :data:`PROBE`.
"""

from __future__ import annotations

import hashlib
import random
import re

import numpy

CELL_NAME = re.compile(r"^([A-Z])_cell_(\d+)$")

#: Evaluated in a kernel: a summary of the namespace, compared with :func:`fingerprint`.
PROBE = """\
import hashlib
print('PROBE', repr({{
    'cells': sorted(n for n in globals() if n.startswith({line!r} + '_cell_')),
    'owner': globals().get('owner'),
    'step': globals().get('step'),
    'data': (lambda d: d if d is None or isinstance(d, int) else ('list', len(d), sum(d)))(globals().get('data')),
    'blob': hashlib.sha256(globals().get('blob', b'')).hexdigest()[:16],
    'arr': hashlib.sha256(globals()['arr'].tobytes()).hexdigest()[:16] if 'arr' in globals() else None,
    'text': globals().get('text'),
    'alias': (globals()['alias']['p'] is globals()['pair'], list(globals()['pair'])) if 'alias' in globals() else None,
}}))
"""


def cell_code(line: str, k: int, blob_size: int) -> str:
    """The cell that moves kernel ``line`` to state ``k``."""
    return (
        "import random, numpy\n"
        f"{line}_cell_{k} = {k}\n"
        f"owner = {line!r}; step = {k}\n"
        f"data = list(range(20000)) if {k} % 2 else {k}\n"
        f"blob = random.Random('{line}-{k}').randbytes({blob_size})\n"
        f"arr = numpy.arange({k} * 1000, dtype='int64')\n"
        f"text = '{line}-{k}-' * 50\n"
        f"pair = [{k}]; alias = {{'p': pair}}\n"
    )


def fingerprint(line: str, k: int, blob_size: int) -> dict:
    """What :data:`PROBE` prints after the state of ``cell_code(line, k, blob_size)``."""
    return {
        "cells": sorted(f"{line}_cell_{i}" for i in range(1, k + 1)),
        "owner": line,
        "step": k,
        "data": ("list", 20000, sum(range(20000))) if k % 2 else k,
        "blob": hashlib.sha256(random.Random(f"{line}-{k}").randbytes(blob_size)).hexdigest()[:16],
        "arr": hashlib.sha256(numpy.arange(k * 1000, dtype="int64").tobytes()).hexdigest()[:16],
        "text": f"{line}-{k}-" * 50,
        "alias": (True, [k]),
    }


def state_of(variables: dict) -> tuple[str, int] | None:
    """(line, k) a manifest's variable names hold; None if no trial state (a fresh kernel's cells)."""
    found = [(m.group(1), int(m.group(2))) for m in map(CELL_NAME.match, variables) if m]
    if not found:
        return None
    lines = {line for line, _ in found}
    if len(lines) > 1:
        raise ValueError(f"a snapshot mixes the states of kernels {sorted(lines)}")
    return found[0][0], max(k for _, k in found)

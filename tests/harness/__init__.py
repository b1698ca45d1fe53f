"""The test suite's one harness: real kernels, servers, browsers, S3 (moto), cloud simulators, waits.

Test modules import from here (never from one another); the fixtures live in
``harness.plugin``, which tests/conftest.py loads.
"""

from .faults import FaultPause
from .kernel import (
    SNAPSHOT_LINE,
    CellError,
    CellResult,
    Kernel,
    restored_execution_count,
    snapshot_line,
)
from .notebooks import Notebook, notebook_outputs, write_notebook
from .ports import free_port
from .servers import HTTPError, JupyterServer
from .wait import until, until_async

__all__ = [
    "SNAPSHOT_LINE",
    "CellError",
    "CellResult",
    "FaultPause",
    "HTTPError",
    "JupyterServer",
    "Kernel",
    "Notebook",
    "free_port",
    "notebook_outputs",
    "restored_execution_count",
    "snapshot_line",
    "until",
    "until_async",
    "write_notebook",
]

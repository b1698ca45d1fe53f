"""jupyter-spot: Jupyter sessions that survive spot-instance interruptions."""

from ._version import __version__

__all__ = ["__version__"]

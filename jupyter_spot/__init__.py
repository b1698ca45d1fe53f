"""jupyter-spot: Jupyter sessions that survive spot-instance interruptions."""

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension lives (for ``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "jupyter-spot"}]


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """The server extension (imported only when jupyter_server loads it)."""
    from .server.app import SpotApp

    return [{"module": "jupyter_spot", "app": SpotApp}]

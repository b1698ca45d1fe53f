"""Hold a process at one of jupyter_spot.faults' named points, and let it go when the test says."""

from __future__ import annotations

from pathlib import Path

from .wait import until


class FaultPause:
    """``pause:DIR`` for ``points``: ``env`` goes to the process under test; ``reached`` waits
    until it is held at a point (its pid), ``release`` lets it go on."""

    def __init__(self, folder: Path, *points: str, hit: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        spec = ";".join(f"{point}=pause:{folder}{'@' + hit if hit else ''}" for point in points)
        self.env = {"JUPYTER_SPOT_FAULTS": spec}

    def reached(self, point: str, timeout: float = 120) -> int:
        marker = self.folder / f"{point}.reached"
        until(lambda: marker.exists() and marker.read_text(), timeout, f"a process to reach fault point {point}")
        return int(marker.read_text())

    def release(self, point: str) -> None:
        (self.folder / f"{point}.release").touch()

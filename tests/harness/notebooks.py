"""Notebooks on disk: the regression notebooks' annotations, and small notebooks for server tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nbformat


@dataclass
class Notebook:
    """A notebook's code cells plus the test annotations kept in its metadata.

    ``unstorable`` maps a variable that cannot be snapshotted to the (1-based) code
    cell that creates it; ``uses[i]`` lists such variables cell ``i`` reads.
    """

    name: str
    cells: list[str]
    unstorable: dict[str, int] = field(default_factory=dict)
    uses: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Notebook:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        meta = nb.metadata.get("jupyter_spot_test", {})
        uses = {
            i: list(c.metadata["jupyter_spot_test"]["uses"])
            for i, c in enumerate(code, start=1)
            if "jupyter_spot_test" in c.metadata
        }
        return cls(path.stem, [c.source for c in code], dict(meta.get("unstorable", {})), uses)

    def unstorable_at(self, cut: int) -> set[str]:
        """Variables that could not be stored in a snapshot taken after cell ``cut``."""
        return {name for name, cell in self.unstorable.items() if cell <= cut}


def write_notebook(path: Path, *sources: str) -> None:
    """A notebook on disk with these code cells and no outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def notebook_outputs(path: Path) -> str:
    """Every text output saved in a notebook on disk, joined."""
    nb = nbformat.read(path, as_version=4)
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or json.dumps(output.get("data", {})))
    return "\n".join(texts)

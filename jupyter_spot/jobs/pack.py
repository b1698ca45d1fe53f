"""Named values ↔ blobs in the store: a job's inputs, its outputs and its checkpoints.

The same serializer as snapshots (pickle protocol 5 with out-of-band array
buffers, dill for what pickle refuses), so what a snapshot can hold a job can
take or give back. Modules travel by name and are re-imported; functions and
classes defined in the notebook (or in the job) travel by value and are loaded
first, so data that refers to them finds them by name.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any

from ..kernel import serialize
from ..store import Store


class CannotSend(Exception):
    """Some values cannot be serialized; ``problems`` maps each name to why."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name} ({why})" for name, why in problems.items()))


def _is_definition(value: Any) -> bool:
    """A function or class defined in ``__main__`` (the notebook, or the job itself)."""
    return getattr(value, "__module__", None) == "__main__" and isinstance(value, types.FunctionType | type)


def _put(store: Store, pickled: serialize.Pickled) -> dict[str, Any]:
    def put(data: Any) -> str:
        return store.add_blob(data)[0]

    return {"serializer": pickled.serializer, "blob": put(pickled.payload),
            "buffers": [put(buffer) for buffer in pickled.buffers], "size": pickled.size}


@dataclass
class Dumped:
    """Values pickled in memory, not yet written."""

    modules: dict[str, str]  # name → module name
    definitions: dict[str, serialize.Pickled]
    data_names: list[str]
    group: serialize.Pickled | None


def dump(values: dict[str, Any]) -> Dumped:
    """Pickle ``values`` in memory: modules by name, definitions by value, the rest as one group.

    Raises CannotSend naming every value that cannot be pickled, before anything is written.
    """
    modules = {name: value.__name__ for name, value in values.items() if isinstance(value, types.ModuleType)}
    definitions = {name: value for name, value in values.items() if _is_definition(value)}
    data = {name: value for name, value in values.items() if name not in modules and name not in definitions}
    refs = {id(value): name for name, value in definitions.items()}
    problems: dict[str, str] = {}
    pickled_definitions: dict[str, serialize.Pickled] = {}
    for name, value in definitions.items():
        try:
            others = {key: other for key, other in refs.items() if key != id(value)}
            pickled_definitions[name] = serialize.dump({name: value}, others, definitions=True)
        except serialize.Unserializable as error:
            problems[name] = str(error)
    group = None
    if data:
        try:
            # One group, so variables sharing an object (b = a, views) still share it after loading.
            group = serialize.dump(data, refs)
        except serialize.Unserializable:
            for name, value in data.items():  # find the culprits, to name them
                try:
                    serialize.dump({name: value}, refs)
                except serialize.Unserializable as error:
                    problems[name] = str(error)
            if not problems:
                raise
    if problems:
        raise CannotSend(problems)
    return Dumped(modules, pickled_definitions, list(data), group)


def write(store: Store, dumped: Dumped) -> dict[str, Any]:
    """Store what ``dump`` made as content-addressed blobs; the JSON-able description."""
    return {
        "modules": dumped.modules,
        "definitions": {name: _put(store, pickled) for name, pickled in dumped.definitions.items()},
        "data_names": dumped.data_names,
        "data": None if dumped.group is None else _put(store, dumped.group),
    }


def pack(store: Store, values: dict[str, Any]) -> dict[str, Any]:
    """``write(store, dump(values))``."""
    return write(store, dump(values))


def blob_keys(packed: dict[str, Any]) -> list[str]:
    """Every blob a packed description names: a record lists them under ``blobs`` so GC keeps them."""
    parts = [*packed["definitions"].values(), *([packed["data"]] if packed["data"] else [])]
    return [digest for part in parts for digest in [part["blob"], *part["buffers"]]]


def names(packed: dict[str, Any]) -> list[str]:
    """Every name a packed description holds (without loading anything)."""
    return [*packed["modules"], *packed["definitions"], *packed["data_names"]]


def load(store: Store, packed: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """The packed values, loaded with references to definitions resolved in ``namespace``.

    Every blob is read (and verified) before anything is unpickled; definitions
    are put into ``namespace`` as they load, because the data group refers to them.
    """
    parts = [*packed["definitions"].values(), *([packed["data"]] if packed["data"] else [])]
    blobs = {digest: store.get_blob(digest) for part in parts for digest in [part["blob"], *part["buffers"]]}
    loaded: dict[str, Any] = {name: importlib.import_module(module) for name, module in packed["modules"].items()}

    def unpickle(part: dict[str, Any]) -> dict[str, Any]:
        return serialize.load(blobs[part["blob"]], [blobs[d] for d in part["buffers"]], part["serializer"], namespace)

    for part in packed["definitions"].values():
        values = unpickle(part)
        namespace.update(values)
        loaded.update(values)
    if packed["data"]:
        loaded.update(unpickle(packed["data"]))
    return loaded

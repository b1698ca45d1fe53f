"""Change tracking and serialization units: which names a cell may touch, what
groups variables form, and how arrays travel (no kernel needed)."""

from __future__ import annotations

import io
import pickle
import types

import numpy as np
import pandas as pd
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from jupyter_spot.kernel import serialize, tracking

transform = TransformerManager().transform_cell


@pytest.mark.parametrize(
    ("cell", "names"),
    [
        ("a[0] = 1", {"a"}),
        ("df.loc[3, 'x'] = est.fit(X).score(X)", {"df", "est", "X"}),
        ("import numpy as np\nfrom os import path as p", {"np", "p"}),
        ("def f():\n    global counter\n    counter += 1", {"f", "counter"}),
        ("%time a[0] = 1", {"a", "get_ipython"}),
        ("%%timeit\nb.append(1)\n", {"b", "get_ipython"}),
        ("%%bash\necho hi", {"get_ipython"}),
    ],
)
def test_cell_names(cell: str, names: set[str]) -> None:
    assert tracking.cell_names(transform(cell)) == names


@pytest.mark.parametrize("cell", ["x = globals()['y']", "exec('y = 2')", "%run script.py", "vars()['z'] = 1"])
def test_dynamic_cells_mean_everything(cell: str) -> None:
    assert tracking.cell_names(transform(cell)) is None


def test_notebook_code_reaches_the_globals_it_uses() -> None:
    namespace: dict = {"__name__": "__main__"}
    exec(
        "counter = []\nlog = {}\nunused = 1\n"
        "def helper():\n    log['n'] = len(counter)\n"
        "def bump():\n    counter.append(1)\n    helper()\n"
        "class Model:\n    def fit(self):\n        counter.append(2)\n"
        "model = Model()",
        namespace,
    )
    for value in namespace.values():
        if isinstance(value, types.FunctionType | type):
            value.__module__ = "__main__"
    reached = tracking.reachable_names({"bump"}, namespace)
    assert reached is not None and reached & namespace.keys() == {"bump", "counter", "helper", "log"}
    reached = tracking.reachable_names({"model"}, namespace)
    assert reached is not None and reached & namespace.keys() == {"model", "counter"}
    exec("def sneaky():\n    globals()['x'] = 1", namespace)
    namespace["sneaky"].__module__ = "__main__"
    assert tracking.reachable_names({"sneaky"}, namespace) is None


def test_user_names_leave_out_ipython_history() -> None:
    namespace = {"In": [], "Out": {}, "_": 1, "__": 2, "_i3": "x", "_7": 3, "_ih": [], "data": 1, "_private": 2}
    assert tracking.user_names(namespace, hidden={}) == ["data", "_private"]


def test_views_keep_sharing_memory_with_their_base() -> None:
    base = np.arange(100_000, dtype=np.float64)
    values = {"base": base, "view": base[10:20], "strided": base[::7], "grid": base.reshape(1000, 100)[:, 3]}
    pickled = serialize.dump(values, {})
    assert [b.nbytes for b in pickled.buffers] == [base.nbytes]  # the base once, out of band, not the views
    restored = serialize.load(pickled.payload, [bytearray(b) for b in pickled.buffers], "pickle", {})
    for name in ("view", "strided", "grid"):
        assert np.shares_memory(restored["base"], restored[name])
        np.testing.assert_array_equal(restored[name], values[name])
    restored["base"][10] = -1
    assert restored["view"][0] == -1


def test_unrelated_frames_do_not_share_a_group() -> None:
    df = pd.DataFrame({"x": np.arange(1000), "y": np.ones(1000)})
    other = df.copy()
    column = df["x"]
    reached = {name: serialize.dump({name: v}, {}).reached for name, v in {"df": df, "o": other, "c": column}.items()}
    assert not reached["df"].keys() & reached["o"].keys()  # same index labels and dtypes are not sharing
    assert reached["df"].keys() & reached["c"].keys()  # a column shares its frame's memory: one group
    assert not reached["o"].keys() & reached["c"].keys()  # …but not the copy's


def test_refused_objects_say_why() -> None:
    with open(__file__) as handle, pytest.raises(serialize.Unserializable, match="open file or stream"):
        serialize.dump({"handle": handle}, {})
    with pytest.raises(serialize.Unserializable, match="generator or coroutine"):
        serialize.dump({"gen": (i for i in range(3))}, {})


def test_notebook_definitions_are_referenced_by_name() -> None:
    def helper(x: int) -> int:
        return x + 1

    pickled = serialize.dump({"table": {"f": helper}}, {id(helper): "helper"})
    assert pickled.serializer == "pickle"
    restored = serialize.load(pickled.payload, [], "pickle", {"helper": len})
    assert restored["table"]["f"] is len  # resolved in the namespace being restored
    with pytest.raises(Exception, match="refers to 'helper', which was not restored"):
        serialize.load(pickled.payload, [], "pickle", {})


def _pickle_with(pickler_class: type, values: dict) -> tuple[bytes, list[bytes], dict[int, object]]:
    out, buffers = io.BytesIO(), []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < serialize.OUT_OF_BAND_MIN:
            return True
        buffers.append(bytes(buffer.raw()))
        return False

    pickler = pickler_class(out, {}, keep)
    pickler.dump(values)
    if isinstance(pickler, serialize.FastCPickler):
        assert pickler.finish()
    return out.getvalue(), buffers, pickler.reached


def test_the_fast_pickle_writes_and_reaches_what_the_hooked_one_does() -> None:
    """FastCPickler (no Python call per object) stands in for CPickler on data: same bytes, same sharing."""
    shared = [1, 2, 3]
    base = np.arange(50_000, dtype=np.float64)
    values = {
        "rows": [{"id": i, "name": f"row-{i}", "tags": shared} for i in range(2000)],
        "base": base, "view": base[100:200], "frame": pd.DataFrame({"x": np.arange(10_000)}),
        "mixed": (1, 2.5, "s", b"small", None, True, {3, 4}, frozenset({5}), bytearray(b"ab")),
    }
    fast, slow = _pickle_with(serialize.FastCPickler, values), _pickle_with(serialize.CPickler, values)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    # Reducers build temporary objects (a frame's state) anew each pickle; compare what the values hold.
    held = {id(shared), id(base), id(values["rows"]), *(id(row) for row in values["rows"])}
    assert held <= fast[2].keys() and fast[2].keys() & held == slow[2].keys() & held
    pickled = serialize.dump(values, {})
    assert not pickled.watched and id(shared) in pickled.reached


def test_what_only_python_hooks_write_falls_back_to_them() -> None:
    """A notebook definition (written as a reference) or a big bytes (sent out of band) needs CPickler."""

    def helper(x: int) -> int:
        return x + 1

    rows = [{"id": i} for i in range(1000)]
    by_name = serialize.dump({"rows": rows, "table": {"f": helper}}, {id(helper): "helper"})
    assert by_name.serializer == "pickle" and by_name.watched and id(rows[7]) in by_name.reached
    assert serialize.load(by_name.payload, [], "pickle", {"helper": len})["table"]["f"] is len
    class Point:  # a class of the notebook: its instances refer to it by name
        def __init__(self, x: int) -> None:
            self.x = x

    points = serialize.dump({"points": [Point(1), Point(2)]}, {id(Point): "Point"})
    assert points.watched
    assert all(type(p) is Point for p in serialize.load(points.payload, [], "pickle", {"Point": Point})["points"])
    blob = b"x" * serialize.OUT_OF_BAND_MIN
    big = serialize.dump({"images": [blob, blob]}, {})
    assert big.watched and [b.nbytes for b in big.buffers] == [len(blob)]
    restored = serialize.load(big.payload, [bytearray(b) for b in big.buffers], "pickle", {})
    assert restored["images"] == [blob, blob]
    # told the values needed the hooks last time, dump starts with them and says so again
    again = serialize.dump({"rows": rows, "table": {"f": helper}}, {id(helper): "helper"}, watch=True)
    assert again.payload == by_name.payload and again.watched
    assert not serialize.dump({"rows": rows}, {}, watch=True).watched  # no longer needed: the hint clears


def test_definition_source_finds_the_latest_definition_with_its_decorators() -> None:
    cells = [
        "x = 1\n@functools.lru_cache\ndef cached(n):\n    return n * 2\ny = 2\n",
        "def cached(n):\n    return n\n",
    ]
    assert tracking.definition_source("cached", cells) == "@functools.lru_cache\ndef cached(n):\n    return n * 2\n"
    assert tracking.definition_source("Missing", cells) is None
    assert tracking.definition_source("cached", ["this is not python", cells[1]]) == cells[1]


def test_shared_objects_group_variables_incrementally() -> None:
    inner, other = [1], [2]
    shared = tracking.SharedObjects()
    shared.set("a", {id(inner): inner})
    shared.set("d", {id(inner): inner, id(other): other})
    shared.set("x", {id(other): other})
    shared.set("lonely", {})
    assert shared.groups(["a", "d", "x", "lonely"]) == [["a", "d", "x"], ["lonely"]]
    shared.set("d", {id(other): other})  # d no longer holds inner: a goes its own way
    assert shared.groups(["a", "d", "x", "lonely"]) == [["a"], ["d", "x"], ["lonely"]]
    shared.discard("x")
    shared.discard("a")
    shared.set("b", {id(inner): inner})
    assert shared.groups(["d", "b", "lonely"]) == [["d"], ["b"], ["lonely"]]
    shared.set("a", {id(inner): inner})
    assert shared.groups(["d", "b", "a"]) == [["d"], ["b", "a"]]


def test_views_of_restored_arrays_keep_sharing_through_a_second_snapshot() -> None:
    base = np.arange(100_000, dtype=np.float64)
    first = serialize.dump({"base": base, "view": base[5:50]}, {})
    restored = serialize.load(first.payload, [bytearray(b) for b in first.buffers], "pickle", {})
    again = serialize.dump(restored, {})  # the restored base sits on the store's buffer, not on an ndarray
    twice = serialize.load(again.payload, [bytearray(b) for b in again.buffers], "pickle", {})
    assert np.shares_memory(twice["base"], twice["view"])
    assert [b.nbytes for b in again.buffers] == [base.nbytes]

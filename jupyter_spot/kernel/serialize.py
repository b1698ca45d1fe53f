"""Turning groups of variables into bytes and back.

Pickle protocol 5 with out-of-band buffers: large array buffers (numpy, pandas,
arrow) are handed to us as ``PickleBuffer`` views instead of being copied into
the pickle, so each becomes its own content-addressed blob (cut into chunks,
kernel/chunks.py) — hashed and written straight from the array's memory, and
restored from the store's writable buffer without another copy. Big ``bytes``
and ``bytearray`` objects, which pickle keeps in band, are sent out of band too.

The C pickler goes first because it is fast. Objects it cannot take (lambdas,
closures, classes that are not the top-level binding of their name, …) send the
group to dill, whose pickles are slower but handle code defined in the notebook.
Notebook functions and classes bound at top level are stored by value once, in
their own group, and everywhere else as a persistent reference to their name,
so after a restore instances belong to the restored class and every reference
to a function is the restored function.
"""

from __future__ import annotations

import collections
import enum
import io
import itertools
import operator
import pickle
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import dill
import xxhash

#: Buffers smaller than this stay inside the pickle: a blob per tiny array
#: would cost more in files and manifest entries than it saves.
OUT_OF_BAND_MIN = 64 << 10

#: Marks a persistent id that carries a ``bytes``/``bytearray`` out of band.
#: Pickle keeps those in the pickle itself; this way they are chunked like arrays.
BIG_BYTES = "jupyter-spot-bytes"

PROTOCOL = 5

#: Streams whose contents live in the process: stored like any other data.
IN_MEMORY_BUFFERS = (io.StringIO, io.BytesIO)


class Unserializable(Exception):
    """Neither pickler can store this object; the message says why."""


def _refusal(obj_type: type) -> str | None:
    """Why objects of this type must not be stored even if a pickler would try.

    dill can pickle an open file by reopening it on load — for a file open for
    writing that truncates it — so files are refused rather than "restored".
    In-memory buffers (``io.StringIO``, ``io.BytesIO``) are data: they pickle
    with their contents and position.
    """
    if issubclass(obj_type, IN_MEMORY_BUFFERS):
        return None
    if issubclass(obj_type, io.IOBase):
        return "open file or stream: reopen it after restore"
    if issubclass(obj_type, types.GeneratorType | types.CoroutineType | types.AsyncGeneratorType):
        return "generator or coroutine: its paused frame cannot be stored"
    if issubclass(obj_type, types.FrameType | types.TracebackType):
        return "interpreter frame or traceback"
    return None


def _is_pandas_index(obj_type: type) -> bool:
    return any(
        klass.__name__ == "Index" and klass.__module__.startswith("pandas") for klass in getattr(obj_type, "__mro__", ())
    )


def _rebuild_view(root: Any, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: Any) -> Any:
    """A numpy view into ``root``'s memory, as it was before pickling."""
    import numpy as np

    flat = root.reshape(-1, order="A").view(np.uint8)
    return np.ndarray(shape, dtype=dtype, buffer=flat, offset=offset, strides=strides)


def _reduce_view(array: Any) -> Any:
    """Pickle a numpy view as (its owning array, where it looks), so that after
    a restore it still shares memory with the base — numpy alone would copy it."""
    import numpy as np

    # The owner is the last ndarray down the base chain. Below it may lie a
    # non-array buffer (a restored array sits on the store's bytes): walking
    # into that would make us copy the view and lose the sharing.
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if (
        root is array
        or type(root) is not np.ndarray
        or root.dtype.hasobject
        or array.dtype.hasobject
        or not (root.flags.c_contiguous or root.flags.f_contiguous)
    ):
        return NotImplemented
    offset = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    if offset < 0 or offset > root.nbytes:
        return NotImplemented
    return _rebuild_view, (root, offset, array.shape, array.strides, array.dtype)


class _NeedsHooks(Exception):
    """The fast pass met what only a Python ``persistent_id`` writes right: pickle again with it."""


class _Hooks:
    """What every pickler shares: view handling, refusals, big bytes out of band."""

    _main_refs: dict[int, str]
    _type_decisions: dict[type, Any]

    def _setup(self, main_refs: dict[int, str]) -> None:
        self._main_refs = main_refs
        self._type_decisions = {}
        self._shareable: dict[type, bool] = {}
        self._big_bytes: dict[int, int] = {}  # id of a big bytes/bytearray → its number in this pickle
        self.immutable_ids: set[int] = set()
        self.reached: dict[int, Any] = {}

    def reducer_override(self, obj: Any) -> Any:
        if id(obj) in self._main_refs:
            # Only FastCPickler gets here with one: the others' persistent_id wrote it as a reference.
            raise _NeedsHooks
        obj_type = type(obj)
        decision = self._type_decisions.get(obj_type)
        if decision is None:
            decision = _refusal(obj_type) or ""
            if not decision and obj_type.__module__ == "numpy" and obj_type.__name__ == "ndarray":
                decision = "ndarray"
            elif not decision and _is_pandas_index(obj_type):
                decision = "index"
            self._type_decisions[obj_type] = decision
        if decision == "":
            return NotImplemented
        if decision == "ndarray":
            return NotImplemented if obj.base is None else _reduce_view(obj)
        if decision == "index":
            # An Index is immutable and shared between frames; its arrays
            # must not make those frames one group.
            data = getattr(obj, "_data", None)
            self.immutable_ids.update(id(x) for x in (data, getattr(data, "_ndarray", None)) if x is not None)
            return NotImplemented
        raise Unserializable(f"{obj_type.__module__}.{obj_type.__qualname__}: {decision}")

    def _is_shareable(self, obj_type: type) -> bool:
        shareable = self._shareable.get(obj_type)
        if shareable is None:
            shareable = self._shareable[obj_type] = _shareable_type(obj_type)
        return shareable


class _Watching(_Hooks):
    """Hooks that see every object pickled, in a Python ``persistent_id``."""

    #: It wrote a persistent id (a notebook definition, big bytes): FastCPickler could not have.
    needed = False

    def persistent_id(self, obj: Any) -> str | None:
        """Called for every object pickled: the cheapest place to see what a variable reaches."""
        key = id(obj)
        # A notebook function or class bound at top level is restored first,
        # on its own; everyone else refers to it by name.
        name = self._main_refs.get(key)
        if name is not None:
            self.needed = True
            return name
        obj_type = type(obj)
        shareable = self._shareable.get(obj_type)  # _is_shareable inlined: this runs per object
        if shareable is None:
            shareable = self._is_shareable(obj_type)
        if shareable:
            self.reached[key] = obj
        if (obj_type is bytes or obj_type is bytearray) and len(obj) >= OUT_OF_BAND_MIN:
            return self._out_of_band(key, obj)
        return None

    def _out_of_band(self, key: int, obj: bytes | bytearray) -> tuple[Any, ...]:
        """A big ``bytes``/``bytearray`` as a persistent id holding a PickleBuffer: it goes out
        of band. Met again in the same pickle, only its number, so a bytearray stays one object."""
        self.needed = True
        number = self._big_bytes.get(key)
        if number is not None:
            return (BIG_BYTES, number)
        number = self._big_bytes[key] = len(self._big_bytes)
        return (BIG_BYTES, number, type(obj).__name__, pickle.PickleBuffer(obj))


class FastCPickler(_Hooks, pickle.Pickler):
    """The C pickler with no Python call per object; tried first.

    Its ``persistent_id`` is a list's ``append``, in C: it returns None (no
    reference) for everything and keeps every object met, in the order
    :class:`CPickler`'s Python ``persistent_id`` would see them. Afterwards a
    few passes over that list in C (``map``, ``compress``) find what the value
    reaches — for 300k small dicts 0.35 s instead of 0.7 s. Where the two
    picklers would write different bytes — a notebook definition (seen by
    ``reducer_override``, which raises) or a big ``bytes`` (found in the list)
    — :meth:`finish` says so and the caller pickles again with :class:`CPickler`.
    """

    def __init__(self, file: Any, main_refs: dict[int, str], buffer_callback: Any) -> None:
        self.met: list[Any] = []
        # Set before __init__, which reads it (Python 3.11: a C setter; 3.13: an attribute).
        self.persistent_id = self.met.append
        pickle.Pickler.__init__(self, file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._setup(main_refs)

    def finish(self) -> bool:
        """Fill ``reached`` from the objects met; False if :class:`CPickler` must pickle again."""
        met, self.met = self.met, []
        table = _TypeTable(self._is_shareable)
        kept = list(itertools.compress(met, map(table.__getitem__, map(type, met))))
        if table.saw_bytes:
            sizes = map(len, itertools.compress(met, map(_BYTES.__contains__, map(type, met))))
            if max(sizes, default=0) >= OUT_OF_BAND_MIN:
                return False
        self.reached = dict(zip(map(id, kept), kept))
        return True


class _TypeTable(dict):  # type: ignore[type-arg]
    """Type → whether its objects count as shared: ``decide`` runs once per type, in
    ``__missing__``; every other lookup is the dict's own, in C."""

    def __init__(self, decide: Any) -> None:
        super().__init__()
        self.decide = decide
        self.saw_bytes = False

    def __missing__(self, kind: type) -> bool:
        self.saw_bytes = self.saw_bytes or kind in _BYTES
        decision = self[kind] = self.decide(kind)
        return decision


class CPickler(_Watching, pickle.Pickler):
    def __init__(self, file: Any, main_refs: dict[int, str], buffer_callback: Any) -> None:
        pickle.Pickler.__init__(self, file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._setup(main_refs)


class DillPickler(_Watching, dill.Pickler):
    def __init__(self, file: Any, main_refs: dict[int, str], buffer_callback: Any) -> None:
        dill.Pickler.__init__(self, file, protocol=PROTOCOL, buffer_callback=buffer_callback, recurse=False)
        self._main = sys.modules["__main__"]
        self._setup(main_refs)


@dataclass
class Pickled:
    """One group (or variable) as bytes: the pickle plus its out-of-band buffers."""

    payload: bytes
    buffers: list[memoryview]
    serializer: str  # "pickle" | "dill" | "source"
    reached: dict[int, Any] = field(default_factory=dict)
    #: Only a pickler with a Python ``persistent_id`` could pickle it (it reaches a notebook
    #: definition or a big ``bytes``, or needed dill): the next dump may start there.
    watched: bool = False

    @property
    def size(self) -> int:
        return len(self.payload) + sum(b.nbytes for b in self.buffers)


_CONTAINERS = frozenset({list, dict, set, bytearray})
_BYTES = frozenset({bytes, bytearray})


def _shareable_type(obj_type: type) -> bool:
    """Whether two variables reaching an object of this type must be stored together.

    Immutable values, functions, classes and library singletons (numpy and
    pandas dtypes, pandas indexes) are shared all the time without it
    mattering; counting them would glue the whole namespace into one group.
    """
    if obj_type in _CONTAINERS:
        return True
    if obj_type.__module__ == "numpy":
        return obj_type.__name__ == "ndarray"
    if issubclass(obj_type, type | types.ModuleType | enum.Enum):
        return False
    mro = [klass for klass in obj_type.__mro__ if klass is not object]
    if any(not isinstance(vars(klass).get("__qualname__", ""), str) for klass in mro):
        return False  # function-like: pickled by name
    module = obj_type.__module__ or ""
    if module.startswith("pandas") and obj_type.__name__.endswith(("Index", "Dtype")):
        return False  # immutable, and shared by every frame derived from another
    return getattr(obj_type, "__dictoffset__", 0) != 0 or any("__slots__" in vars(klass) for klass in mro)


def _reached(pickler: _Hooks, values: Any) -> dict[int, Any]:
    """The objects a pickle reached that may be shared with other variables, by id.

    They are returned (not only their ids) so the caller keeps them alive:
    reducers build temporary objects (state dicts, argument lists) whose ids
    would otherwise be reused by unrelated objects later and glue unrelated
    variables together. An empty container (a class-level ``[]`` default) is
    not worth a group.
    """
    reached = pickler.reached
    reached.pop(id(values), None)
    for key in pickler.immutable_ids:
        reached.pop(key, None)
    # in C, not a comprehension: a list of 300k dicts reaches 300k objects
    objects = list(reached.values())
    containers = list(itertools.compress(objects, map(_CONTAINERS.__contains__, map(type, objects))))
    empty = itertools.compress(containers, map(operator.not_, containers))
    collections.deque(map(reached.pop, map(id, empty)), maxlen=0)  # pops each, keeps none
    return reached


def dump(values: dict[str, Any], main_refs: dict[int, str], *, definitions: bool = False,
         watch: bool = False) -> Pickled:
    """Pickle ``values`` (name → object) together; raise Unserializable if impossible.

    ``main_refs`` (object id → top-level name) are written as references.
    ``definitions``: the values are notebook functions/classes themselves, so
    dill pickles them by value (callers leave them out of ``main_refs``).
    ``watch``: skip :class:`FastCPickler`, as the last pickle of these values needed
    a Python ``persistent_id`` (``Pickled.watched``) and the fast pass would be wasted.
    """
    errors: list[str] = []
    attempts = (("dill", DillPickler),) if definitions else (
        (("pickle", FastCPickler),) * (not watch) + (("pickle", CPickler), ("dill", DillPickler)))
    fast_failed = False
    for serializer, pickler_class in attempts:
        if pickler_class is CPickler and fast_failed:
            continue  # it would fail the same way: on to dill
        buffers: list[memoryview] = []

        def keep_buffer(buffer: pickle.PickleBuffer, buffers: list[memoryview] = buffers) -> bool:
            raw = buffer.raw()
            if raw.nbytes < OUT_OF_BAND_MIN:
                return True  # in-band
            buffers.append(raw)
            return False

        out = io.BytesIO()
        pickler = pickler_class(out, main_refs, keep_buffer)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dill warns on stderr, i.e. into the user's cell output
                pickler.dump(values)
        except _NeedsHooks:
            continue
        except Unserializable as error:
            raise Unserializable(str(error)) from None
        except Exception as error:  # picklers raise anything a __reduce__ raises
            message = "too deeply nested" if isinstance(error, RecursionError) else f"{type(error).__name__}: {error}"
            if message not in errors:
                errors.append(message)
            fast_failed = pickler_class is FastCPickler
            continue
        if isinstance(pickler, FastCPickler) and not pickler.finish():
            continue
        pickled = Pickled(out.getvalue(), buffers, serializer, _reached(pickler, values),
                          watched=serializer == "dill" or getattr(pickler, "needed", False))
        if definitions and not _rebuilds_by_value(pickled, values):
            raise Unserializable("dill can only refer to it by name, which a new kernel does not have")
        return pickled
    raise Unserializable("; ".join(errors))


class _Oversize(Exception):
    """A fingerprint's pickle grew past its limit."""


class _HashingSink:
    """A pickler's file that hashes what it is given, keeps none of it, and stops at ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.hash = xxhash.xxh3_128()
        self.left = limit

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.left -= size
        if self.left < 0:
            raise _Oversize
        self.hash.update(data)
        return size


def fingerprint(values: dict[str, Any], limit: int) -> str | None:
    """A hash of ``values``' plain pickle, out-of-band buffers hashed apart; None if it cannot tell.

    Equal only if their contents are: an explicit snapshot re-checks a group no
    cell named this way instead of pickling it again with our hooks, which call
    back into Python for every object. The pickler runs without its memo ("fast"
    mode, ~3x faster on a list of small dicts; benchmarks/README.md) and streams
    into the hash. Without a memo it cannot see which objects are shared, only
    their contents; an object repeated by reference is written out each time, so
    past ``limit`` bytes, or on a cycle, it gives up (None) and the caller pickles
    the group for real.
    """
    buffers = xxhash.xxh3_128()

    def hash_buffer(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickled in band
            return True
        buffers.update(xxhash.xxh3_128_digest(raw))
        return False

    sink = _HashingSink(limit)
    pickler = pickle.Pickler(sink, protocol=PROTOCOL, buffer_callback=hash_buffer)
    pickler.fast = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pickler.dump(values)
    except Exception:  # too big, a cycle, anything a __reduce__ raises: the caller pickles the group for real
        return None
    return f"{sink.hash.hexdigest()}-{buffers.hexdigest()}"


def _rebuilds_by_value(pickled: Pickled, values: dict[str, Any]) -> bool:
    """Whether loading the pickle makes new objects rather than finding these by name.

    dill falls back to a reference (``__main__.Color``) for what it cannot
    rebuild (enums, ``lru_cache`` wrappers): useless in a new kernel.
    """
    unpickler = dill.Unpickler(io.BytesIO(pickled.payload), buffers=pickled.buffers)
    unpickler._main = sys.modules["__main__"]  # type: ignore[attr-defined]
    unpickler.persistent_load = lambda name: None  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = unpickler.load()
    except Exception:
        return False
    return all(loaded.get(name) is not value for name, value in values.items())


def source_pickle(source: str) -> Pickled:
    """A notebook definition kept as the code that defines it, re-run on restore."""
    return Pickled(source.encode(), [], "source", {})


def _load_big_bytes(pid: tuple[Any, ...], loaded: dict[int, bytes | bytearray]) -> bytes | bytearray:
    """The bytes or bytearray a BIG_BYTES persistent id carries (or, met again, the one loaded before)."""
    if len(pid) == 2 and pid[1] in loaded:
        return loaded[pid[1]]
    if len(pid) != 4 or pid[2] not in ("bytes", "bytearray"):
        raise pickle.UnpicklingError("malformed out-of-band bytes reference")
    _, number, kind, buffer = pid
    value = bytes(buffer) if kind == "bytes" else bytearray(buffer)
    loaded[number] = value
    return value


def load(payload: Any, buffers: list[Any], serializer: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Unpickle a group; references to top-level notebook definitions resolve in ``namespace``."""

    big_bytes: dict[int, bytes | bytearray] = {}

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == (BIG_BYTES,):
            return _load_big_bytes(pid, big_bytes)
        try:
            return namespace[pid]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"it refers to {str(pid)[:100]!r}, which was not restored") from None

    if serializer == "source":
        exec(compile(bytes(payload).decode(), "<jupyter-spot restored definition>", "exec"), namespace)
        return {}
    if serializer == "dill":
        unpickler: pickle.Unpickler = dill.Unpickler(io.BytesIO(payload), buffers=buffers)
        unpickler._main = sys.modules["__main__"]  # type: ignore[attr-defined]
    elif serializer == "pickle":
        unpickler = pickle.Unpickler(io.BytesIO(payload), buffers=buffers)
    else:
        raise pickle.UnpicklingError(f"unknown serializer {serializer!r}")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    values = unpickler.load()
    if not isinstance(values, dict):
        raise pickle.UnpicklingError("group blob does not hold a namespace")
    return values

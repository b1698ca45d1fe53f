"""Which variables a cell may have changed, found without looking at their data.

A name can change in two ways: it is rebound (its object's id changes — cheap
to see for every name) or its object is mutated in place (``a[0] = 1``,
``df.loc[…] = …``, ``est.fit(X)``). In-place mutation needs a reference, so
it can only reach objects named in the cell's code, or in the code of the
notebook functions and classes the cell uses (followed transitively). Those
names are re-checked; every other group is reused as it was. Code that reaches
the namespace dynamically (``globals()``, ``exec``) makes us check everything.
"""

from __future__ import annotations

import ast
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any

#: Names IPython itself keeps in the namespace (output history and friends).
_IPYTHON_NAME = re.compile(r"^(_+|_i+|_i?\d+|_[dio]h|In|Out|exit|quit|get_ipython|__.*__)$")

#: Calls that read or write the namespace by string: anything may have changed.
_DYNAMIC = frozenset({"globals", "vars", "exec", "eval", "locals"})

#: Magics that run code we cannot see (a script, a stored variable, a reload).
_DYNAMIC_MAGICS = frozenset({"run", "store", "autoreload", "aimport", "load", "macro", "rerun", "recall", "reset"})


def user_names(namespace: Mapping[str, Any], hidden: Mapping[str, Any]) -> list[str]:
    """The names the user made, not IPython's history or injected helpers."""
    names = []
    for name, value in namespace.items():
        if _IPYTHON_NAME.match(name):
            continue
        if name in hidden and hidden[name] is value:
            continue
        names.append(name)
    return names


def _magic_names(call: ast.Call, names: set[str]) -> bool:
    """Names in a magic's code argument (``%time a[0] = 1``); False if the magic is dynamic."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr in ("run_line_magic", "run_cell_magic")):
        return True
    args = [arg.value for arg in call.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    if args and args[0] in _DYNAMIC_MAGICS:
        return False
    for text in args[1:]:
        inner = cell_names(text)
        if inner is None:
            return False
        names |= inner
    return True


def cell_names(source: str) -> set[str] | None:
    """Every identifier the (IPython-transformed) cell mentions; None if it is dynamic."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()  # the cell did not run, or a magic's argument is not Python (%%bash)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not _magic_names(node, names):
            return None
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return None if names & _DYNAMIC else names


def _code_names(code: types.CodeType, into: set[str]) -> None:
    into.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, into)


def _notebook_code(value: Any) -> list[types.CodeType]:
    """The code objects of a notebook-defined function, class or instance."""
    target = value
    if isinstance(value, types.MethodType):
        target = value.__func__
    if isinstance(target, types.FunctionType):
        return [target.__code__] if target.__module__ == "__main__" else []
    cls = target if isinstance(target, type) else type(target)
    codes = []
    for klass in getattr(cls, "__mro__", ()):
        if getattr(klass, "__module__", None) != "__main__":
            continue
        for attr in vars(klass).values():
            func = getattr(attr, "__func__", attr)  # staticmethod / classmethod
            if isinstance(func, property):
                codes.extend(f.__code__ for f in (func.fget, func.fset, func.fdel) if f is not None)
            elif isinstance(func, types.FunctionType):
                codes.append(func.__code__)
    return codes


def reachable_names(start: Iterable[str], namespace: Mapping[str, Any]) -> set[str] | None:
    """``start`` plus the globals notebook code reachable from it uses; None if dynamic."""
    seen: set[str] = set()
    todo = [name for name in start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in namespace:
            continue
        used: set[str] = set()
        for code in _notebook_code(namespace[name]):
            _code_names(code, used)
        if used & _DYNAMIC:
            return None
        todo.extend(used - seen)
    return seen


def definition_source(name: str, cells: Iterable[str]) -> str | None:
    """The code of the last top-level ``def``/``class`` binding ``name`` in ``cells``
    (transformed cell sources, newest first), decorators included."""
    for cell in cells:
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            continue
        for node in reversed(tree.body):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                return "\n".join(cell.splitlines()[start - 1 : node.end_lineno]) + "\n"
    return None


class SharedObjects:
    """Which variables reach a common object: the co-variable groups, kept incrementally.

    Each variable's reached objects are claimed when it is pickled and released
    when it is pickled again or goes away, so a cell pays for the variables it
    touched — not for every object of an untouched million-row list.
    """

    def __init__(self) -> None:
        self.reach: dict[str, dict[int, Any]] = {}  # name → reached objects (kept alive: ids stay unique)
        self._owner: dict[int, str] = {}
        self._shared: dict[int, set[str]] = {}  # object id → every name reaching it, when two or more do

    def set(self, name: str, reached: dict[int, Any]) -> None:
        self.discard(name)
        self.reach[name] = reached
        owner, shared = self._owner, self._shared
        for key in reached:
            first = owner.setdefault(key, name)
            if first != name:
                shared.setdefault(key, {first}).add(name)

    def discard(self, name: str) -> None:
        reached = self.reach.pop(name, None)
        if not reached:
            return
        owner, shared = self._owner, self._shared
        for key in reached:
            claimants = shared.get(key)
            if claimants is None:
                if owner.get(key) == name:
                    del owner[key]
                continue
            claimants.discard(name)
            if owner[key] == name:
                owner[key] = next(iter(claimants))
            if len(claimants) == 1:
                del shared[key]

    def groups(self, names: Iterable[str]) -> list[list[str]]:
        """``names`` partitioned into groups of variables that share objects, in order."""
        parent = {name: name for name in names}

        def find(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for claimants in self._shared.values():
            present = [name for name in claimants if name in parent]
            for other in present[1:]:
                parent[find(other)] = find(present[0])
        members: dict[str, list[str]] = {}
        for name in parent:
            members.setdefault(find(name), []).append(name)
        return list(members.values())

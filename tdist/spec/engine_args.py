"""Engine arguments are the engine's: their names are checked against the installed engine.

`engine_args` (llm.engine_args, a server set's, a vllm/trtllm operator's) are passed to the
engine as they are. When the engine is installed, a name it does not accept is a validation error
with "did you mean" (instead of an engine that fails at start, after `tdist validate` passed);
when it is not installed (planning on a laptop for a GPU cluster) they pass through unchecked.

The names are read from the engine's source, not by importing it: importing vLLM's
`AsyncEngineArgs` takes ~10 s (torch, transformers), too long for `tdist validate`. vLLM's engine
arguments are the fields of two dataclasses, `EngineArgs` and `AsyncEngineArgs`, in
`vllm/engine/arg_utils.py`; their annotated assignments are exactly
`dataclasses.fields(AsyncEngineArgs)` (tests/unit/test_spec_kinds.py compares both when vLLM is
installed). An engine whose source does not have that shape is not checked.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from tdist.spec.models import GraphSpec
from tdist.spec.operators import LLM_KINDS, OPERATOR_KINDS
from tdist.spec.placement import server_engine
from tdist.spec.problem import Loc, Problem

#: engine → (package, file in it, classes whose annotated fields are the engine arguments)
ENGINE_SOURCES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vllm": ("vllm", os.path.join("engine", "arg_utils.py"), ("EngineArgs", "AsyncEngineArgs")),
}
#: engine_args keys tdist itself reads (tdist/operators/llm/llm_common.py: a file of engine args)
TDIST_KEYS = frozenset({"config"})


def dataclass_fields_in_source(text: str, classes: tuple[str, ...]) -> frozenset[str] | None:
    """Names of the annotated class-level fields of `classes` in Python source (ClassVars left out);
    None when a class is missing. Pure."""
    tree = ast.parse(text)
    found: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            names = found.setdefault(node.name, set())
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                        and "ClassVar" not in ast.unparse(item.annotation):
                    names.add(item.target.id)
    if set(found) != set(classes):
        return None
    return frozenset().union(*found.values())


@functools.lru_cache(maxsize=None)
def installed_engine_args(engine: str) -> frozenset[str] | None:
    """The engine-argument names the installed `engine` accepts; None when it is not installed
    (or its source is not the shape described in the module doc)."""
    source = ENGINE_SOURCES.get(engine)
    if source is None:
        return None
    package, rel, classes = source
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for base in found.submodule_search_locations:
        path = os.path.join(base, rel)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        try:
            return dataclass_fields_in_source(text, classes)
        except SyntaxError:
            return None
    return None


def _places(spec: GraphSpec) -> Iterator[tuple[Loc, dict[str, Any], set[str]]]:
    """(loc, engine_args, engines they reach) for every engine_args of the graph."""
    sets = spec.llm.server_sets() if spec.llm else []
    engines = {key: server_engine(spec, key, s) for key, _role, s in sets}
    if spec.llm is not None and spec.llm.engine_args:
        yield ("llm", "engine_args"), spec.llm.engine_args, set(engines.values()) or {spec.llm.engine}
    for key, _role, s in sets:
        if s.engine_args:
            yield ("llm", key, "engine_args"), s.engine_args, {engines[key]}
    for i, op in enumerate(spec.operators):
        if op.kind in LLM_KINDS and op.engine_args:  # type: ignore[union-attr]
            yield ("operators", i, "engine_args"), op.engine_args, {op.kind}  # type: ignore[union-attr]


def check_engine_args(spec: GraphSpec,
                      names_of: Callable[[str], frozenset[str] | None] = installed_engine_args) -> list[Problem]:
    """Engine-argument names the installed engine does not accept (none when it is not installed)."""
    problems: list[Problem] = []
    for loc, args, engines in _places(spec):
        for engine in sorted(engines):
            known = names_of(engine)
            if known is None:
                continue
            tdist_settings = OPERATOR_KINDS[engine].model_fields["parameters"].annotation.model_fields  # type: ignore[union-attr]
            for key in args:
                if key in known or key in TDIST_KEYS:
                    continue
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                if key in tdist_settings:
                    hint = f"{key!r} is a tdist setting: put it under the {engine} operator's parameters"
                elif close:
                    hint = f"did you mean {close[0]!r}?"
                else:
                    hint = f"remove it (the installed {engine} does not know it)"
                problems.append(Problem(loc + (key,), key, f"not an engine argument of the installed {engine}", hint, True))
    return problems

"""Reading a graph YAML into a validated `GraphSpec`, with errors a person can act on.

The text becomes plain data and the line/column of every key and value in tdist/spec/source.py,
within the limits of tdist/spec/limits.py (size, depth, aliases: docs/security.md). Pydantic's
errors and the cross-field checks then come back as `SpecError`s naming the YAML path
(`workers[1].operators`), what was found, the rule and the fix ("did you mean 'replicas'?" for
unknown keys; "only applies to kind frontend" for a key of another operator kind). The only I/O
is reading the graph file, the layout file it may reference (`llm.layout_file`, confined to the
graph's directory) and, for the engine-args check, the installed engine's source.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from tdist.errors import SpecError, SpecErrors
from tdist.spec import limits as L
from tdist.spec.models import DisaggLayoutFile, GraphSpec
from tdist.spec.marks import Marks, format_path, short
from tdist.spec.source import read_text, read_yaml
from tdist.spec.typewalk import child, clean_loc, data_at, field_names, model_at, tag_map, type_at

Loc = tuple[str | int, ...]
_LAYOUT_KEYS = ("model", "hostname", "port", "backend", "context_servers", "generation_servers")


# ---------------------------------------------------------------- pydantic errors → SpecErrors


def _describe(root: type[BaseModel], loc: Loc, data: Any = None) -> str | None:
    if loc and isinstance(loc[-1], str):
        parent = model_at(root, loc[:-1], data)
        if parent is not None:
            f = parent.model_fields.get(loc[-1])
            if f is not None and f.description:
                return f"{loc[-1]}: {f.description}"
    here = model_at(root, loc, data)
    if here is not None:
        return f"write a mapping with keys from: {', '.join(field_names(here))}"
    return None


def _close(key: str, names: list[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(root: type[BaseModel], loc: Loc, data: Any, marks: Marks) -> tuple[SpecError, bool]:
    """An unknown key: a field of another operator kind (recoverable: the checks still run), a
    setting one level off (under / above `parameters`), or a misspelling ("did you mean")."""
    key, where = str(loc[-1]), loc[:-1]
    parent = model_at(root, where, data)
    allowed = field_names(parent) if parent is not None else []
    tags = tag_map(type_at(root, where, data, resolve=False))
    if tags is not None and key not in allowed:
        kinds = sorted(t for t, m in tags[0].items() if key in m.model_fields)
        if kinds:
            return marks.error(loc, child(data_at(data, where), "kind") or "python",
                               f"{key!r} only applies to kind {' / '.join(kinds)}",
                               f"remove {key!r} or change kind", key=True), True
    params = model_at(root, where + ("parameters",), data) if parent is not None and "parameters" in parent.model_fields else None
    outer = model_at(root, where[:-1], data) if len(where) >= 2 and where[-1] == "parameters" else None
    # the same key one level off first (a setting written beside parameters, or a field under it),
    # then a misspelling here, then a misspelling one level off
    for exact in (True, False):
        close = (key if key in allowed else None) if exact else _close(key, allowed)
        if close is not None:
            return marks.error(loc, key, "unknown key", f"did you mean {close!r}?", key=True), False
        inner = _match(key, params, exact)
        if inner is not None:
            return marks.error(loc, key, "unknown key", f"did you mean {format_path(where + ('parameters', inner))!r}? "
                               "(this kind's settings go under parameters)", key=True), False
        up = _match(key, outer, exact)
        if up is not None:
            return marks.error(loc, key, "unknown key", f"did you mean {format_path(where[:-1] + (up,))!r}? "
                               "(a field of the operator itself, not of its parameters)", key=True), False
    return marks.error(loc, key, "unknown key", f"remove it; allowed keys here: {', '.join(allowed)}", key=True), False


def _match(key: str, model: type[BaseModel] | None, exact: bool) -> str | None:
    if model is None:
        return None
    names = field_names(model)
    return (key if key in names else None) if exact else _close(key, names)


def _convert(exc: ValidationError, data: Any, marks: Marks, root: type[BaseModel]) -> tuple[list[SpecError], list[Loc], int]:
    """Pydantic's errors as SpecErrors (the first MAX_ERRORS_SHOWN paths: each costs a "did you mean"),
    the locs of keys that only belong to another kind, and how many paths were left out."""
    grouped: dict[Loc, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(clean_loc(data, tuple(err["loc"]), root), []).append(err)
    out: list[SpecError] = []
    misplaced: list[Loc] = []
    for loc, errs in list(grouped.items())[: L.MAX_ERRORS_SHOWN]:
        err = errs[0]
        kind = err["type"]
        if kind == "extra_forbidden":
            error, other_kind = _unknown_key(root, loc, data, marks)
            out.append(error)
            if other_kind:
                misplaced.append(loc)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            out.append(_bad_tag(root, loc, data, marks, err))
        elif kind == "missing":
            desc = _describe(root, loc, data)
            out.append(marks.error(loc, "nothing", f"required key {loc[-1]!r} is missing", f"add it ({desc})" if desc else "add it"))
        else:
            rules = "; or ".join(dict.fromkeys(
                re.sub(r" or instance of \w+", "", e["msg"].removeprefix("Value error, ")) for e in errs))
            out.append(marks.error(loc, short(err.get("input")), rules, _describe(root, loc, data)))
    return out, misplaced, max(0, len(grouped) - L.MAX_ERRORS_SHOWN)


def _bad_tag(root: type[BaseModel], loc: Loc, data: Any, marks: Marks, err: dict[str, Any]) -> SpecError:
    """An operator whose `kind` names no kind (or that is not a mapping)."""
    tags = tag_map(type_at(root, loc, data, resolve=False))
    kinds = list(tags[0]) if tags else []
    node = data_at(data, loc)
    if not isinstance(node, dict):
        first = next(iter(tags[0].values())) if tags else None
        keys = ", ".join(field_names(first)) if first is not None else "name, kind"
        return marks.error(loc, short(node), "Input should be a valid dictionary",
                           f"write a mapping with keys from: {keys} (kind decides the rest)")
    tag = node.get("kind")
    close = _close(str(tag), kinds)
    hint = f"did you mean {close!r}?" if close else f"use one of: {', '.join(kinds)}"
    return marks.error(loc + ("kind",), short(tag), f"unknown kind; kinds are {', '.join(map(repr, kinds))}", hint)


def convert_validation_error(exc: ValidationError, data: Any, marks: Marks, root: type[BaseModel]) -> SpecErrors:
    """Pydantic's errors, grouped by YAML path, each with the rule and a fix."""
    errors, _misplaced, more = _convert(exc, data, marks, root)
    return _capped(errors, more, marks.file)


# ---------------------------------------------------------------- public entry points


LAYOUT_SIBLING_DIR = "configs"
"""Besides the graph's own directory, a layout file may live in the `configs/` directory beside it
(graphs/ and configs/ side by side, as this repository ships them)."""


def layout_path(value: str, base_dir: str) -> tuple[str | None, str, str]:
    """(real path, "", "") of an `llm.layout_file` that resolves inside the graph's directory (or
    the configs/ directory beside it), symlinks followed; else (None, rule, fix). Pure but for
    resolving symlinks."""
    fix = (f"put the layout file in the graph's directory (or the {LAYOUT_SIBLING_DIR}/ directory beside it) "
           "and name it relative to the graph, e.g. layout_file: layout.yaml")
    if not value.strip() or "\0" in value:
        return None, "not a file path", fix
    if os.path.isabs(value):
        return None, "an absolute path: a layout file is named relative to the graph's directory", fix
    roots = {os.path.realpath(base_dir), os.path.realpath(os.path.join(base_dir, os.pardir, LAYOUT_SIBLING_DIR))}
    real = os.path.realpath(os.path.join(base_dir, value))
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        return None, ("the layout file resolves outside the graph's directory (through `..` or a symlink that leaves "
                      "it)"), fix
    return real, "", ""


def _merge_layout(data: dict[str, Any], base_dir: str, marks: Marks, limits: L.Limits) -> None:
    """Fill `llm` keys the graph leaves unset from the referenced seed-style layout file. Its
    content never appears in an error (the marks hide it): the file could be anything readable."""
    llm = data.get("llm")
    if not isinstance(llm, dict) or not isinstance(llm.get("layout_file"), str):
        return
    loc = ("llm", "layout_file")
    path, rule, fix = layout_path(llm["layout_file"], base_dir)
    if path is None:
        raise marks.error(loc, llm["layout_file"], rule, fix)
    text = read_text(path, limits, what="layout file", hide=True, regular_only=True,
                     cannot_open=lambda reason: marks.error(loc, llm["layout_file"], f"cannot read layout file ({reason})",
                                                            "the path is relative to the graph YAML's directory"))
    layout, lmarks = read_yaml(text, path, limits=limits, hide=True)
    if not isinstance(layout, dict):
        raise lmarks.error((), None, "a layout file must be a mapping", "see configs/ for examples")
    try:
        DisaggLayoutFile.model_validate(layout)
    except ValidationError as exc:
        raise convert_validation_error(exc, layout, lmarks, DisaggLayoutFile) from None
    for key in _LAYOUT_KEYS:
        if key in layout and key not in llm and layout[key] is not None:
            llm[key] = layout[key]
            marks.elsewhere[("llm", key)] = (lmarks, (key,))  # its errors point into the layout file


def _capped(errors: list[SpecError], more: int, file: str | None) -> SpecErrors:
    """At most MAX_ERRORS_SHOWN problems, and how many more there are."""
    more += max(0, len(errors) - L.MAX_ERRORS_SHOWN)
    shown = errors[: L.MAX_ERRORS_SHOWN]
    if more:
        shown.append(SpecError("", f"{more:,} more", f"more problems than the {L.MAX_ERRORS_SHOWN} shown",
                               "fix these and validate again", file=file))
    return SpecErrors(shown)


def parse_graph(text: str, *, file: str | None = None, base_dir: str | None = None) -> GraphSpec:
    """Validate graph YAML text. `base_dir` is where relative paths resolve (default: the file's dir)."""
    from tdist.spec.checks import check_graph
    from tdist.spec.engine_args import check_engine_args

    limits = _limits(file)
    data, marks = read_yaml(text, file, limits=limits)
    if not isinstance(data, dict):
        raise marks.error((), short(data), "a graph must be a YAML mapping",
                          "start with `name: my-graph` followed by `operators:` and `workers:`")
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(file)) if file else os.getcwd()
    _merge_layout(data, base_dir, marks, limits)
    errors: list[SpecError] = []
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        errors, misplaced, more = _convert(exc, data, marks, GraphSpec)
        recovered = _validate_without(data, misplaced) if len(misplaced) == len(errors) and not more else None
        if recovered is None:
            raise _capped(errors, more, file) from None
        spec = recovered  # only keys of another kind were wrong: report them with the checks' findings
    spec._base_dir = base_dir
    spec._file = file
    problems = check_graph(spec) + check_engine_args(spec)
    errors += [marks.error(p.loc, p.got, p.rule, p.hint, key=p.on_key) for p in problems[: L.MAX_ERRORS_SHOWN]]
    if errors:
        raise _capped(errors, max(0, len(problems) - L.MAX_ERRORS_SHOWN), file)
    return spec


def _validate_without(data: dict[str, Any], locs: list[Loc]) -> GraphSpec | None:
    """The graph with the keys at `locs` removed, if that validates."""
    trimmed = copy.deepcopy(data)
    for loc in locs:
        parent = data_at(trimmed, loc[:-1])
        if isinstance(parent, dict):
            parent.pop(loc[-1], None)
    try:
        return GraphSpec.model_validate(trimmed)
    except ValidationError:
        return None


def _limits(file: str | None) -> L.Limits:
    try:
        return L.current_limits()
    except L.LimitSettingError as exc:
        raise SpecError("", exc.value, f"environment variable {exc.name} {exc.rule}",
                        f"fix it, or unset it for the default ({exc.default:,})", file=file) from None


def load_graph(path: str | os.PathLike[str]) -> GraphSpec:
    """Read and validate one graph YAML; raises SpecError / SpecErrors naming file, line and fix."""
    path = os.fspath(path)
    text = read_text(path, _limits(path), what="graph file")
    return parse_graph(text, file=path, base_dir=os.path.dirname(os.path.abspath(path)))

"""Reading a graph YAML into a validated `GraphSpec`, with errors a person can act on.

The file is parsed twice: once into plain data, once into PyYAML's node tree, whose marks give a
line and column for every key and value. Pydantic's errors and the cross-field checks then come
back as `SpecError`s naming the YAML path (`workers[1].operators`), what was found, the rule and
the fix ("did you mean 'replicas'?" for unknown keys; "only applies to kind frontend" for a key of
another operator kind). The only I/O is reading the graph file, the layout file it may reference
(`llm.layout_file`) and, for the engine-args check, the installed engine's source.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tdist.errors import SpecError, SpecErrors
from tdist.spec.models import DisaggLayoutFile, GraphSpec
from tdist.spec.typewalk import child, clean_loc, data_at, field_names, model_at, tag_map, type_at

Loc = tuple[str | int, ...]
_LAYOUT_KEYS = ("model", "hostname", "port", "backend", "context_servers", "generation_servers")


def format_path(loc: Loc) -> str:
    """('workers', 1, 'operators') → 'workers[1].operators'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Marks:
    """Line/column (1-based) of every key and value in one YAML document."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}
        #: locs that came from another file (llm keys taken from the layout file): prefix → (its marks, its loc)
        self.elsewhere: dict[Loc, tuple["_Marks", Loc]] = {}

    def walk(self, node: yaml.Node, loc: Loc, errors: list[SpecError]) -> None:
        self.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value
                here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in seen:
                    errors.append(
                        SpecError(format_path(loc + (key,)), key, "duplicate key in the same mapping",
                                  "keep one; YAML would silently use the last", file=self.file, line=here[0], column=here[1])
                    )
                seen.add(key)
                self.keys[loc + (key,)] = here
                self.walk(value_node, loc + (key,), errors)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, loc + (i,), errors)

    def find(self, loc: Loc, *, key: bool = False) -> tuple[int | None, int | None]:
        """The mark of `loc` (its key when `key`), else of the nearest enclosing node."""
        if key and loc in self.keys:
            return self.keys[loc]
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.values:
                return self.values[loc[:n]]
        return (None, None)

    def error(self, loc: Loc, got: Any, rule: str, hint: str | None, *, key: bool = False) -> SpecError:
        for prefix, (other, there) in self.elsewhere.items():
            if loc[: len(prefix)] == prefix:
                return other.error(there + loc[len(prefix):], got, rule, hint, key=key)
        line, col = self.find(loc, key=key)
        return SpecError(format_path(loc), got, rule, hint, file=self.file, line=line, column=col)


def _read_yaml(text: str, file: str | None) -> tuple[Any, _Marks]:
    """Plain data + marks; YAML syntax errors and duplicate keys become SpecErrors."""
    marks = _Marks(file)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        rule = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        raise SpecError(
            "", text.splitlines()[mark.line].strip() if mark and mark.line < len(text.splitlines()) else None, rule,
            "check indentation, colons and quotes on that line",
            file=file, line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        ) from None
    dup: list[SpecError] = []
    if node is not None:
        marks.walk(node, (), dup)
    if dup:
        raise SpecErrors(dup)
    return data, marks


# ---------------------------------------------------------------- pydantic errors → SpecErrors


def _short(value: Any) -> Any:
    text = repr(value)
    if len(text) <= 60:
        return value
    return text[:57] + "..."


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


def _unknown_key(root: type[BaseModel], loc: Loc, data: Any, marks: _Marks) -> tuple[SpecError, bool]:
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


def _convert(exc: ValidationError, data: Any, marks: _Marks, root: type[BaseModel]) -> tuple[list[SpecError], list[Loc]]:
    """Pydantic's errors as SpecErrors, and the locs of keys that only belong to another kind."""
    grouped: dict[Loc, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(clean_loc(data, tuple(err["loc"]), root), []).append(err)
    out: list[SpecError] = []
    misplaced: list[Loc] = []
    for loc, errs in grouped.items():
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
            out.append(marks.error(loc, _short(err.get("input")), rules, _describe(root, loc, data)))
    return out, misplaced


def _bad_tag(root: type[BaseModel], loc: Loc, data: Any, marks: _Marks, err: dict[str, Any]) -> SpecError:
    """An operator whose `kind` names no kind (or that is not a mapping)."""
    tags = tag_map(type_at(root, loc, data, resolve=False))
    kinds = list(tags[0]) if tags else []
    node = data_at(data, loc)
    if not isinstance(node, dict):
        first = next(iter(tags[0].values())) if tags else None
        keys = ", ".join(field_names(first)) if first is not None else "name, kind"
        return marks.error(loc, _short(node), "Input should be a valid dictionary",
                           f"write a mapping with keys from: {keys} (kind decides the rest)")
    tag = node.get("kind")
    close = _close(str(tag), kinds)
    hint = f"did you mean {close!r}?" if close else f"use one of: {', '.join(kinds)}"
    return marks.error(loc + ("kind",), _short(tag), f"unknown kind; kinds are {', '.join(map(repr, kinds))}", hint)


def convert_validation_error(exc: ValidationError, data: Any, marks: _Marks, root: type[BaseModel]) -> SpecErrors:
    """Pydantic's errors, grouped by YAML path, each with the rule and a fix."""
    return SpecErrors(_convert(exc, data, marks, root)[0])


# ---------------------------------------------------------------- public entry points


def _merge_layout(data: dict[str, Any], base_dir: str, marks: _Marks) -> None:
    """Fill `llm` keys the graph leaves unset from the referenced seed-style layout file."""
    llm = data.get("llm")
    if not isinstance(llm, dict) or not isinstance(llm.get("layout_file"), str):
        return
    path = os.path.normpath(os.path.join(base_dir, llm["layout_file"]))
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise marks.error(("llm", "layout_file"), llm["layout_file"], f"cannot read layout file ({exc.strerror})",
                          "the path is relative to the graph YAML's directory") from None
    layout, lmarks = _read_yaml(text, path)
    if not isinstance(layout, dict):
        raise lmarks.error((), _short(layout), "a layout file must be a mapping", "see configs/ for examples")
    try:
        DisaggLayoutFile.model_validate(layout)
    except ValidationError as exc:
        raise convert_validation_error(exc, layout, lmarks, DisaggLayoutFile) from None
    for key in _LAYOUT_KEYS:
        if key in layout and key not in llm and layout[key] is not None:
            llm[key] = layout[key]
            marks.elsewhere[("llm", key)] = (lmarks, (key,))  # its errors point into the layout file


def parse_graph(text: str, *, file: str | None = None, base_dir: str | None = None) -> GraphSpec:
    """Validate graph YAML text. `base_dir` is where relative paths resolve (default: the file's dir)."""
    from tdist.spec.checks import check_graph
    from tdist.spec.engine_args import check_engine_args

    data, marks = _read_yaml(text, file)
    if not isinstance(data, dict):
        raise marks.error((), _short(data), "a graph must be a YAML mapping",
                          "start with `name: my-graph` followed by `operators:` and `workers:`")
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(file)) if file else os.getcwd()
    _merge_layout(data, base_dir, marks)
    errors: list[SpecError] = []
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        errors, misplaced = _convert(exc, data, marks, GraphSpec)
        recovered = _validate_without(data, misplaced) if len(misplaced) == len(errors) else None
        if recovered is None:
            raise SpecErrors(errors) from None
        spec = recovered  # only keys of another kind were wrong: report them with the checks' findings
    spec._base_dir = base_dir
    spec._file = file
    problems = check_graph(spec) + check_engine_args(spec)
    errors += [marks.error(p.loc, p.got, p.rule, p.hint, key=p.on_key) for p in problems]
    if errors:
        raise SpecErrors(errors)
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


def load_graph(path: str | os.PathLike[str]) -> GraphSpec:
    """Read and validate one graph YAML; raises SpecError / SpecErrors naming file, line and fix."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SpecError("", path, f"cannot read graph file ({exc.strerror})", "check the path", file=path) from None
    return parse_graph(text, file=path, base_dir=os.path.dirname(os.path.abspath(path)))

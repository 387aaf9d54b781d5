"""Reading a graph YAML into a validated `GraphSpec`, with errors a person can act on.

The file is parsed twice: once into plain data, once into PyYAML's node tree, whose marks give a
line and column for every key and value. Pydantic's errors and the cross-field checks then come
back as `SpecError`s naming the YAML path (`workers[1].operators`), what was found, the rule and
the fix ("did you mean 'replicas'?" for unknown keys). The only I/O is reading the graph file and
the layout file it may reference (`llm.layout_file`).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from tdist.errors import SpecError, SpecErrors
from tdist.spec.models import DisaggLayoutFile, GraphSpec

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


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated/unions down to the model (or container) a loc walks into."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else next((a for a in args if typing.get_origin(a) in (list, dict)), args[0])
        else:
            return tp


def _type_at(root: type[BaseModel], loc: Loc) -> Any:
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif origin is list:
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, f in model.model_fields.items():
        names.append(name)
        alias = f.validation_alias
        for choice in getattr(alias, "choices", []) or []:
            if isinstance(choice, str) and choice not in names:
                names.append(choice)
    return names


def _clean_loc(data: Any, loc: Loc) -> Loc:
    """Drop pydantic's union/validator tags so the loc follows the YAML."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict):
            out.append(part)
            cur = cur.get(part) if isinstance(part, str) else None
        elif isinstance(cur, list) and isinstance(part, int):
            out.append(part)
            cur = cur[part] if part < len(cur) else None
        elif cur is None and isinstance(part, (str, int)) and not str(part).startswith(("function-", "literal[", "list[", "dict[")):
            out.append(part)
        # else: a tag inside a scalar/list (union member name): skip it
    return tuple(out)


def _short(value: Any) -> Any:
    text = repr(value)
    if len(text) <= 60:
        return value
    return text[:57] + "..."


def _describe(root: type[BaseModel], loc: Loc) -> str | None:
    if loc and isinstance(loc[-1], str):
        parent = _unwrap(_type_at(root, loc[:-1]))
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            f = parent.model_fields.get(loc[-1])
            if f is not None and f.description:
                return f"{loc[-1]}: {f.description}"
    here = _type_at(root, loc)
    if isinstance(here, type) and issubclass(here, BaseModel):
        return f"write a mapping with keys from: {', '.join(_field_names(here))}"
    return None


def convert_validation_error(exc: ValidationError, data: Any, marks: _Marks, root: type[BaseModel]) -> SpecErrors:
    """Pydantic's errors, grouped by YAML path, each with the rule and a fix."""
    grouped: dict[Loc, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(_clean_loc(data, tuple(err["loc"])), []).append(err)
    out: list[SpecError] = []
    for loc, errs in grouped.items():
        err = errs[0]
        kind = err["type"]
        if kind == "extra_forbidden":
            key = loc[-1]
            parent = _unwrap(_type_at(root, loc[:-1]))
            allowed = _field_names(parent) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"remove it; allowed keys here: {', '.join(allowed)}"
            out.append(marks.error(loc, key, "unknown key", hint, key=True))
        elif kind == "missing":
            desc = _describe(root, loc)
            out.append(marks.error(loc, "nothing", f"required key {loc[-1]!r} is missing", f"add it ({desc})" if desc else "add it"))
        else:
            rules = "; or ".join(dict.fromkeys(
                re.sub(r" or instance of \w+", "", e["msg"].removeprefix("Value error, ")) for e in errs))
            out.append(marks.error(loc, _short(err.get("input")), rules, _describe(root, loc)))
    return SpecErrors(out)


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


def parse_graph(text: str, *, file: str | None = None, base_dir: str | None = None) -> GraphSpec:
    """Validate graph YAML text. `base_dir` is where relative paths resolve (default: the file's dir)."""
    from tdist.spec.checks import check_graph

    data, marks = _read_yaml(text, file)
    if not isinstance(data, dict):
        raise marks.error((), _short(data), "a graph must be a YAML mapping",
                          "start with `name: my-graph` followed by `operators:` and `workers:`")
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(file)) if file else os.getcwd()
    _merge_layout(data, base_dir, marks)
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as exc:
        raise convert_validation_error(exc, data, marks, GraphSpec) from None
    spec._base_dir = base_dir
    spec._file = file
    problems = check_graph(spec)
    if problems:
        raise SpecErrors([marks.error(p.loc, p.got, p.rule, p.hint, key=p.on_key) for p in problems])
    return spec


def load_graph(path: str | os.PathLike[str]) -> GraphSpec:
    """Read and validate one graph YAML; raises SpecError / SpecErrors naming file, line and fix."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SpecError("", path, f"cannot read graph file ({exc.strerror})", "check the path", file=path) from None
    return parse_graph(text, file=path, base_dir=os.path.dirname(os.path.abspath(path)))

"""Where a YAML path leads in the spec models: the type at a path, and pydantic's error locs as YAML paths.

Pure (no I/O). Tagged unions (operators: one model per `kind`) are followed through the data:
the member the data at that point selects is the type there.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, Discriminator, Tag

from tdist.spec.problem import Loc


def tag_map(tp: Any) -> tuple[dict[str, Any], Any] | None:
    """({tag: model}, discriminator) when `tp` is a tagged union (operators: one model per kind)."""
    if typing.get_origin(tp) is not typing.Annotated:
        return None
    inner, *meta = typing.get_args(tp)
    disc = next((m for m in meta if isinstance(m, Discriminator)), None)
    if disc is None or typing.get_origin(inner) not in (Union, types.UnionType):
        return None
    members: dict[str, Any] = {}
    for member in typing.get_args(inner):
        if typing.get_origin(member) is typing.Annotated:
            model, *tags = typing.get_args(member)
            for t in tags:
                if isinstance(t, Tag):
                    members[t.tag] = model
    return members, disc.discriminator


def unwrap(tp: Any, node: Any = None) -> Any:
    """Strip Optional/Annotated/unions down to the model (or container) a loc walks into; a tagged
    union becomes the member the data at that point (`node`) selects (None when it selects none)."""
    while True:
        tags = tag_map(tp)
        if tags is not None:
            members, pick = tags
            tag = pick(node) if callable(pick) else (node.get(pick) if isinstance(node, dict) else None)
            return members.get(tag) if isinstance(tag, str) else None
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else next((a for a in args if typing.get_origin(a) in (list, dict)), args[0])
        else:
            return tp


def child(node: Any, part: str | int) -> Any:
    """The plain data one step down (None where there is none)."""
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def type_at(root: type[BaseModel], loc: Loc, data: Any = None, *, resolve: bool = True) -> Any:
    """The type at `loc` (a YAML path); `data` picks the members of tagged unions on the way."""
    tp: Any = root
    node = data
    for part in loc:
        tp = unwrap(tp, node)
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
        node = child(node, part)
    return unwrap(tp, node) if resolve else tp


def model_at(root: type[BaseModel], loc: Loc, data: Any) -> type[BaseModel] | None:
    """The model at `loc`, None where the path leads to a scalar, a container or nowhere."""
    tp = type_at(root, loc, data)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def field_names(model: type[BaseModel]) -> list[str]:
    """The keys a mapping of `model` may have, aliases included (`tensor_parallel_size`)."""
    names = []
    for name, f in model.model_fields.items():
        names.append(name)
        alias = f.validation_alias
        for choice in getattr(alias, "choices", []) or []:
            if isinstance(choice, str) and choice not in names:
                names.append(choice)
    return names


def clean_loc(data: Any, loc: Loc, root: type[BaseModel]) -> Loc:
    """Drop pydantic's union/validator tags so the loc follows the YAML."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and isinstance(part, str) and part not in cur:
            tags = tag_map(type_at(root, tuple(out), data, resolve=False))
            if tags is not None and part in tags[0]:  # the member of a tagged union (operator kind)
                continue
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


def data_at(data: Any, loc: Loc) -> Any:
    """The plain data at `loc` (None where there is none)."""
    for part in loc:
        data = child(data, part)
    return data

"""Where every key and value of a YAML document is (line, column), and errors that point there.

The marks come from the node tree (tdist/spec/source.py builds it within the limits). Aliases are
walked where they are used; a merge key (`<<: *base`) contributes the keys its mapping lacks, at
the lines that wrote them. A layout file's marks (`hide`) never show its content in an error.
"""

from __future__ import annotations

import re
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tdist.errors import SpecError
from tdist.spec.problem import Loc

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Hidden:
    """Stands for a value of a layout file in an error (its content is not shown)."""

    def __repr__(self) -> str:
        return "<not shown: layout file content>"


HIDDEN = _Hidden()


def format_path(loc: Loc) -> str:
    """('workers', 1, 'operators') → 'workers[1].operators'. A key with control characters is
    shown escaped ('\\x1b[31m'): printed raw, a key could drive the user's terminal."""
    out = ""
    for part in loc:
        text = str(part)
        if not text.isprintable():
            text = repr(text)
        out += f"[{text}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out


def short(value: Any) -> Any:
    """The value itself when its repr is short, else the start of its repr (for `got`)."""
    text = repr(value)
    if len(text) <= 60:
        return value
    return text[:57] + "..."


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class Marks:
    """Line/column (1-based) of every key and value in one YAML document. `hide`: a layout file,
    whose errors show no value, and a key only when it is a plain name (`tp_sise`): a line of
    /etc/shadow ends in ":::", which makes the whole line, hash included, a key."""

    def __init__(self, file: str | None, *, hide: bool = False) -> None:
        self.file = file
        self.hide = hide
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}
        #: locs that came from another file (llm keys taken from the layout file): prefix → (its marks, its loc)
        self.elsewhere: dict[Loc, tuple["Marks", Loc]] = {}

    def walk(self, root: Node, errors: list[SpecError]) -> None:
        """Record every mark (aliases walked where they are used; the read step bounded their size)
        and report duplicate keys. A merge key's mapping fills in what the mapping itself lacks."""
        self._walk(root, (), errors, set())

    def _walk(self, node: Node, loc: Loc, errors: list[SpecError], checked: set[int]) -> None:
        self.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, MappingNode):
            check = id(node) not in checked  # an aliased mapping's duplicates are reported once
            checked.add(id(node))
            seen: set[str] = set()
            merges = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    merges.append(value_node)
                    continue
                if not isinstance(key_node, ScalarNode):
                    continue  # a collection as key: the constructor refuses it
                key = key_node.value
                here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if check and key in seen:
                    errors.append(SpecError(
                        self.path(loc + (key,)), HIDDEN if self.hide else key, "duplicate key in the same mapping",
                        "keep one; YAML would silently use the last", file=self.file, line=here[0], column=here[1]))
                seen.add(key)
                self.keys[loc + (key,)] = here
                self._walk(value_node, loc + (key,), errors, checked)
            for source in merges:
                self._merge(source, loc, errors, checked)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, loc + (i,), errors, checked)

    def _merge(self, source: Node, loc: Loc, errors: list[SpecError], checked: set[int]) -> None:
        """Keys a merge (`<<: *base` or `<<: [*a, *b]`) brings: the first one to name a key wins."""
        for mapping in source.value if isinstance(source, SequenceNode) else [source]:
            if not isinstance(mapping, MappingNode):
                continue  # the constructor refuses it
            nested = []
            for key_node, value_node in mapping.value:
                if key_node.tag == _MERGE_TAG:
                    nested.append(value_node)
                elif isinstance(key_node, ScalarNode) and loc + (key_node.value,) not in self.keys:
                    self.keys[loc + (key_node.value,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                    self._walk(value_node, loc + (key_node.value,), errors, checked)
            for inner in nested:
                self._merge(inner, loc, errors, checked)

    def path(self, loc: Loc) -> str:
        """The YAML path as shown: a layout file's keys that are not plain names are `<key>`."""
        if self.hide:
            loc = tuple(p if isinstance(p, int) or _PLAIN_KEY.fullmatch(str(p)) else "<key>" for p in loc)
        return format_path(loc)

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
        return SpecError(self.path(loc), HIDDEN if self.hide else got, rule, hint, file=self.file, line=line, column=col)

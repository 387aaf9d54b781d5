"""A graph file's text → plain data plus the line/column of every key and value, within limits.

Reading a YAML file the obvious way (`yaml.safe_load`, then walk the node tree for line numbers)
costs whatever the file asks for: an alias-expansion file of a few hundred bytes expands to
billions of nodes, a deep nesting exhausts the recursion limit, a 5,000-digit integer trips
Python's int-string limit. So the text goes through, in order:

1. the size cap (before reading it whole) and a strict UTF-8 decode;
2. one pass over the parser's events (no nodes built) that measures every anchor — how many
   nodes it expands to and how deep it reaches — so the nesting depth and the node count are
   known *with aliases expanded* before anything expands them; a recursive alias is refused;
3. the node tree (libyaml's composer when installed: ten times faster than PyYAML's own), the
   marks walk (merge keys `<<:` included) and the construction of plain data: JSON's types only
   (no dates, sets, binary), and conversions that refuse what Python cannot convert.

Every refusal is a `SpecError` naming the file, line, what was found, the limit and the fix. A
layout file (`hide=True`) is another file the graph names: its content never appears in an
error (no offending line, no value, no quoted fragment of the parser's message) — only the file,
line, column and key path.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import Any

import yaml
from yaml.nodes import Node, ScalarNode

from tdist.errors import SpecError, SpecErrors
from tdist.spec import limits as L
from tdist.spec.marks import HIDDEN, Marks, short

# ---------------------------------------------------------------- bytes → text


def read_text(path: str, limits: L.Limits, *, what: str, hide: bool = False, regular_only: bool = False,
              cannot_open: Callable[[str], SpecError] | None = None) -> str:
    """The file's text: at most `limits.max_bytes` read (a regular file's size is checked before
    reading), strictly UTF-8. `regular_only`: refuse devices, pipes and directories (opened without
    blocking). `cannot_open(reason)`: the error when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_NONBLOCK", 0) if regular_only else 0))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if cannot_open is not None:
            raise cannot_open(reason) from None
        raise SpecError("", path, f"cannot read {what} ({reason})", "check the path", file=path) from None
    try:
        info = os.fstat(fd)
        if regular_only and not stat.S_ISREG(info.st_mode):
            if cannot_open is not None:
                raise cannot_open("not a regular file")
            raise SpecError("", path, f"the {what} is not a regular file", "name a YAML file (not a directory, device or pipe)",
                            file=path)
        if stat.S_ISREG(info.st_mode) and info.st_size > limits.max_bytes:
            raise _too_big(path, what, f"{info.st_size:,} bytes", limits)
        chunks, total = [], 0
        while total <= limits.max_bytes:
            chunk = os.read(fd, min(1 << 20, limits.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limits.max_bytes:
            raise _too_big(path, what, f"more than {limits.max_bytes:,} bytes", limits)
    except OSError as exc:
        raise SpecError("", HIDDEN if hide else path, f"cannot read {what} ({exc.strerror})", "check the path", file=path) from None
    finally:
        os.close(fd)
    return decode(b"".join(chunks), path, what=what, hide=hide)


def _too_big(file: str | None, what: str, got: str, limits: L.Limits) -> SpecError:
    return SpecError("", got, f"the {what} is larger than the limit of {limits.max_bytes:,} bytes",
                     f"a graph is a few kilobytes: check that this is the right file (raise the limit with "
                     f"{L.ENV_MAX_BYTES}=<bytes> if it really is)", file=file)


def decode(raw: bytes, file: str | None, *, what: str = "graph file", hide: bool = False) -> str:
    """UTF-8 text, or a SpecError at the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        got = HIDDEN if hide else f"byte 0x{raw[start]:02x}"
        raise SpecError("", got, f"the {what} is not UTF-8 text ({exc.reason} at byte {start:,})",
                        "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 FILE), and write text only",
                        file=file, line=line, column=column) from None


# ---------------------------------------------------------------- text → data + marks


class _Refused(Exception):
    """A limit the text breaks, found while reading (turned into a SpecError with the file)."""

    def __init__(self, got: Any, rule: str, hint: str, mark: Any) -> None:
        super().__init__(rule)
        self.got, self.rule, self.hint, self.mark = got, rule, hint, mark


#: what PyYAML's converters raise on a value an explicit tag forces on them (`!!int ""`, `!!bool maybe`)
_CONVERSION_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError)


class _Conversions:
    """Conversions that refuse instead of raising Python's own errors (mixed into the safe loaders)."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except _CONVERSION_ERRORS as exc:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            raise _Refused(short(node.value) if isinstance(node, ScalarNode) else tag,
                           f"cannot read this value as {tag} ({type(exc).__name__})",
                           "fix the value, or drop the explicit tag (quote it to make it a string)", node.start_mark) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = str(node.value)
        if len(value) > L.MAX_INT_DIGITS:
            raise _Refused(f"{len(value):,} characters", f"integer literal longer than {L.MAX_INT_DIGITS} characters",
                           "write a smaller number, or quote it to make it a string", node.start_mark)
        return super().construct_yaml_int(node)  # type: ignore[misc]

    def construct_not_json(self, node: Node) -> Any:
        """Dates, sets, binary and ordered pairs: a graph becomes JSON (worker configs), which has none."""
        what = _NOT_JSON[str(node.tag).rsplit(":", 1)[-1]]
        raise _Refused(short(node.value) if isinstance(node, ScalarNode) else what, f"{what} is not a graph value "
                       "(graphs hold strings, numbers, true/false, null, lists and mappings)",
                       "quote it to make it a string", node.start_mark)


_NOT_JSON = {"timestamp": "a date or time", "set": "a set (!!set)", "binary": "binary data (!!binary)",
             "omap": "an ordered map (!!omap)", "pairs": "a list of pairs (!!pairs)"}


class PythonLoader(_Conversions, yaml.SafeLoader):
    """PyYAML's own parser (used when libyaml is not installed)."""


LOADERS: dict[str, type] = {"python": PythonLoader}
if getattr(yaml, "__with_libyaml__", False):
    class LibyamlLoader(_Conversions, yaml.CSafeLoader):  # type: ignore[misc]
        """libyaml's parser and composer: about ten times faster."""

    LOADERS["libyaml"] = LibyamlLoader
for _cls in LOADERS.values():
    _cls.add_constructor("tag:yaml.org,2002:int", _cls.construct_yaml_int)
    for _tag in _NOT_JSON:
        _cls.add_constructor(f"tag:yaml.org,2002:{_tag}", _cls.construct_not_json)
_Loader: type = LOADERS.get("libyaml", PythonLoader)


def _measure(text: str, limits: L.Limits) -> None:
    """One pass over the parser's events: nesting depth and node count with every alias expanded,
    and no alias inside its own anchor. Raises _Refused (or the parser's YAMLError)."""
    loader = _Loader(text)
    try:
        anchors: dict[str, tuple[int, int]] = {}  # anchor → (nodes, height) of what it expands to
        stack: list[list[Any]] = []  # open collections: [anchor, nodes, height of the tallest child]
        total = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.DocumentStartEvent):
                anchors.clear()
                continue
            if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, size, tallest = stack.pop()
                if anchor is not None:
                    anchors[anchor] = (size, tallest + 1)
                if stack:  # the collection itself and its content were counted into `total` as they came
                    stack[-1][1] += size
                    stack[-1][2] = max(stack[-1][2], tallest + 1)
                continue
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(stack) + 1 > limits.max_depth:
                    raise _too_deep(limits, f"more than {limits.max_depth} levels", "", event.start_mark)
                stack.append([event.anchor, 1, 0])
                total += 1
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                size, height = 1, 0
                if isinstance(event, yaml.ScalarEvent):
                    if event.anchor is not None:
                        anchors[event.anchor] = (1, 0)
                else:
                    if any(frame[0] == event.anchor for frame in stack):
                        raise _Refused(f"*{event.anchor}", "an alias inside its own anchor (a structure that contains itself)",
                                       "repeat the values instead of referring to the enclosing node", event.start_mark)
                    if event.anchor not in anchors:
                        raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
                    size, height = anchors[event.anchor]
                    if len(stack) + height > limits.max_depth:
                        raise _too_deep(limits, f"*{event.anchor}", " once the alias is expanded", event.start_mark)
                total += size
                if stack:
                    stack[-1][1] += size
                    stack[-1][2] = max(stack[-1][2], height)
            else:
                continue
            if total > limits.max_nodes:
                raise _Refused(f"more than {limits.max_nodes:,} nodes",
                               f"the document expands to more than {limits.max_nodes:,} YAML nodes (an alias counts as "
                               "every node it repeats)",
                               "use fewer aliases or smaller repeated parts (a graph has a few hundred nodes; raise the "
                               f"limit with {L.ENV_MAX_NODES}=<nodes> if it really needs more)", event.start_mark)
    finally:
        loader.dispose()


def _too_deep(limits: L.Limits, got: str, when: str, mark: Any) -> _Refused:
    return _Refused(got, f"nesting deeper than {limits.max_depth} levels{when}",
                    f"flatten the structure (raise the limit with {L.ENV_MAX_DEPTH}=<levels> if it really needs more)", mark)


def read_yaml(text: str, file: str | None, *, limits: L.Limits | None = None, hide: bool = False) -> tuple[Any, Marks]:
    """Plain data + marks; every refusal and YAML error is a SpecError (SpecErrors for duplicates)."""
    limits = limits or L.current_limits()
    if len(text) > limits.max_bytes:
        raise _too_big(file, "layout file" if hide else "graph", f"{len(text):,} characters", limits)
    bad = re.search(r"[\ud800-\udfff]", text)
    if bad:
        raise _at(file, text, bad.start(), HIDDEN if hide else f"U+{ord(bad.group()):04X}",
                  "a lone surrogate: the text is not valid Unicode", "write text only (decode the file as UTF-8)")
    marks = Marks(file, hide=hide)
    try:
        _measure(text, limits)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            dup: list[SpecError] = []
            if node is not None:
                marks.walk(node, dup)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _Refused as exc:
        raise _at_mark(file, exc.mark, HIDDEN if hide else exc.got, exc.rule, exc.hint) from None
    except yaml.reader.ReaderError as exc:
        raise _at(file, text, exc.position, HIDDEN if hide else f"#x{exc.character:04x}",
                  f"character #x{exc.character:04x} is not allowed in YAML ({exc.reason})",
                  "remove it (or write it as an escape inside double quotes, e.g. \"\\x07\")") from None
    except yaml.YAMLError as exc:
        if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own cap (1,000), met while scanning ahead
            raise _at_mark(file, getattr(exc, "problem_mark", None), f"more than {limits.max_depth} levels",
                           f"nesting deeper than {limits.max_depth} levels", _too_deep(limits, "", "", None).hint) from None
        raise _syntax_error(exc, text, file, hide) from None
    except _CONVERSION_ERRORS as exc:  # raised outside any one value's conversion
        raise SpecError("", HIDDEN if hide else type(exc).__name__, "cannot read the YAML document",
                        "simplify the document: plain mappings, lists and scalars", file=file) from None
    except RecursionError:  # the depth limit keeps this away unless it was raised past what Python allows
        raise SpecError("", f"more than {limits.max_depth} levels", "nesting too deep to read",
                        f"flatten the structure, or lower {L.ENV_MAX_DEPTH}", file=file) from None
    if dup:
        raise SpecErrors(dup)
    return data, marks


def _at_mark(file: str | None, mark: Any, got: Any, rule: str, hint: str) -> SpecError:
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    return SpecError("", got, rule, hint, file=file, line=line, column=column)


def _at(file: str | None, text: str, position: int, got: Any, rule: str, hint: str) -> SpecError:
    position = max(0, min(position, len(text)))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return SpecError("", got, rule, hint, file=file, line=line, column=column)


_QUOTED = re.compile(r"'(?!<)[^']*'|\"[^\"]*\"")


def _syntax_error(exc: yaml.YAMLError, text: str, file: str | None, hide: bool) -> SpecError:
    """A YAML error at its line and column; for a layout file without the line or any quoted fragment."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    rule = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    if hide:
        rule = _QUOTED.sub("'…'", rule)
        got: Any = HIDDEN
    else:
        lines = text.split("\n")
        got = short(lines[mark.line].strip()) if mark is not None and mark.line < len(lines) else None
    return _at_mark(file, mark, got, rule, "check indentation, colons and quotes on that line")

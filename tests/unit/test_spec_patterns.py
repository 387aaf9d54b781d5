"""Every pattern in the spec matches in full: a value that matches plus a trailing newline is refused.

Python's `re.match(r"...$", s)` accepts "value\\n" (`$` also matches before a final newline);
pydantic's `pattern=` runs on the Rust engine (pinned in SpecModel), where it does not. Both are
checked here for every pattern, not only the ones a test happens to name."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Annotated, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from tdist.spec import base, models, operators

ROOT = Path(__file__).resolve().parents[2]


def _pattern_fields() -> list[tuple[str, Any, str]]:
    out = []
    for module in (models, operators):
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__:
                for name, f in cls.model_fields.items():
                    for meta in f.metadata:
                        pattern = getattr(meta, "pattern", None)
                        if pattern:
                            out.append((f"{cls.__name__}.{name}", (cls, f), pattern))
    return out


FIELDS = _pattern_fields()


def test_the_patterns_are_found():
    names = {n for n, _f, _p in FIELDS}
    assert {"GraphSpec.name", "WorkerSpec.name", "OperatorBase.name", "PythonOperatorSpec.implementation",
            "SrunLaunchSpec.time_limit", "RouterParameters.context_target"} <= names
    assert base.SpecModel.model_config["regex_engine"] == "rust-regex"


@pytest.mark.parametrize(("name", "field", "pattern"), FIELDS, ids=[n for n, _f, _p in FIELDS])
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_trailing_newline_is_refused(name: str, field: Any, pattern: str, data: st.DataObject) -> None:
    cls, info = field  # the field as its model validates it (the model's regex engine)
    adapter = TypeAdapter(Annotated[info.annotation, info], config={"regex_engine": cls.model_config["regex_engine"]})
    value = data.draw(st.from_regex(pattern, fullmatch=True).filter(lambda s: "\n" not in s))
    assert adapter.validate_python(value) == value
    for bad in (value + "\n", value + "\r\n", "\n" + value):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


def test_no_dollar_anchored_re_match_in_the_spec():
    """`re.match(r"...$")` / `X.match` with a `$`-anchored compiled pattern: use re.fullmatch."""
    offenders = []
    for path in sorted((ROOT / "tdist" / "spec").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("match", "compile"):
                args = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if args and args[0].value.endswith("$"):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    assert re.match(r"^a$", "a\n")  # why: Python's `$` matches before a final newline

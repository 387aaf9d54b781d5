"""Operator loading: every mistake is an OperatorLoadError that says what to fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tdist.errors import OperatorLoadError
from tdist.runtime.config import OperatorConfig
from tdist.runtime.loader import load_operator_class

HELLO = str(Path(__file__).resolve().parents[2] / "examples" / "hello_world" / "operators")


@pytest.fixture(autouse=True)
def _path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(HELLO)


def cfg(**kw: object) -> OperatorConfig:
    return OperatorConfig.model_validate({"name": "op", "kind": "python", **kw})


def test_loads_a_python_operator() -> None:
    cls = load_operator_class(cfg(implementation="hello_world_ops:EncoderOperator"))
    assert cls.__name__ == "EncoderOperator"


@pytest.mark.parametrize(
    "impl, message",
    [
        ("hello_world_ops", 'must look like "package.module:ClassName"'),
        ("a:b:c", 'must look like "package.module:ClassName"'),
        ("no_such_mod_abc:X", "cannot import 'no_such_mod_abc'"),
        ("hello_world_ops:Nope", "has no class 'Nope'; operator classes there: DecoderOperator, EncodeDecodeOperator, EncoderOperator"),
        ("hello_world_ops:np", "is not a subclass of tdist.runtime.Operator"),
    ],
)
def test_load_errors_say_what_to_fix(impl: str, message: str) -> None:
    with pytest.raises(OperatorLoadError) as info:
        load_operator_class(cfg(implementation=impl))
    assert message in str(info.value)
    assert "'op'" in str(info.value)


def test_python_kind_needs_an_implementation() -> None:
    with pytest.raises(OperatorLoadError, match="needs implementation"):
        load_operator_class(cfg())


def test_unknown_frontend_protocol() -> None:
    with pytest.raises(OperatorLoadError, match="frontend protocol 'smtp' unknown"):
        load_operator_class(OperatorConfig(name="fe", kind="frontend", parameters={"protocol": "smtp"}))


def test_import_error_inside_module_names_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_op_mod.py").write_text("import not_installed_engine_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_op_mod", None)
    with pytest.raises(OperatorLoadError, match="not_installed_engine_xyz"):
        load_operator_class(cfg(implementation="broken_op_mod:Op"))

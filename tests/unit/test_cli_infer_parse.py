"""`tdist infer` argument parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tdist.cli.load import percentile
from tdist.cli.runtime_cmds import parse_input, parse_param
from tdist.errors import BadRequest


def test_inputs() -> None:
    name, arr = parse_input("input=[1,2,3]")
    assert name == "input" and arr.tolist() == [1, 2, 3] and arr.dtype == np.int64
    _, arr = parse_input("x:float32=[[1,2],[3,4]]")
    assert arr.dtype == np.float32 and arr.shape == (2, 2)
    _, arr = parse_input('t="hello"')
    assert arr.tolist() == [b"hello"]
    _, arr = parse_input("t=plain text")
    assert arr.tolist() == [b"plain text"]


def test_npy_input(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, np.eye(3, dtype=np.float16))
    _, arr = parse_input(f"m=@{p}")
    assert arr.dtype == np.float16 and arr.shape == (3, 3)
    with pytest.raises(BadRequest, match="cannot load"):
        parse_input(f"m=@{tmp_path / 'missing.npy'}")


@pytest.mark.parametrize("bad, msg", [("noequals", "expected NAME=VALUE"), ("=[1]", "empty input name"),
                                      ("x:notadtype=[1]", "bad dtype")])
def test_bad_inputs(bad: str, msg: str) -> None:
    with pytest.raises(BadRequest, match=msg):
        parse_input(bad)


def test_params() -> None:
    assert parse_param("k=3") == ("k", 3)
    assert parse_param("k=abc") == ("k", "abc")
    assert parse_param('k={"a": [1]}') == ("k", {"a": [1]})
    with pytest.raises(BadRequest):
        parse_param("novalue")


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1.0], 99) == 1.0

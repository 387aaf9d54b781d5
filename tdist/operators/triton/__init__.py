"""Triton core models as tdist operators (`kind: triton`).

`tdist.operators.triton:TritonCoreOperator` is what the loader uses. Importing this package
is light (tritonclient and the server are touched only when an operator is built/started).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TritonCoreOperator", "TritonNotAvailable"]


def __getattr__(name: str) -> Any:
    if name == "TritonCoreOperator":
        from tdist.operators.triton.operator import TritonCoreOperator

        return TritonCoreOperator
    if name == "TritonNotAvailable":
        from tdist.operators.triton.install import TritonNotAvailable

        return TritonNotAvailable
    raise AttributeError(name)

"""A rule a valid-looking graph breaks, found by a cross-field check (the loader adds file/line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """Where (`loc` into the YAML), what was found, the rule broken and how to fix it."""

    loc: Loc
    got: Any
    rule: str
    hint: str | None = None
    on_key: bool = False

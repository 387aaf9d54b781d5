"""What every spec model shares: immutability, unknown keys rejected, the `pkg.mod:Class` syntax."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

IMPLEMENTATION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
"""`pkg.mod:Class` — only the syntax is checked here; the runtime imports it."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SpecModel(BaseModel):
    """Base of every spec model: immutable, unknown keys rejected (the loader adds "did you mean").

    `pattern=` constraints run on pydantic's Rust regex engine, pinned here: there `$` is the end of
    the text, so `^...$` is a full match (Python's `re.match(r"...$")` would let a trailing newline
    through). Floats are finite: `.inf` / `.nan` in a timeout or fraction is a mistake, and the plan
    converts some of them to integers."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, regex_engine="rust-regex",
                              allow_inf_nan=False)

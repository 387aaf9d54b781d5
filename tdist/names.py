"""Names of deployments, workers and operators: one rule, checked everywhere a name enters.

A name becomes a NATS subject token, a JetStream stream name, a discovery key and a directory
under `$TDIST_HOME/runs/`, so it may hold only letters, digits, `_` and `-`, must start with a
letter, and is at most `NAME_MAX_LEN` characters. Matched in full (`re.fullmatch`): a `$`-anchored
`re.match` would let a trailing newline through. Imports nothing of tdist, so every layer may use it.
"""

from __future__ import annotations

import re

NAME_MAX_LEN = 64
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
"""For pydantic fields (Rust regex: `$` is the end of the text). Same rule as `is_valid_name`."""

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")

NAME_RULE = (
    f"a name starts with a letter and holds only letters, digits, '_' and '-' (at most {NAME_MAX_LEN} characters)"
)


def is_valid_name(value: object) -> bool:
    """True when `value` is a str that is a valid name in full."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def suggest_name(value: str) -> str:
    """A valid name close to `value` (for the hint of an error), e.g. '../../victim' → 'victim'."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")
    cleaned = re.sub(r"^[^A-Za-z]+", "", cleaned)[:NAME_MAX_LEN]
    return cleaned or "my-deployment"

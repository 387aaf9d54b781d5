"""Under CI=true a skipped test fails the run: CI installs every dependency (scripts/setup.sh), so
a skip there means a broken install, not an optional extra. A green CI full of skips is how a
broken install used to pass.

Two kinds of test may still skip under CI:
- `gpu`: CI has no GPU (the lent GPU machine runs them);
- `opt_in`: tests that run only when explicitly asked for (an environment variable that, e.g.,
  lets them ask a package index), never because something is missing.

Loaded from tests/conftest.py (`pytest_plugins`); tests/unit/test_ci_skips.py runs it on inner
pytest sessions.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

ALLOWED_MARKS = ("gpu", "opt_in")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "opt_in: runs only when explicitly asked for; may skip under CI=true")


def _allowed(node: Any) -> bool:
    return any(node.get_closest_marker(m) is not None for m in ALLOWED_MARKS)


def _reason(rep: Any) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(rep: Any, what: str) -> None:
    reason = _reason(rep)
    rep.outcome = "failed"
    rep.longrepr = (f"{what} skipped under CI=true: {reason}\n"
                    "CI installs every dependency (bash scripts/setup.sh): a skip here means the install is broken. "
                    "Only tests marked gpu or opt_in may skip in CI.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if in_ci() and rep.skipped and not hasattr(rep, "wasxfail") and not _allowed(item):
        _fail_skip(rep, f"test {item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: Any) -> Any:
    """A module that skips itself at import (`importorskip`, `allow_module_level`) fails too,
    unless the module is marked gpu/opt_in (pytestmark) or lives under tests/gpu/."""
    outcome = yield
    rep = outcome.get_result()
    if not (in_ci() and rep.skipped):
        return
    path = str(getattr(collector, "path", "") or "")
    if f"{os.sep}gpu{os.sep}" in path or _allowed(collector):
        return
    _fail_skip(rep, f"module {rep.nodeid}")

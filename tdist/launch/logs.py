"""Log tails: the last lines of a log, for every error that says why something failed to start.

One helper for every launcher, the embedded servers and the CLI, so every failure shows its tail
the same way (ARCHITECTURE: "on failure show the last log lines of what failed").
"""

from __future__ import annotations

import os
from pathlib import Path

#: Lines a failure shows by default.
TAIL_LINES = 20


def tail_file(path: str | os.PathLike[str] | None, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a text file; "" when there is no such file (yet)."""
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

"""Operators for the lifecycle tests: an engine that never finishes loading, a worker told to crash.

Both do what a real engine can do (load for a long time with a child process running; fail at
start), so the supervisor's behaviour is tested on real processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tdist.runtime import Operator, Request


class SlowStart(Operator):
    """Starts an "engine" child process, writes its pid to `parameters.started_file` (the test's
    readiness signal), then never finishes starting: like a large model still loading."""

    async def start(self) -> None:
        engine = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        Path(self.parameters["started_file"]).write_text(str(engine.pid))
        await asyncio.Event().wait()

    async def execute(self, request: Request) -> None:  # never reached: start never ends
        await request.send({}, final=True)


class CrashWhenMarked(Operator):
    """Echoes its input; refuses to start while `parameters.crash_file` exists (a broken restart)."""

    async def start(self) -> None:
        if Path(self.parameters["crash_file"]).exists():
            raise RuntimeError(f"told to crash: {self.parameters['crash_file']} exists")

    async def execute(self, request: Request) -> None:
        await request.send({"output": request.inputs["input"]}, final=True)

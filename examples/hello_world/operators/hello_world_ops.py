"""Hello world: encoder → decoder driven by an encoder_decoder operator.

encoder:  tile the input `input_copies` times along the first axis, then invert it
          (bitwise NOT for integers and bools, negation for floats); optional `delay`
          seconds per input element simulates work.
decoder:  invert back and keep the first 1/`input_copies` of the first axis.
encoder_decoder: calls encoder then decoder through RemoteOperator; its output equals its input.
"""

from __future__ import annotations

import asyncio

import numpy as np

from tdist.errors import BadRequest
from tdist.runtime import Operator, Request


def _invert(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind in ("i", "u", "b"):
        return np.invert(x)
    if x.dtype.kind == "f":
        return -x
    raise BadRequest(f"hello world inverts integers, bools and floats, not {x.dtype}")


def _input(request: Request) -> np.ndarray:
    if "input" not in request.inputs:
        raise BadRequest(f"missing input 'input' (got {sorted(request.inputs)})")
    x = request.inputs["input"]
    if x.ndim == 0:
        raise BadRequest("input must have at least one dimension")
    return x


class EncoderOperator(Operator):
    async def execute(self, request: Request) -> None:
        x = _input(request)
        copies = int(request.parameters.get("input_copies", self.parameters.get("input_copies", 1)))
        if copies < 1:
            raise BadRequest(f"input_copies must be ≥ 1, got {copies}")
        delay = float(request.parameters.get("delay", self.parameters.get("delay", 0)))
        if delay > 0:
            await asyncio.sleep(delay * x.size)
        reps = (copies,) + (1,) * (x.ndim - 1)
        await request.send({"output": _invert(np.tile(x, reps))}, parameters={"input_copies": copies}, final=True)


class DecoderOperator(Operator):
    async def execute(self, request: Request) -> None:
        x = _input(request)
        copies = int(request.parameters.get("input_copies", self.parameters.get("input_copies", 1)))
        if copies < 1 or x.shape[0] % copies:
            raise BadRequest(f"first dimension {x.shape[0]} is not a multiple of input_copies={copies}")
        delay = float(request.parameters.get("delay", self.parameters.get("delay", 0)))
        if delay > 0:
            await asyncio.sleep(delay * x.size)
        await request.send({"output": _invert(x[: x.shape[0] // copies])}, final=True)


class EncodeDecodeOperator(Operator):
    """Calls encoder then decoder; operators named by parameters `encoder` / `decoder`."""

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self._encoder = context.remote(str(self.parameters.get("encoder", "encoder")))
        self._decoder = context.remote(str(self.parameters.get("decoder", "decoder")))

    async def execute(self, request: Request) -> None:
        x = _input(request)
        encoded = await self._encoder.infer({"input": x}, dict(request.parameters))
        params = dict(request.parameters)
        params.update(encoded.parameters)
        decoded = await self._decoder.infer({"input": encoded.outputs["output"]}, params)
        await request.send({"output": decoded.outputs["output"]}, final=True)

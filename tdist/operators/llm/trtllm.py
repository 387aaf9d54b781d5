"""`kind: trtllm` — a TensorRT-LLM engine (its LLM API) served as a tdist operator.

Same engine interface as the vLLM operator (tdist.operators.llm.llm_common), so the router,
frontend and `tdist infer --prompt` work unchanged. Written against TensorRT-LLM's LLM API:

    from tensorrt_llm import LLM, SamplingParams
    llm = LLM(model=..., tensor_parallel_size=..., **engine_args)
    result = llm.generate_async(prompt, sampling_params, streaming=True)
    async for out in result: out.outputs[0].text_diff / .token_ids_diff / .finish_reason
    result.abort(); llm.shutdown()

Multi-GPU: the plan launches the worker as an MPI world, `mpirun -n WORLD_SIZE
trtllm-llmapi-launch python -m tdist.runtime.worker ...`; rank 0 runs this operator and the LLM
API drives the other ranks. Engine args come from the YAML and/or `engine_args.config:
configs/trtllm_*.yaml`.

TensorRT-LLM has no wheel for our development machines (no GPU, glibc): it is imported lazily in
`start()`, and its absence is a clear OperatorLoadError. What was and was not verified is in
docs/llm.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator

from tdist.errors import BadRequest, OperatorLoadError
from tdist.operators.llm.convention import LLMPrompt, SamplingOptions, render_chat
from tdist.operators.llm.llm_common import Chunk, LLMEngine, LLMEngineOperator

TRTLLM_HINT = (
    "pip install tensorrt_llm (NVIDIA's wheel, Linux x86_64/aarch64 with a CUDA GPU; or run in the "
    "tdist TENSORRTLLM image: container/build.sh --framework TENSORRTLLM)"
)

#: TensorRT-LLM finish reasons → the team's (stop | length | abort).
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}


def import_tensorrt_llm() -> Any:
    try:
        import tensorrt_llm
    except ModuleNotFoundError as exc:
        raise OperatorLoadError(
            f"kind trtllm needs TensorRT-LLM, which is not installed (module {exc.name!r} not found); {TRTLLM_HINT}"
        ) from None
    except Exception as exc:  # e.g. no CUDA driver, MPI missing
        raise OperatorLoadError(f"importing tensorrt_llm failed: {type(exc).__name__}: {exc}; {TRTLLM_HINT}") from None
    return tensorrt_llm


def to_trtllm_sampling(trt: Any, sampling: SamplingOptions) -> Any:
    kw: dict[str, Any] = dict(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or None,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens or None,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
    )
    if sampling.greedy:
        # TensorRT-LLM's greedy path is top_k=1 (temperature 0 is not accepted everywhere).
        kw.update(temperature=None, top_p=None, top_k=1)
    try:
        return trt.SamplingParams(**kw)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"invalid sampling parameters for TensorRT-LLM: {exc}") from None


def trtllm_llm_args(trt: Any, engine_args: dict[str, Any]) -> dict[str, Any]:
    """Engine args from the plan → `LLM(**kwargs)`.

    The plan adds `gpu_fraction` (the share of each GPU this engine may use); TensorRT-LLM's
    equivalent is `kv_cache_config.free_gpu_memory_fraction`.
    """
    args = dict(engine_args)
    fraction = args.pop("gpu_fraction", None)
    if fraction is not None and "kv_cache_config" not in args:
        kv_cls = getattr(getattr(trt, "llmapi", None), "KvCacheConfig", None) or getattr(trt, "KvCacheConfig", None)
        args["kv_cache_config"] = (
            kv_cls(free_gpu_memory_fraction=float(fraction)) if kv_cls else {"free_gpu_memory_fraction": float(fraction)}
        )
    return args


class TrtllmEngine(LLMEngine):
    """LLMEngine on tensorrt_llm.LLM (generate_async, streaming)."""

    name = "trtllm"

    def __init__(self, engine_args: dict[str, Any], *, logger: Any = None) -> None:
        self.engine_args = dict(engine_args)
        self.logger = logger
        self.trt: Any = None
        self.llm: Any = None
        self.tokenizer: Any = None
        self._results: dict[str, Any] = {}

    async def start(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.trt = import_tensorrt_llm()
        if "model" not in self.engine_args:
            raise OperatorLoadError("TensorRT-LLM engine args need 'model' (HF checkpoint directory or engine directory)")

        llm_args = trtllm_llm_args(self.trt, self.engine_args)

        def build() -> Any:
            try:
                return self.trt.LLM(**llm_args)
            except TypeError as exc:
                raise OperatorLoadError(f"bad TensorRT-LLM engine args: {exc}") from None
            except Exception as exc:
                raise OperatorLoadError(f"TensorRT-LLM engine failed to start: {type(exc).__name__}: {exc}") from exc

        self.llm = await asyncio.to_thread(build)
        self.tokenizer = getattr(self.llm, "tokenizer", None)

    def _engine_prompt(self, prompt: LLMPrompt) -> Any:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.messages is not None:
            return render_chat(self.tokenizer, prompt.messages)
        return prompt.text

    async def generate(
        self,
        prompt: LLMPrompt,
        sampling: SamplingOptions,
        request_id: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> AsyncIterator[Chunk]:
        assert self.llm is not None, "engine not started"
        params = to_trtllm_sampling(self.trt, sampling)
        kwargs: dict[str, Any] = {"streaming": True}
        if extra and extra.get("kv_transfer_params") is not None:
            # Disaggregated serving (issue 9): TensorRT-LLM's DisaggregatedParams.
            kwargs["disaggregated_params"] = self.trt.DisaggregatedParams(**extra["kv_transfer_params"])
        try:
            result = self.llm.generate_async(self._engine_prompt(prompt), params, **kwargs)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"TensorRT-LLM rejected the request: {exc}") from None
        self._results[request_id] = result
        prompt_tokens = len(getattr(result, "prompt_token_ids", None) or [])
        done = False
        try:
            async for out in result:
                comp = out.outputs[0]
                ids = list(comp.token_ids_diff)
                finished = bool(out.finished)
                done = finished
                yield Chunk(
                    text=comp.text_diff,
                    token_ids=ids,
                    finished=finished,
                    finish_reason=_FINISH.get(str(comp.finish_reason), "stop") if finished else None,
                    prompt_tokens=prompt_tokens or len(getattr(out, "prompt_token_ids", None) or []),
                    completion_tokens=len(comp.token_ids),
                )
                if finished:
                    break
        finally:
            self._results.pop(request_id, None)
            if not done:
                try:
                    result.abort()
                except Exception:
                    pass

    async def abort(self, request_id: str) -> None:
        result = self._results.pop(request_id, None)
        if result is not None:
            result.abort()

    def num_unfinished_requests(self) -> int:
        return len(self._results)

    async def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            t0 = time.monotonic()
            await asyncio.to_thread(llm.shutdown)
            if self.logger is not None:
                self.logger.info("TensorRT-LLM engine shut down in %.1f s", time.monotonic() - t0)


class TrtllmOperator(LLMEngineOperator):
    """`kind: trtllm`. See the module doc and docs/llm.md."""

    engine_kind = "trtllm"

    def create_engine(self) -> TrtllmEngine:
        return TrtllmEngine(self.engine_args, logger=self.logger)

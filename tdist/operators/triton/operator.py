"""TritonCoreOperator (`kind: triton`): serve one model of a Triton model repository.

Start: read the model's config.pbtxt, merge the graph YAML's overrides (model_config.py),
write it into this worker's overlay repository under the operator's name, and load it into
this worker's Triton engine, shared by every Triton operator of the process:

- in-process `tritonserver` API when it imports and starts (NGC images), else
- a `tritonserver` process (nvidia-pytriton's binary) on loopback, driven over gRPC.

`parameters.triton_mode` (or $TDIST_TRITON_MODE): auto (default) | in_process | process.
The choice is logged and shown in stats(). Triton's metrics join the worker's registry.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdist.errors import BadRequest, OperatorLoadError
from tdist.operators.triton.install import INSTALL_HINT, TritonNotAvailable, locate_triton
from tdist.operators.triton.metrics import TritonMetricsCollector, fetch_url, register_collector, unregister_collector
from tdist.operators.triton.model_config import apply_overrides, find_model_dir, instance_count, parse_config, write_overlay_model
from tdist.runtime.config import WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request

log = logging.getLogger("tdist.triton")

MODES = ("auto", "in_process", "process")

# numpy dtype → KServe/Triton datatype name (BYTES for object/str/bytes arrays)
_TRITON_DTYPES = {
    "bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16",
}  # fmt: skip


def triton_dtype(arr: np.ndarray) -> str:
    if arr.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    name = "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name
    if name not in _TRITON_DTYPES:
        raise BadRequest(f"dtype {arr.dtype} has no Triton datatype")
    return _TRITON_DTYPES[name]


class _Shared:
    """The one Triton engine of this process, shared by its Triton operators (ref-counted)."""

    engine: Any = None
    refs: int = 0
    workdir: Path | None = None
    collector: TritonMetricsCollector | None = None
    registry: Any = None


def _log_path(worker: WorkerConfig, workdir: Path) -> Path:
    if worker.log_path:
        p = Path(worker.log_path)
        return p.parent / f"{p.stem}.triton.log"
    return workdir / "triton.log"  # no worker log: keep it with the temp workdir (removed on stop)


def _workdir(worker: WorkerConfig) -> Path:
    """The overlay repository + backend dir: beside the worker's log (one fixed place per worker,
    so a restarted worker reuses it instead of leaving /tmp folders behind), else a temp dir."""
    if worker.log_path:
        p = Path(worker.log_path)
        workdir = p.parent / f"{p.stem}.triton"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        return workdir
    return Path(tempfile.mkdtemp(prefix=f"tdist-triton-{worker.name}-"))


def resolve_mode(parameters: dict[str, Any]) -> str:
    mode = str(parameters.get("triton_mode") or os.environ.get("TDIST_TRITON_MODE") or "auto").replace("-", "_")
    if mode not in MODES:
        raise OperatorLoadError(f"triton_mode {mode!r} unknown; use one of {', '.join(MODES)}")
    return mode


async def _start_engine(worker: WorkerConfig, mode: str, logger: logging.Logger) -> Any:
    """Pick and start an engine (see module doc); errors say what to install."""
    from tdist.operators.triton.inprocess import TritonInProcessEngine, import_tritonserver
    from tdist.operators.triton.server import TritonProcessEngine

    workdir = _workdir(worker)
    log_path = _log_path(worker, workdir)
    reasons = []
    if mode in ("auto", "in_process"):
        try:
            module = import_tritonserver()
            engine = TritonInProcessEngine(workdir, log_path, module=module)
            await engine.start()
            logger.info("Triton: in-process tritonserver API (repository %s, log %s)", engine.repository, log_path)
            _Shared.workdir = workdir
            return engine
        except Exception as exc:  # ImportError, OSError (missing libtritonserver / glibc), start failure
            reasons.append(f"in-process tritonserver API unavailable ({type(exc).__name__}: {exc})")
            if mode == "in_process":
                shutil.rmtree(workdir, ignore_errors=True)
                raise TritonNotAvailable(f"{reasons[0]}; it runs in NGC Triton images (Python 3.12)") from None
            logger.info("Triton: %s; using a tritonserver process", reasons[0])
    try:
        install = locate_triton()
    except TritonNotAvailable as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise TritonNotAvailable("; ".join(reasons + [str(exc)])) from None
    engine = TritonProcessEngine(install, workdir, log_path)
    try:
        await engine.start()
    except Exception:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    logger.info(
        "Triton: tritonserver process pid %s (%s), grpc %s, http %s, metrics %s, log %s",
        engine.proc.pid if engine.proc else None,
        install.binary,
        engine.ports["grpc"],
        engine.ports["http"],
        engine.ports["metrics"],
        log_path,
    )
    _Shared.workdir = workdir
    return engine


def worker_registry(context: OperatorContext) -> Any:
    """The Prometheus registry the worker serves on its metrics port (prometheus_client's default
    registry when the operator runs outside a worker, e.g. in a unit test)."""
    if context.metrics_registry is not None:
        return context.metrics_registry
    from prometheus_client import REGISTRY

    return REGISTRY


async def acquire_engine(context: OperatorContext, mode: str) -> Any:
    if _Shared.engine is None:
        engine = await _start_engine(context.worker, mode, context.logger)
        _Shared.engine = engine
        if engine.metrics_url:
            url = engine.metrics_url
            collector = TritonMetricsCollector(lambda: fetch_url(url))
        else:
            collector = TritonMetricsCollector(engine.metrics_text)
        registry = worker_registry(context)
        if register_collector(registry, collector):
            _Shared.collector, _Shared.registry = collector, registry
    elif mode != "auto" and _Shared.engine.mode != mode:
        raise OperatorLoadError(
            f"operator {context.name!r} asks triton_mode {mode!r} but this worker's Triton runs {_Shared.engine.mode!r}"
        )
    _Shared.refs += 1
    return _Shared.engine


async def release_engine() -> None:
    _Shared.refs -= 1
    if _Shared.refs > 0:
        return
    engine, _Shared.engine = _Shared.engine, None
    if _Shared.collector is not None:
        unregister_collector(_Shared.registry, _Shared.collector)
        _Shared.collector = _Shared.registry = None
    if engine is not None:
        await engine.stop()
    if _Shared.workdir is not None:
        shutil.rmtree(_Shared.workdir, ignore_errors=True)
        _Shared.workdir = None
    _Shared.refs = 0


class TritonCoreOperator(Operator):
    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        cfg = context.config
        if not cfg.repository:
            raise OperatorLoadError(
                f"operator {cfg.name!r}: kind triton needs `repository:` (a Triton model repository folder)"
            )
        try:
            import tritonclient  # noqa: F401
        except ImportError:
            raise OperatorLoadError(f"operator {cfg.name!r}: kind triton needs tritonclient; install: {INSTALL_HINT}") from None
        self.repository = cfg.repository
        self.model_name = cfg.model_name or cfg.name
        self.served_name = cfg.name
        self.mode = resolve_mode(cfg.parameters)
        self.engine: Any = None
        self.model_config: dict[str, Any] = {}
        self.model_metadata: dict[str, Any] = {}
        self._inputs: dict[str, dict[str, Any]] = {}
        self._outputs: list[str] = []
        self._max_batch = 0
        self._served = 0
        self._errors = 0
        self._busy_s = 0.0

    async def start(self) -> None:
        cfg = self.context.config
        source = find_model_dir(self.repository, self.model_name)
        base = parse_config((source / "config.pbtxt").read_text(), source=str(source / "config.pbtxt"))
        config = apply_overrides(
            base, cfg.triton_config, parameters=cfg.parameters, name=self.served_name, where=f"operator {cfg.name!r} triton_config"
        )
        if "version_policy" not in cfg.triton_config and (source / str(cfg.version)).is_dir():
            config["version_policy"] = {"specific": {"versions": [cfg.version]}}
        self.engine = await acquire_engine(self.context, self.mode)
        try:
            write_overlay_model(self.engine.repository, source, self.served_name, config)
            await self.engine.load(self.served_name)
            self.model_config = await self.engine.config(self.served_name)
            self.model_metadata = await self.engine.metadata(self.served_name)
        except BaseException:
            await release_engine()
            self.engine = None
            raise
        self._max_batch = int(self.model_config.get("max_batch_size", 0) or 0)
        optional = {i["name"] for i in self.model_config.get("input", []) if i.get("optional")}
        self._inputs = {
            i["name"]: {"datatype": i["datatype"], "shape": list(i["shape"]), "optional": i["name"] in optional}
            for i in self.model_metadata.get("inputs", [])
        }
        self._outputs = [o["name"] for o in self.model_metadata.get("outputs", [])]
        self.logger.info(
            "Triton model %r (from %s/%s) ready in %s mode: %d instance(s), parameters %s",
            self.served_name,
            self.repository,
            self.model_name,
            self.engine.mode,
            instance_count(self.model_config),
            {k: v.get("string_value") for k, v in self.model_config.get("parameters", {}).items()},
        )

    def _validate(self, inputs: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        described = ", ".join(f"{n} ({i['datatype']}{i['shape']})" for n, i in self._inputs.items())
        for key, value in inputs.items():
            if key not in self._inputs:
                raise BadRequest(f"model {self.served_name!r} has no input {key!r}; its inputs: {described}", operator=self.name)
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
            want = self._inputs[key]
            got = triton_dtype(arr)
            if got != want["datatype"]:
                raise BadRequest(
                    f"input {key!r} of model {self.served_name!r} must be {want['datatype']}, got {got} ({arr.dtype})",
                    operator=self.name,
                )
            shape = want["shape"]
            expect = ([-1] + shape) if self._max_batch > 0 else shape
            if len(arr.shape) != len(expect) or any(e >= 0 and e != a for e, a in zip(expect, arr.shape)):
                raise BadRequest(
                    f"input {key!r} of model {self.served_name!r} has shape {list(arr.shape)}, expected {expect} (-1: any)",
                    operator=self.name,
                )
            arrays[key] = arr
            dtypes[key] = got
        missing = [n for n, i in self._inputs.items() if n not in arrays and not i["optional"]]
        if missing:
            raise BadRequest(f"model {self.served_name!r} is missing input(s) {missing}; its inputs: {described}", operator=self.name)
        return arrays, dtypes

    async def execute(self, request: Request) -> None:
        t0 = time.perf_counter()
        try:
            arrays, dtypes = self._validate(request.inputs)
            wanted = request.parameters.get("outputs")
            outputs = [o for o in self._outputs if not wanted or o in wanted]
            result = await self.engine.infer(self.served_name, arrays, dtypes, outputs, request.time_left_s)
        except BaseException:
            self._errors += 1
            raise
        finally:
            self._busy_s += time.perf_counter() - t0
        self._served += 1
        await request.send(result, final=True)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.unload(self.served_name)
            self.engine = None
            await release_engine()

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "triton": engine.describe() if engine is not None else None,
            "model": self.served_name,
            "source_model": self.model_name,
            "instances": instance_count(self.model_config) if self.model_config else None,
            "served": self._served,
            "errors": self._errors,
            "busy_s": round(self._busy_s, 6),
            # for the KServe frontend: Triton's own answers for this model
            "model_metadata": self.model_metadata,
            "model_config": self.model_config,
        }

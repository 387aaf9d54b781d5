"""The graph schema reference (docs/spec.md), generated from the models' field descriptions.

    python -m tdist.spec.reference --write docs/spec.md   # refresh the generated part in place
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tdist.spec.models import (
    ClusterSpec,
    DataPlaneSpec,
    DiscoverySpec,
    DisaggLayoutFile,
    GraphSpec,
    LaunchSpec,
    LLMSpec,
    LocalLaunchSpec,
    MpirunLaunchSpec,
    PlacementSpec,
    RequestPlaneSpec,
    ServerSetSpec,
    SrunLaunchSpec,
    WorkerSpec,
)
from tdist.spec.operators import (
    OPERATOR_KINDS,
    FrontendParameters,
    InstanceGroupSpec,
    OperatorBase,
    RouterParameters,
    TritonConfigSpec,
    TritonParameters,
    TrtllmParameters,
    VllmParameters,
)

BEGIN = "<!-- BEGIN GENERATED: python -m tdist.spec.reference --write docs/spec.md -->"
END = "<!-- END GENERATED -->"

_OPERATORS: list[tuple[str, type[BaseModel]]] = [("operators[] (every kind)", OperatorBase)] + [
    (f"operators[] kind: {kind}", model) for kind, model in OPERATOR_KINDS.items()
]
SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", GraphSpec),
    ("request_plane", RequestPlaneSpec),
    ("data_plane", DataPlaneSpec),
    ("discovery", DiscoverySpec),
    *_OPERATORS,
    ("operators[].parameters, kind: router", RouterParameters),
    ("operators[].parameters, kind: frontend", FrontendParameters),
    ("operators[].parameters, kind: triton", TritonParameters),
    ("operators[].parameters, kind: vllm", VllmParameters),
    ("operators[].parameters, kind: trtllm", TrtllmParameters),
    ("operators[].triton_config (kind: triton)", TritonConfigSpec),
    ("operators[].triton_config.instance_group[]", InstanceGroupSpec),
    ("workers[]", WorkerSpec),
    ("workers[].placement", PlacementSpec),
    ("llm", LLMSpec),
    ("llm.servers / llm.context_servers / llm.generation_servers", ServerSetSpec),
    ("layout file (llm.layout_file, configs/*.yaml)", DisaggLayoutFile),
    ("cluster", ClusterSpec),
    ("launch", LaunchSpec),
    ("launch.local", LocalLaunchSpec),
    ("launch.mpirun", MpirunLaunchSpec),
    ("launch.srun", SrunLaunchSpec),
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # the operators' union: one model per kind
        return "mapping (by kind)"
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(tp))
    if origin in (typing.Union, __import__("types").UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"map[{_type_name(k)}, {_type_name(v)}]"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "`{}`" if value == {} else ("`[]`" if value == [] else "(defaults)")
    if field.default is PydanticUndefined or field.default is None:
        return "—"
    return f"`{field.default}`"


def render_reference() -> str:
    """Markdown tables, one per section: key, type, default, description."""
    out = []
    for title, model in SECTIONS:
        out += [f"### `{title}`", "", (model.__doc__ or "").strip().splitlines()[0], "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for name, f in sorted(model.model_fields.items(), key=lambda item: item[0] != "kind"):  # kind first
            if model is not OperatorBase and issubclass(model, OperatorBase) and name in OperatorBase.model_fields:
                continue  # listed once, under "every kind"
            alias = getattr(f.validation_alias, "choices", None)
            key = f"`{name}`" + (f" (also `{alias[1]}`)" if alias and len(alias) > 1 else "")
            out.append(f"| {key} | {_type_name(f.annotation)} | {_default(f)} | {(f.description or '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def splice(doc: str) -> str:
    """`doc` with the text between the markers replaced by the current reference."""
    head, rest = doc.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{render_reference()}\n{END}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description="Print (or splice into a file) the graph schema reference.")
    ap.add_argument("--write", metavar="FILE", help="replace the generated part of FILE in place")
    args = ap.parse_args()
    if args.write:
        with open(args.write, encoding="utf-8") as fh:
            doc = fh.read()
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(splice(doc))
    else:
        print(render_reference())


if __name__ == "__main__":
    main()

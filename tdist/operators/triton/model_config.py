"""Triton model configs: read config.pbtxt, apply the graph YAML's overrides, write a per-worker overlay.

Pure functions (no processes): the overlay repository a worker's Triton serves holds, per
operator, a model directory named after the operator whose `config.pbtxt` is the source one
with the YAML's `triton_config` merged in, and whose version folders are links to the source.

Override rules (`triton_config` in the graph YAML, plus the operator's `parameters`):
- `instance_group`: a non-empty list replaces the model's list; `kind` may be `KIND_CPU`/`cpu`/`KIND_GPU`/`gpu`.
- `parameters`: merged key by key; values become Triton string parameters (`2` → "2").
  The operator's own `parameters` (OperatorConfig.parameters) are merged first, so
  `triton_config.parameters` wins when both name a key.
- any other ModelConfig field (`max_batch_size`, `dynamic_batching`, ...): replaces the field.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path
from typing import Any

from tdist.errors import OperatorLoadError

#: OperatorConfig.parameters keys that steer tdist itself and are not passed to the model.
RESERVED_PARAMETERS = frozenset({"triton_mode"})

_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO", "model": "KIND_MODEL"}


def _pb():
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise OperatorLoadError(
            f"Triton model configs need tritonclient's protos ({exc}); install: pip install 'tdist[triton]'"
        ) from exc
    return model_config_pb2, text_format, json_format


def parse_config(text: str, *, source: str = "config.pbtxt") -> dict[str, Any]:
    """config.pbtxt text → ModelConfig as a dict (proto field names)."""
    model_config_pb2, text_format, json_format = _pb()
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise OperatorLoadError(f"{source}: not a valid Triton model config: {exc}") from None
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def render_config(config: dict[str, Any]) -> str:
    """ModelConfig dict → config.pbtxt text (validates every field against Triton's proto)."""
    model_config_pb2, text_format, json_format = _pb()
    msg = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(config, msg)
    except json_format.ParseError as exc:
        raise OperatorLoadError(f"Triton model config override is invalid: {exc}") from None
    return text_format.MessageToString(msg)


def _field_names() -> list[str]:
    model_config_pb2, _, _ = _pb()
    return [f.name for f in model_config_pb2.ModelConfig.DESCRIPTOR.fields]


def _normalize_instance_group(groups: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(groups, dict):
        groups = [groups]
    if not isinstance(groups, list):
        raise OperatorLoadError(f"{where}.instance_group must be a list of {{count, kind}} (got {groups!r})")
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise OperatorLoadError(f"{where}.instance_group[{i}] must be a mapping (got {g!r})")
        g = dict(g)
        if "kind" in g:
            kind = str(g["kind"])
            g["kind"] = _KINDS.get(kind.lower(), kind.upper())
        if "count" in g:
            g["count"] = int(g["count"])
        out.append(g)
    return out


def _string_parameter(value: Any) -> dict[str, str]:
    if isinstance(value, dict) and set(value) == {"string_value"}:
        return {"string_value": str(value["string_value"])}
    if isinstance(value, bool):
        return {"string_value": "true" if value else "false"}
    return {"string_value": str(value)}


def apply_overrides(
    config: dict[str, Any],
    overrides: dict[str, Any] | None,
    *,
    parameters: dict[str, Any] | None = None,
    name: str | None = None,
    where: str = "triton_config",
) -> dict[str, Any]:
    """A new config dict: `config` with the YAML's overrides merged (see the module doc)."""
    out = dict(config)
    fields = set(_field_names())
    params = dict(out.get("parameters", {}))
    for key, value in (parameters or {}).items():
        if key not in RESERVED_PARAMETERS:
            params[key] = _string_parameter(value)
    for key, value in (overrides or {}).items():
        if key == "parameters":
            if not isinstance(value, dict):
                raise OperatorLoadError(f"{where}.parameters must be a mapping (got {value!r})")
            for pk, pv in value.items():
                params[pk] = _string_parameter(pv)
        elif key == "instance_group":
            if not value:  # an empty list (the spec's default) means: keep the model's own
                continue
            out["instance_group"] = _normalize_instance_group(value, where)
        elif key in fields:
            out[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OperatorLoadError(f"{where}: {key!r} is not a Triton ModelConfig field{hint}")
    if params:
        out["parameters"] = params
    if name is not None:
        out["name"] = name
    render_config(out)  # validate now, with the YAML's location in the message
    return out


def find_model_dir(repository: str | os.PathLike[str], model_name: str) -> Path:
    """The source model directory; a clear error names what is there when it is missing."""
    repo = Path(repository).expanduser()
    if not repo.is_dir():
        raise OperatorLoadError(f"Triton model repository {str(repo)!r} does not exist (operator repository:)")
    model_dir = repo / model_name
    if not (model_dir / "config.pbtxt").is_file():
        found = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
        raise OperatorLoadError(
            f"model {model_name!r} not found in Triton repository {str(repo)!r} (no {model_name}/config.pbtxt)"
            + (f"; models there: {', '.join(found)}" if found else "")
        )
    return model_dir


def write_overlay_model(
    overlay_repo: str | os.PathLike[str],
    source_dir: str | os.PathLike[str],
    served_name: str,
    config: dict[str, Any],
) -> Path:
    """Create overlay_repo/served_name: the rendered config + links to the source's other entries."""
    source = Path(source_dir).resolve()
    dest = Path(overlay_repo) / served_name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "config.pbtxt").write_text(render_config(config))
    for entry in source.iterdir():
        if entry.name == "config.pbtxt":
            continue
        (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


def instance_count(config: dict[str, Any]) -> int:
    """Instances Triton runs for a config (sum of instance_group counts; 1 when unset)."""
    groups = config.get("instance_group") or []
    return sum(int(g.get("count", 1)) for g in groups) if groups else 1

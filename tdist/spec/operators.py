"""Operator specs: one model per `kind`, told apart by `kind` (a discriminated union).

Each of tdist's own kinds (router, frontend, triton, vllm, trtllm) has a typed `parameters`
model, so a misspelt setting (`polcy: kv`) is an unknown key with "did you mean" at validation
instead of a default silently taken at start. `python` operators keep free-form parameters: they
belong to user code. The parameter names are the keys the operators read from
`OperatorConfig.parameters` (tdist/operators/*); the plan passes the ones the graph sets, so the
operators' own defaults, written in the descriptions here, apply to the rest.

Engine arguments (`engine_args`) stay the engine's business: tdist/spec/engine_args.py checks
their names against the installed engine, and passes them through when it is not installed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from tdist.names import NAME_PATTERN
from tdist.spec.base import IMPLEMENTATION_PATTERN, LogLevel, SpecModel

Role = Literal["both", "context", "generation"]

#: Request parameters the deployment sets for itself; a frontend's allowed_parameters cannot name them.
INTERNAL_PARAMETERS = frozenset({"kv_transfer_params", "disagg", "tdist_context_worker", "routed_to"})


def _only(*protocols: str) -> dict[str, Any]:
    """Field metadata: the frontend protocols a frontend parameter applies to."""
    return {"protocols": list(protocols)}


# ---------------------------------------------------------------- parameters of tdist's kinds


class RouterParameters(SpecModel):
    """`kind: router` settings (tdist/operators/routing/: router.py, disagg.py, kv_routing.py)."""

    policy: Literal["round_robin", "least_loaded", "prefix", "kv"] = Field(
        "round_robin", description="How an instance is picked: round_robin, least_loaded, prefix (same prompt "
        "prefix → same instance) or kv (where the prompt's KV blocks are cached, load-bounded)")
    prefix_chars: int = Field(64, ge=1, description="policy prefix: leading prompt characters that pick the instance")
    load_weight: float = Field(1.0, ge=0, description="policy kv: cost of one request in flight, in prompt blocks")
    max_load_gap: int = Field(4, ge=0, description="policy kv: never pick an instance this many requests busier than the least loaded")
    kv_index_blocks: int = Field(20000, ge=1, description="policy kv: prefix blocks remembered per instance (LRU)")
    kv_block_size: int | None = Field(None, ge=1, description="policy kv: tokens per KV block (default: the engine's, from its stats)")
    tokenizer: str | None = Field(None, description="Tokenizer for prompt lengths and KV blocks (default: the engine's model_path)")
    retries: int = Field(2, ge=0, description="Other instances tried when one fails before it sent anything")
    failure_cooldown_s: float = Field(5.0, ge=0, description="Seconds a failed instance is skipped")
    discovery_max_age_s: float = Field(0.5, ge=0, description="Seconds the router caches its view of the instances")
    discovery_wait_s: float = Field(1.0, ge=0, description="Seconds to look again when discovery lists no instance")
    role: Role | None = Field(None, description="Route only to instances of this role (default: any)")
    context_target: str | None = Field(None, pattern=NAME_PATTERN, description="Two targets: the context (prefill) operator (default: targets[0])")
    generation_target: str | None = Field(None, pattern=NAME_PATTERN, description="Two targets: the generation (decode) operator (default: targets[1])")
    disagg_min_prompt_tokens: int = Field(0, ge=0, description="Two targets: shorter prompts are prefilled on the generation worker")
    context_timeout_s: float = Field(30.0, gt=0, description="Two targets: seconds a prefill may take before the generation worker prefills itself")
    context_retries: int = Field(1, ge=0, description="Two targets: other context workers tried after one fails")


class FrontendParameters(SpecModel):
    """`kind: frontend` settings; each applies to the protocol its description names."""

    request_timeout_s: float | None = Field(None, gt=0, description="Seconds a request may take (default: openai 600, kserve 60)")
    served_model_name: str | None = Field(
        None, description="openai: the model name clients use (default: the LLM operators' served names from the plan)",
        json_schema_extra=_only("openai"))
    model_names: list[str] = Field(default_factory=list, description="openai: more model names it answers to",
                                   json_schema_extra=_only("openai"))
    default_max_tokens: int = Field(16, ge=1, description="openai: max_tokens of a completion that names none",
                                    json_schema_extra=_only("openai"))
    default_chat_max_tokens: int = Field(512, ge=1, description="openai: max_tokens of a chat completion that names none",
                                         json_schema_extra=_only("openai"))
    port_file: str | None = Field(None, description="openai: file the bound port is written to once listening",
                                  json_schema_extra=_only("openai"))
    grpc_port: int | None = Field(8001, ge=0, le=65535, description="kserve: gRPC port (0: a free one; null: no gRPC)",
                                  json_schema_extra=_only("kserve"))
    models: list[str] = Field(default_factory=list, description="kserve: more operators it describes and lets clients call "
                              "besides targets (operators outside both answer 404)", json_schema_extra=_only("kserve"))
    max_body_bytes: int | None = Field(
        None, ge=1, le=(1 << 31) - 1, description="Largest request body in bytes, HTTP and gRPC (default: kserve 67108864 = 64 MiB, "
        "openai 4194304 = 4 MiB); a bigger one is answered 413 before it is read")
    max_deadline_s: float | None = Field(
        None, gt=0, description="kserve: longest deadline a client may ask for (`timeout` in microseconds or `timeout_s`), "
        "in seconds; longer ones are cut to it (default: request_timeout_s)", json_schema_extra=_only("kserve"))
    allowed_parameters: list[str] | None = Field(
        None, description="Request parameters clients may set (kserve: `parameters` keys; openai: the sampling fields "
        "passed to the engine); others are answered 400 (default: kserve any, openai the standard sampling fields). "
        "Internal ones (kv_transfer_params, disagg, tdist_*, _*) are never allowed")
    cors_origins: list[str] = Field(
        default_factory=list, description='Browser origins given CORS headers, e.g. ["https://app.example"] or ["*"] '
        "(default: none, so browsers cannot call the frontend from other sites)")

    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Requests served at once; one more is answered 429 with Retry-After (default: no limit)")
    api_key_env: str | None = Field(
        None, description="openai: environment variable holding the API key clients must send as "
        "`Authorization: Bearer <key>` (401 otherwise; default: no key)", json_schema_extra=_only("openai"))

    @field_validator("allowed_parameters")
    @classmethod
    def _not_internal(cls, v: list[str] | None) -> list[str] | None:
        # the same rule as tdist/operators/frontends/guards.py: is_internal (a unit test keeps them equal)
        bad = [n for n in v or [] if n in INTERNAL_PARAMETERS or n.startswith(("tdist_", "_"))]
        if bad:
            raise ValueError(f"{bad} are internal to the deployment: clients cannot set them")
        return v


def protocol_of_parameter(name: str) -> list[str] | None:
    """The protocols a frontend parameter applies to (None: all)."""
    extra = FrontendParameters.model_fields[name].json_schema_extra
    return list(extra["protocols"]) if isinstance(extra, dict) else None  # type: ignore[arg-type]


class TritonParameters(SpecModel):
    """`kind: triton` settings (model parameters go under `triton_config.parameters`)."""

    triton_mode: Literal["auto", "in_process", "process"] | None = Field(
        None, description="Which Triton runs the model: in_process (the tritonserver API), process (a tritonserver "
        "binary) or auto (in_process when it starts, else process); default: $TDIST_TRITON_MODE, else auto")


class LLMParameters(SpecModel):
    """Settings every LLM operator reads (tdist/operators/llm/llm_common.py)."""

    default_max_tokens: int = Field(16, ge=1, description="max_tokens of a request that names none")
    served_model_name: str | None = Field(
        None, description="Name the model is served under (default: engine_args.served_model_name, else the model path)")
    engine_config: str | None = Field(None, description="Engine-args file (YAML/JSON, relative to the working directory); inline engine_args win")


class TrtllmParameters(LLMParameters):
    """`kind: trtllm` settings (tdist/operators/llm/trtllm.py)."""


class VllmParameters(LLMParameters):
    """`kind: vllm` settings (tdist/operators/llm/vllm.py, routing/disagg.py; docs/llm.md)."""

    engine_nice: int | None = Field(None, ge=-20, le=19, description="Niceness of the engine's processes (default: 10 on CPU, 0 on GPUs)")
    cpu_bind: str | None = Field(None, description='CPU cores for the engine\'s threads: "replica" (core replica % cores) or a list '
                                 'like "0-3" (default: the plan\'s cpu_ids, else vLLM\'s own binding)')
    pin_engine: bool = Field(True, description="Pin every engine process to the cores vLLM bound the model to (CPU)")
    kv_lease_s: int = Field(120, ge=1, description="Disaggregated: seconds a context engine keeps a prefilled KV cache for its puller")
    kv_pull_timeout_s: float = Field(30.0, gt=0, description="Disaggregated: seconds a generation engine waits for a remote prefill's first token")
    nixl_progress: Literal["busy", "off"] | None = Field(
        None, description="Disaggregated: NIXL progress thread (default: busy on context engines, off on generation engines)")
    kv_side_channel_host: str | None = Field(None, description="Disaggregated: NIXL side-channel address (default: 127.0.0.1 or TDIST_HOST_ADDRESS)")
    kv_side_channel_port: int | None = Field(None, ge=1, le=65535, description="Disaggregated: NIXL side-channel port (default: a free one)")


# ---------------------------------------------------------------- Triton model config


class InstanceGroupSpec(SpecModel):
    """One Triton instance group, as in a model's config.pbtxt."""

    count: int = Field(1, ge=1, description="Model instances in this group")
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"] = Field("KIND_CPU", description="Where the instances run")


class TritonParameterSpec(SpecModel):
    """A Triton model parameter value (config.pbtxt `parameters { key: ... value: { string_value: ... } }`)."""

    string_value: str = Field(description="The value, always a string in Triton's config")

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, data: Any) -> Any:
        if isinstance(data, (str, int, float, bool)):
            return {"string_value": str(data)}
        return data

    @field_validator("string_value", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float, bool)) else v


class TritonConfigSpec(SpecModel):
    """Overrides merged into a Triton model's config."""

    instance_group: list[InstanceGroupSpec] = Field(
        default_factory=list, description="Instance groups, e.g. [{count: 1, kind: KIND_CPU}]"
    )
    parameters: dict[str, TritonParameterSpec] = Field(
        default_factory=dict, description='Model parameters, e.g. {delay: {string_value: "0"}}'
    )
    max_batch_size: int | None = Field(None, ge=0, description="Largest batch the model accepts (0: no batching)")
    dynamic_batching: dict[str, Any] | None = Field(None, description="Triton dynamic_batching settings, passed as is")


# ---------------------------------------------------------------- one model per kind


class OperatorBase(SpecModel):
    """What every operator has: a named, versioned request handler that workers host."""

    name: str = Field(pattern=NAME_PATTERN, description="Requests address the operator by this name")
    version: int = Field(1, ge=1, description="Operator version; requests may ask for one")
    max_inflight_requests: int = Field(1, ge=1, description="Requests one worker runs at once for this operator")
    log_level: LogLevel = Field("INFO", description="Logging level inside the operator")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class PythonOperatorSpec(OperatorBase):
    """`kind: python` (the default): your class, with free-form parameters."""

    kind: Literal["python"] = Field("python", description="python: a class of yours")
    implementation: str | None = Field(
        None, pattern=IMPLEMENTATION_PATTERN, description='"module:Class" (module on python_path); required'
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="Free-form values passed to the operator")


class TritonOperatorSpec(OperatorBase):
    """`kind: triton`: one model of a Triton model repository."""

    kind: Literal["triton"] = Field("triton", description="triton: a Triton model")
    repository: str | None = Field(None, description="Model repository directory (relative to the YAML); required")
    model_name: str | None = Field(None, description="Model in the repository (default: the operator name)")
    triton_config: TritonConfigSpec | None = Field(None, description="Overrides of the model's config.pbtxt")
    parameters: TritonParameters = Field(default_factory=TritonParameters, description="tdist's Triton settings")


class LLMOperatorBase(OperatorBase):
    """What the LLM engine operators share."""

    model: str | None = Field(None, description="Model path (relative to the YAML if it starts with . or /) or hub id (default: llm.model)")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Engine arguments, the engine's own names (checked against the engine when it is installed)")
    role: Role = Field("both", description="Disaggregated role: both, context (prefill) or generation (decode)")


class VllmOperatorSpec(LLMOperatorBase):
    """`kind: vllm`: a vLLM engine."""

    kind: Literal["vllm"] = Field("vllm", description="vllm: a vLLM engine")
    parameters: VllmParameters = Field(default_factory=VllmParameters, description="tdist's vLLM settings")


class TrtllmOperatorSpec(LLMOperatorBase):
    """`kind: trtllm`: a TensorRT-LLM engine."""

    kind: Literal["trtllm"] = Field("trtllm", description="trtllm: a TensorRT-LLM engine")
    parameters: TrtllmParameters = Field(default_factory=TrtllmParameters, description="tdist's TensorRT-LLM settings")


class RouterOperatorSpec(OperatorBase):
    """`kind: router`: picks an instance of its target per request (two targets: disaggregated)."""

    kind: Literal["router"] = Field("router", description="router: forwards to instances of its targets")
    targets: list[str] = Field(default_factory=list, description="Operators requests go to (default: the llm server sets)")
    parameters: RouterParameters = Field(default_factory=RouterParameters, description="Routing settings")


class FrontendOperatorSpec(OperatorBase):
    """`kind: frontend`: an HTTP (and gRPC) server in front of the graph."""

    kind: Literal["frontend"] = Field("frontend", description="frontend: serves a protocol to clients")
    protocol: Literal["openai", "kserve"] = Field("openai", description="API it serves: openai or kserve (KServe v2)")
    targets: list[str] = Field(default_factory=list, description="Operators requests go to (default: the only router, else the llm server sets)")
    host: str | None = Field(None, description="Address to listen on (default: llm.hostname, else 127.0.0.1)")
    port: int | None = Field(None, ge=0, le=65535, description="TCP port (0: pick a free one; default: llm.port, else 8000)")
    parameters: FrontendParameters = Field(default_factory=FrontendParameters, description="Frontend settings")


OPERATOR_KINDS: dict[str, type[OperatorBase]] = {
    "python": PythonOperatorSpec,
    "triton": TritonOperatorSpec,
    "vllm": VllmOperatorSpec,
    "trtllm": TrtllmOperatorSpec,
    "router": RouterOperatorSpec,
    "frontend": FrontendOperatorSpec,
}
LLM_KINDS = frozenset({"vllm", "trtllm"})
SERVICE_KINDS = frozenset({"router", "frontend"})


def operator_kind_of(value: Any) -> str | None:
    """The union's tag: `kind`, python when absent (None: not a mapping, or kind not a string)."""
    if isinstance(value, dict):
        kind = value.get("kind", "python")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


OperatorSpec = Annotated[
    Union[tuple(Annotated[model, Tag(kind)] for kind, model in OPERATOR_KINDS.items())],  # type: ignore[valid-type]
    Discriminator(operator_kind_of),
]
"""One operator: the model of its `kind`."""

"""Triton operator pieces that need no server: config overrides, overlay, lookup errors, engine choice."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tdist.errors import BadRequest, OperatorLoadError
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import OperatorContext

pytest.importorskip("tritonclient.grpc")

from tdist.operators.triton import install as inst  # noqa: E402
from tdist.operators.triton.model_config import (  # noqa: E402
    apply_overrides,
    find_model_dir,
    instance_count,
    parse_config,
    render_config,
    write_overlay_model,
)

REPO = Path(__file__).resolve().parents[2] / "examples" / "hello_world" / "operators" / "triton_core_models"


def encoder_config() -> dict:
    return parse_config((REPO / "encoder" / "config.pbtxt").read_text())


def test_hello_world_configs_parse_with_seed_parameters():
    for name in ("encoder", "decoder"):
        cfg = parse_config((REPO / name / "config.pbtxt").read_text())
        assert cfg["name"] == name and cfg["backend"] == "python"
        assert cfg["parameters"]["input_copies"] == {"string_value": "1"}
        assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


def test_overrides_instance_group_parameters_and_fields():
    cfg = apply_overrides(
        encoder_config(),
        {"instance_group": [{"count": 3, "kind": "cpu"}], "parameters": {"input_copies": 4, "flag": True}, "max_batch_size": 0},
        parameters={"delay": 0.5, "input_copies": 2, "triton_mode": "process"},
        name="enc2",
    )
    assert cfg["name"] == "enc2"
    assert cfg["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    assert instance_count(cfg) == 3
    # triton_config.parameters wins over the operator's parameters; values become strings
    assert cfg["parameters"]["input_copies"] == {"string_value": "4"}
    assert cfg["parameters"]["delay"] == {"string_value": "0.5"}
    assert cfg["parameters"]["flag"] == {"string_value": "true"}
    assert "triton_mode" not in cfg["parameters"]  # steers tdist, not the model
    text = render_config(cfg)
    assert "count: 3" in text and 'name: "enc2"' in text


def test_spec_shaped_overrides_keep_the_models_own_instance_group():
    # the spec dumps an empty instance_group and {string_value} parameters when not given
    cfg = apply_overrides(encoder_config(), {"instance_group": [], "parameters": {"delay": {"string_value": "1"}}})
    assert cfg["instance_group"] == encoder_config()["instance_group"]
    assert cfg["parameters"]["delay"] == {"string_value": "1"}


def test_unknown_override_says_did_you_mean():
    with pytest.raises(OperatorLoadError, match="did you mean 'max_batch_size'"):
        apply_overrides(encoder_config(), {"max_batch_sise": 4}, where="operator 'encoder' triton_config")
    with pytest.raises(OperatorLoadError, match="invalid"):
        apply_overrides(encoder_config(), {"instance_group": [{"count": 1, "kind": "KIND_TPU"}]})


def test_missing_model_lists_what_is_there(tmp_path):
    with pytest.raises(OperatorLoadError, match="models there: decoder, encoder"):
        find_model_dir(REPO, "nosuch")
    with pytest.raises(OperatorLoadError, match="does not exist"):
        find_model_dir(tmp_path / "nope", "encoder")


def test_overlay_links_versions_and_writes_the_merged_config(tmp_path):
    cfg = apply_overrides(encoder_config(), {"instance_group": [{"count": 2}]}, name="enc")
    dest = write_overlay_model(tmp_path, REPO / "encoder", "enc", cfg)
    assert (dest / "1").is_symlink() and (dest / "1" / "model.py").is_file()
    again = parse_config((dest / "config.pbtxt").read_text())
    assert again["name"] == "enc" and again["instance_group"][0]["count"] == 2


def _context(tmp_path, **params) -> OperatorContext:
    oc = OperatorConfig(name="encoder", kind="triton", repository=str(REPO), parameters=params)
    wc = WorkerConfig(name="enc.0", component="enc", deployment="t", operators=[oc], log_path=str(tmp_path / "enc.0.log"))
    return OperatorContext(config=oc, worker=wc, logger=logging.getLogger("test.triton"))


async def test_no_triton_is_a_clear_error_naming_the_install(tmp_path, monkeypatch):
    from tdist.operators.triton import TritonCoreOperator, TritonNotAvailable

    monkeypatch.setenv("TDIST_TRITONSERVER", str(tmp_path / "no-tritonserver"))
    monkeypatch.setenv("TDIST_TRITON_MODE", "auto")
    op = TritonCoreOperator(_context(tmp_path))
    with pytest.raises(TritonNotAvailable) as e:
        await op.start()
    text = str(e.value)
    assert "pip install 'tdist[triton]'" in text and "nvidia-pytriton" in text
    assert "in-process tritonserver API unavailable" in text  # both routes named
    assert isinstance(e.value, OperatorLoadError)  # the worker reports it as a failed start


async def test_no_binary_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv("TDIST_TRITONSERVER", raising=False)
    monkeypatch.setattr(inst, "pytriton_root", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(inst.TritonNotAvailable, match=r"no Triton server found.*pip install 'tdist\[triton\]'"):
        inst.find_tritonserver()


def test_models_python_env_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TDIST_TRITON_PYTHON_ENV", str(tmp_path / "env"))
    monkeypatch.setattr(inst, "_numpy_major", lambda: 2)
    with pytest.raises(inst.TritonNotAvailable, match="numpy<2.*python -m tdist.operators.triton.install"):
        inst.python_env_bin()


def test_backend_dir_holds_this_pythons_stub(tmp_path):
    try:
        install = inst.locate_triton()
    except inst.TritonNotAvailable as exc:
        pytest.skip(str(exc))
    dest = install.make_backend_dir(tmp_path / "be")
    stub = dest / "python" / inst.STUB
    assert stub.resolve() == install.stub.resolve()
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in str(install.stub)
    assert (dest / "python" / "libtriton_python.so").exists()
    env = install.environment({"PATH": "/usr/bin", "PYTHONPATH": "/x"})
    assert env["PATH"].split(":")[0] == str(install.env_bin) and "PYTHONPATH" not in env


def test_unknown_mode_is_rejected(tmp_path):
    from tdist.operators.triton import TritonCoreOperator

    with pytest.raises(OperatorLoadError, match="triton_mode 'gpu' unknown"):
        TritonCoreOperator(_context(tmp_path, triton_mode="gpu"))


def test_triton_without_repository_is_a_load_error(tmp_path):
    from tdist.operators.triton import TritonCoreOperator

    oc = OperatorConfig(name="encoder", kind="triton")
    wc = WorkerConfig(name="w.0", component="w", deployment="t", operators=[oc])
    with pytest.raises(OperatorLoadError, match="needs `repository:`"):
        TritonCoreOperator(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("t")))


class _FakeModel:
    def __init__(self, name):
        self.name = name

    def ready(self):
        return True

    def config(self):
        return {"name": self.name, "max_batch_size": 0, "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}

    def metadata(self):
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "python",
            "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": "output", "datatype": "INT64", "shape": [-1]}],
        }

    async def async_infer(self, inputs, timeout=0):
        yield types.SimpleNamespace(error=None, outputs={"output": np.invert(inputs["input"])})


class _FakeServer:
    def __init__(self, **kw):
        self.kw = kw

    def start(self, wait_until_ready=True):
        pass

    def load(self, name):
        return _FakeModel(name)

    def unload(self, name):
        pass

    def metrics(self):
        return "# TYPE nv_fake counter\nnv_fake 1\n"

    def stop(self):
        pass


async def test_in_process_api_is_preferred_when_it_loads(tmp_path, monkeypatch, caplog):
    """A fake `tritonserver` module stands in for NGC's in-process API (selection + wiring)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tdist.operators.triton import TritonCoreOperator
    from tdist.runtime.operator import Request, Response

    fake = types.ModuleType("tritonserver")
    fake.Server = _FakeServer
    fake.ModelControlMode = types.SimpleNamespace(EXPLICIT="explicit")
    monkeypatch.setitem(sys.modules, "tritonserver", fake)
    monkeypatch.delenv("TDIST_TRITON_MODE", raising=False)
    ctx = _context(tmp_path)
    registry = CollectorRegistry()
    ctx.metrics_registry = registry  # type: ignore[attr-defined]
    op = TritonCoreOperator(ctx)
    with caplog.at_level(logging.INFO):
        await op.start()
    try:
        assert op.stats()["triton"]["mode"] == "in_process"
        assert "in-process tritonserver API" in caplog.text
        got = []

        async def send(r: Response) -> None:
            got.append(r)

        import time

        await op.execute(Request(id="1", operator="encoder", inputs={"input": np.array([1, 2])}, parameters={}, deadline=time.time() + 5, send=send))
        assert got[-1].outputs["output"].tolist() == [-2, -3]
        with pytest.raises(BadRequest):
            await op.execute(Request(id="2", operator="encoder", inputs={"x": np.array([1])}, parameters={}, deadline=time.time() + 5, send=send))
        assert "nv_fake 1.0" in generate_latest(registry).decode()
    finally:
        await op.stop()

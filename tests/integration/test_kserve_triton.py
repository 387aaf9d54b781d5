"""Unchanged tritonclient (HTTP and gRPC) → tdist KServe frontend → real Triton models.

One deployment under the real local supervisor on the session's nats-server: a Triton worker
hosting `identity` (a python-backend model with several dtypes/shapes, written to a temp
repository here) and the hello-world `encoder`, plus a KServe frontend worker on free ports.
Skipped when Triton is not installed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, unique_name, worker_config

try:
    from tdist.operators.triton.install import locate_triton

    locate_triton()
    _missing = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _missing = str(exc)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing is not None, reason=f"Triton unavailable: {_missing}")]

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

HELLO_REPO = REPO / "examples" / "hello_world" / "operators" / "triton_core_models"

# (input name, Triton type, KServe datatype, dims, sample of one request, sample of another)
TENSORS = [
    ("F32", "TYPE_FP32", "FP32", "[-1, -1]", np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 1), np.float32)),
    ("F16", "TYPE_FP16", "FP16", "[-1]", np.array([0.5, -2.0], np.float16), np.array([1.0], np.float16)),
    ("F64", "TYPE_FP64", "FP64", "[-1]", np.array([1e300], np.float64), np.array([-1.5, 2.5, 3.5], np.float64)),
    ("I8", "TYPE_INT8", "INT8", "[-1]", np.array([-128, 0, 127], np.int8), np.array([5], np.int8)),
    ("I32", "TYPE_INT32", "INT32", "[2, -1]", np.arange(4, dtype=np.int32).reshape(2, 2), np.arange(6, dtype=np.int32).reshape(2, 3)),
    ("U64", "TYPE_UINT64", "UINT64", "[-1]", np.array([2**64 - 1], np.uint64), np.array([0, 1], np.uint64)),
    ("B", "TYPE_BOOL", "BOOL", "[2, 2]", np.array([[True, False], [False, True]]), np.array([[True, True], [False, False]])),
    ("S", "TYPE_STRING", "BYTES", "[-1]", np.array([b"hello", b"w\xc3\xb6rld"], dtype=object), np.array([b""], dtype=object)),
]

IDENTITY_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        out = []
        for request in requests:
            tensors = []
            for name in NAMES:
                arr = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                tensors.append(pb_utils.Tensor("OUT_" + name, arr))
            out.append(pb_utils.InferenceResponse(tensors))
        return out
'''


def write_identity_repo(root: Path) -> Path:
    model = root / "identity"
    (model / "1").mkdir(parents=True)
    ios = []
    for kind in ("input", "output"):
        entries = ",\n".join(
            f'  {{ name: "{"OUT_" if kind == "output" else ""}{n}" data_type: {t} dims: {dims} }}' for n, t, _k, dims, _a, _b in TENSORS
        )
        ios.append(f"{kind} [\n{entries}\n]")
    (model / "config.pbtxt").write_text(
        'name: "identity"\nbackend: "python"\nmax_batch_size: 0\n' + "\n".join(ios) + "\ninstance_group [{ count: 1 kind: KIND_CPU }]\n"
    )
    (model / "1" / "model.py").write_text(f"NAMES = {[t[0] for t in TENSORS]!r}\n" + IDENTITY_MODEL)
    return root


@pytest.fixture
async def kserve_deployment(deploy, tmp_path):
    repo = write_identity_repo(tmp_path / "repo")
    dep = unique_name("kst")
    triton = worker_config(
        dep,
        "triton",
        [
            {"name": "identity", "kind": "triton", "repository": str(repo), "max_inflight_requests": 4},
            {
                "name": "encoder",
                "kind": "triton",
                "repository": str(HELLO_REPO),
                "triton_config": {"instance_group": [{"count": 2, "kind": "KIND_CPU"}], "parameters": {"input_copies": "2"}},
            },
        ],
    )
    frontend = worker_config(
        dep,
        "kserve",
        [
            {
                "name": "kserve",
                "kind": "frontend",
                "targets": ["identity", "encoder", "absent"],
                "parameters": {"protocol": "kserve", "host": "127.0.0.1", "http_port": 0, "grpc_port": 0},
            }
        ],
    )
    d = await deploy([triton, frontend])
    entry = (await d.client.workers(max_age_s=0))["kserve.0"]
    stats = entry["per_operator"]["kserve"]["stats"]
    yield d, f"127.0.0.1:{stats['http_port']}", f"127.0.0.1:{stats['grpc_port']}"


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype == object:
        as_bytes = lambda x: x.encode() if isinstance(x, str) else bytes(x)  # noqa: E731
        assert [as_bytes(x) for x in got.reshape(-1)] == [bytes(x) for x in want.reshape(-1)]
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


async def test_kserve_clients_against_real_triton_models(kserve_deployment):
    _d, http_url, grpc_url = kserve_deployment

    def check() -> None:
        h, g = httpclient.InferenceServerClient(http_url), grpcclient.InferenceServerClient(grpc_url)
        assert h.is_server_live() and h.is_server_ready() and g.is_server_live() and g.is_server_ready()
        assert h.get_server_metadata()["name"] == "tdist" and g.get_server_metadata().name == "tdist"

        # metadata and config are Triton's own answers for the model
        md = h.get_model_metadata("identity")
        assert {i["name"]: (i["datatype"], i["shape"]) for i in md["inputs"]}["I32"] == ("INT32", [2, -1])
        gmd = g.get_model_metadata("identity")
        assert sorted(o.name for o in gmd.outputs) == sorted("OUT_" + t[0] for t in TENSORS)
        assert h.is_model_ready("identity") and g.is_model_ready("encoder")
        # the YAML's instance_group count is what Triton reports, through both protocols
        assert g.get_model_config("encoder").config.instance_group[0].count == 2
        assert h.get_model_config("encoder")["instance_group"][0]["count"] == 2
        assert g.get_model_config("encoder").config.parameters["input_copies"].string_value == "2"

        # infer: every dtype, two different sets of shapes, HTTP (binary and JSON) and gRPC
        for which in (4, 5):
            for binary in (True, False):
                inputs = []
                for name, _t, dt, _dims, *samples in TENSORS:
                    arr = samples[which - 4]
                    inp = httpclient.InferInput(name, list(arr.shape), dt)
                    inp.set_data_from_numpy(arr, binary_data=binary)
                    inputs.append(inp)
                outs = [httpclient.InferRequestedOutput("OUT_" + t[0], binary_data=binary) for t in TENSORS]
                res = h.infer("identity", inputs, outputs=outs)
                for name, _t, _dt, _dims, *samples in TENSORS:
                    _same(res.as_numpy("OUT_" + name), samples[which - 4])
            ginputs = []
            for name, _t, dt, _dims, *samples in TENSORS:
                arr = samples[which - 4]
                inp = grpcclient.InferInput(name, list(arr.shape), dt)
                inp.set_data_from_numpy(arr)
                ginputs.append(inp)
            gres = g.infer("identity", ginputs)
            for name, _t, _dt, _dims, *samples in TENSORS:
                _same(gres.as_numpy("OUT_" + name), samples[which - 4])

        # the hello-world encoder through both protocols
        x = np.array([1, 2, 3], dtype=np.int64)
        for client, mod in ((h, httpclient), (g, grpcclient)):
            inp = mod.InferInput("input", [3], "INT64")
            inp.set_data_from_numpy(x)
            assert client.infer("encoder", [inp]).as_numpy("output").tolist() == np.invert(np.tile(x, 2)).tolist()

        # typed errors: unknown model, no worker, wrong dtype (Triton operator's BadRequest)
        hx, gx = httpclient.InferInput("input", [3], "INT64"), grpcclient.InferInput("input", [3], "INT64")
        hx.set_data_from_numpy(x)
        gx.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            h.infer("nosuch", [hx])
        assert e.value.status() == "404" and "unknown model" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            g.infer("nosuch", [gx])
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            g.get_model_metadata("nosuch")
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            h.infer("absent", [hx])
        assert e.value.status() == "503"
        hf = httpclient.InferInput("input", [3], "FP32")
        hf.set_data_from_numpy(x.astype(np.float32))
        with pytest.raises(InferenceServerException) as e:
            h.infer("encoder", [hf])
        assert e.value.status() == "400" and "must be INT64" in e.value.message()
        gf = grpcclient.InferInput("nope", [3], "INT64")
        gf.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            g.infer("encoder", [gf])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "no input 'nope'" in e.value.message()

    await asyncio.to_thread(check)

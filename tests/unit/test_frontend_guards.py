"""The frontends' guards, pure: KServe shape/datatype/count checks before allocation, request
structure, parameter allowlist and deadlines, strict JSON, the NATS header count, the spec's
copy of the internal-parameter rule. The HTTP answers are in test_frontend_http_limits.py and
tests/integration/test_frontend_limits.py."""

from __future__ import annotations

import json
import math
import resource

import numpy as np
import pytest

from tdist.operators.frontends import guards
from tdist.operators.frontends.guards import ClientError, FrontendLimits, loads
from tdist.operators.frontends.kserve import KServeError, parse_http_infer, tensor_from_json, tensor_from_raw
from tdist.operators.frontends.kserve.codec import element_count
from tdist.runtime import protocol as P


def _err(fn, *a) -> KServeError:
    with pytest.raises(KServeError) as e:
        fn(*a)
    assert e.value.http_status == 400, e.value.message
    return e.value


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_bytes_shape_of_fifty_million_with_one_element_is_400_without_allocating() -> None:
    before = _peak_kib()
    assert "shape says 50000000" in _err(tensor_from_json, "BYTES", [50_000_000], ["x"]).message
    assert "50000000 elements" in _err(tensor_from_raw, "BYTES", [50_000_000], b"\x01\x00\x00\x00x").message
    assert _peak_kib() - before < 64 * 1024  # an object array of 50M slots alone is 400 MB


def test_bytes_with_integer_elements_is_400_without_growing() -> None:
    before = _peak_kib()
    assert "must be strings" in _err(tensor_from_json, "BYTES", [1], [200_000_000]).message
    assert _peak_kib() - before < 64 * 1024  # bytes(200_000_000) would be 200 MB


@pytest.mark.parametrize("shape", [[-1], [2, -3], [2**40], [True], [1.5], ["3"], "12", [1] * 33, None])
def test_bad_shapes_are_400(shape) -> None:
    _err(element_count, shape)
    _err(tensor_from_json, "FP32", shape, [1.0])
    _err(tensor_from_raw, "FP32", shape, b"\x00" * 4)


def test_counts_match_the_shape_exactly() -> None:
    assert element_count([0, 2**31 - 1]) == 0 and element_count([]) == 1
    assert tensor_from_json("INT32", [2, 2], [[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    assert tensor_from_json("INT32", [2, 2], [1, 2, 3, 4]).shape == (2, 2)
    _err(tensor_from_json, "INT32", [2, 2], [1, 2, 3])
    _err(tensor_from_json, "INT32", [2], [1, 2, 3])
    _err(tensor_from_raw, "INT32", [3], b"\x00" * 8)
    deep: list = [1]
    for _ in range(5000):  # deeper than Python's recursion limit: flattened without recursion
        deep = [deep]
    assert tensor_from_json("INT8", [1], deep).tolist() == [1]


@pytest.mark.parametrize("datatype,data", [
    ("INT8", [300]), ("UINT8", [-1]), ("INT64", [2**70]), ("INT32", [1.5]), ("INT32", ["1"]), ("BOOL", [1]),
    ("FP32", [True]), ("FP32", [None]), ("FP64", [10**400]), ("FP32", [{"a": 1}]), ("NOPE", [1]), (["FP32"], [1]),
])
def test_element_types_and_ranges_are_400(datatype, data) -> None:
    _err(tensor_from_json, datatype, [1], data)


def test_raw_bytes_elements_cannot_claim_more_than_is_there() -> None:
    assert "claims" in _err(tensor_from_raw, "BYTES", [1], b"\xff\xff\xff\x7fabc").message
    assert "trailing" in _err(tensor_from_raw, "BYTES", [1], b"\x01\x00\x00\x00ab").message


def _body(req: dict, binary: bytes = b"") -> tuple[bytes, int | None]:
    head = json.dumps(req).encode()
    return head + binary, (len(head) if binary else None)


@pytest.mark.parametrize("req", [
    [], {"inputs": {}}, {"inputs": [1]}, {"inputs": [{"name": 1, "datatype": "FP32", "shape": [1], "data": [1]}]},
    {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]},
    {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}] * 2},
    {"inputs": [], "outputs": [1]}, {"inputs": [], "outputs": [{"name": 2}]}, {"inputs": [], "parameters": []},
    {"inputs": [], "id": 5}, {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "parameters": 3, "data": [1]}]},
    {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": "4"}}]},
    {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": -4}}]},
])
def test_malformed_requests_are_400(req) -> None:
    _err(parse_http_infer, *_body(req))


def test_binary_part_must_be_accounted_for() -> None:
    spec = {"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
    req, inputs = parse_http_infer(*_body({"inputs": [spec]}, b"\x00\x00\x80\x3f"))
    assert inputs["a"].tolist() == [1.0]
    _err(parse_http_infer, *_body({"inputs": [spec]}, b"\x00\x00\x80\x3fEXTRA"))
    body, hl = _body({"inputs": [spec]}, b"\x00\x00\x80\x3f")
    _err(parse_http_infer, body, len(body) + 1)
    _err(parse_http_infer, body, -1)
    _err(parse_http_infer, b'{"inputs": [], "parameters": {"timeout": Infinity}}', None)
    _err(parse_http_infer, b"[" * 100_000, None)


def test_strict_json() -> None:
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}', "[" * 100_000, b"\xff\xfe"):
        with pytest.raises(ValueError):
            loads(text)
    assert loads('{"a": 1.5e3}') == {"a": 1500.0}


def test_limits_parameters_and_deadlines() -> None:
    lim = FrontendLimits.of({}, "kserve", request_timeout_s=60)
    assert lim.max_body_bytes == 64 << 20 and lim.max_deadline_s == 60 and lim.allowed_parameters is None
    assert FrontendLimits.of({}, "openai", request_timeout_s=600).max_body_bytes == 4 << 20
    assert lim.check_parameters({"k": 1, "temperature": 0}) == {"k": 1, "temperature": 0}
    for name in ("kv_transfer_params", "disagg", "routed_to", "tdist_context_worker", "tdist_x", "_hidden"):
        with pytest.raises(ClientError, match="internal") as e:
            lim.check_parameters({name: {"remote_host": "10.0.0.1", "remote_port": 1}})
        assert e.value.status == 400
    strict = FrontendLimits.of({"allowed_parameters": ["k"], "max_deadline_s": 5, "max_body_bytes": 10}, "kserve",
                               request_timeout_s=60)
    assert strict.check_parameters({"k": 1}) == {"k": 1}
    with pytest.raises(ClientError, match="not allowed"):
        strict.check_parameters({"z": 1})
    assert strict.deadline(3600, 60) == 5 and strict.deadline(1, 60) == 1 and strict.deadline(None, 60) == 5
    assert strict.deadline(10**400, 60) == 5  # beyond any float: capped, not an OverflowError
    for bad in (math.inf, math.nan, -1, 0, "10", True, [1], -(10**400)):
        with pytest.raises(ClientError):
            strict.deadline(bad, 60)
    for params in ({"allowed_parameters": ["kv_transfer_params"]}, {"max_body_bytes": -1}, {"max_deadline_s": math.inf}):
        with pytest.raises(ValueError):
            FrontendLimits.of(params, "kserve", request_timeout_s=60)


def test_spec_rule_for_internal_parameters_is_the_guards_rule() -> None:
    from pydantic import ValidationError

    from tdist.spec.operators import INTERNAL_PARAMETERS, FrontendParameters

    assert INTERNAL_PARAMETERS == guards.INTERNAL_PARAMETERS
    assert FrontendParameters(allowed_parameters=["temperature"]).allowed_parameters == ["temperature"]
    for name in ("kv_transfer_params", "tdist_x", "_x"):
        with pytest.raises(ValidationError, match="internal"):
            FrontendParameters(allowed_parameters=[name])
    with pytest.raises(ValidationError):
        FrontendParameters(max_body_bytes=0)


def test_nats_header_bytes_are_counted() -> None:
    """The count equals nats-py's HPUB header block, built here from its own wire format."""
    msg = P.RequestMessage(id="ab" * 12, operator="op", inputs={}, parameters={}, deadline=1765000000.123, reply="_INBOX.x.y")
    headers = P.request_headers(msg, msg_id=True)
    block = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    assert P.headers_size(headers) == len(block) > 100
    assert P.headers_size(None) == 0
    assert set(P.request_headers(msg)) == {P.HDR_REPLY, P.HDR_ID, P.HDR_DEADLINE}


def test_kserve_client_deadlines() -> None:
    from tdist.operators.frontends.kserve import KServeCore

    core = KServeCore(None, timeout_s=60, limits=FrontendLimits.of({"max_deadline_s": 30}, "kserve", request_timeout_s=60))
    assert core.client_parameters({}) == ({}, 30)
    assert core.client_parameters({"timeout": 2_500_000, "k": 1}) == ({"k": 1}, 2.5)
    assert core.client_parameters({"timeout_s": 3600}) == ({}, 30)
    assert core.client_parameters({"timeout": 10**400}) == ({}, 30)  # an int beyond any float is capped
    for bad in ({"timeout": "soon"}, {"timeout": -(10**400)}, {"timeout": 0}, {"timeout_s": math.inf},
                {"kv_transfer_params": {}}):
        with pytest.raises(KServeError) as e:
            core.client_parameters(bad)
        assert e.value.http_status == 400


def test_openai_stream_flags_are_booleans() -> None:
    from tdist.operators.frontends.openai_wire import ApiError, stream_flags

    assert stream_flags({}) == (False, False)
    assert stream_flags({"stream": True, "stream_options": {"include_usage": True}}) == (True, True)
    for body in ({"stream": "false"}, {"stream": 1}, {"stream_options": []}, {"stream_options": {"include_usage": "yes"}}):
        with pytest.raises(ApiError) as e:
            stream_flags(body)
        assert e.value.status == 400

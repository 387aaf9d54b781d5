"""Wire protocol and inline tensors: pure encode/decode, no server."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tdist.errors import BadRequest, OperatorError, RequestError, RequestTimeout
from tdist.runtime import protocol as P
from tdist.runtime.tensors import NUMERIC_DTYPES, tensor_from_wire, tensor_to_wire


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (3, 5)])
def test_tensor_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    x = (np.arange(int(np.prod(shape)) if shape else 1) % 7).astype(dtype).reshape(shape)
    y = tensor_from_wire(tensor_to_wire(x))
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(x, y)
    assert y.flags.writeable


def test_non_contiguous_big_endian_bf16_and_bytes() -> None:
    x = np.arange(40, dtype=np.int32).reshape(5, 8)[:, ::3]
    np.testing.assert_array_equal(tensor_from_wire(tensor_to_wire(x)), x)
    be = np.arange(5, dtype=">f4")
    y = tensor_from_wire(tensor_to_wire(be))
    np.testing.assert_array_equal(y, be) and None
    bf = np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3)
    z = tensor_from_wire(tensor_to_wire(bf))
    assert z.dtype == bf.dtype and (z == bf).all()
    s = np.array([[b"ab", b""], [b"\x00\xff", "é".encode()]], dtype=object)
    t = tensor_from_wire(tensor_to_wire(s))
    assert t.shape == (2, 2) and t.tolist() == s.tolist()


@given(hnp.arrays(dtype=hnp.scalar_dtypes().filter(lambda d: d.kind in "biuf" and d.name in NUMERIC_DTYPES),
                  shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_tensor_round_trip_property(x: np.ndarray) -> None:
    y = tensor_from_wire(tensor_to_wire(x))
    np.testing.assert_array_equal(x, y)
    assert y.dtype == x.dtype.newbyteorder("=")


def test_bad_tensors_are_bad_requests() -> None:
    with pytest.raises(BadRequest, match="expected 24"):
        tensor_from_wire({"dtype": "int64", "shape": [3], "data": b"\x00" * 5})
    with pytest.raises(BadRequest, match="unknown tensor dtype"):
        tensor_from_wire({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8})
    with pytest.raises(BadRequest, match="cannot be sent"):
        tensor_to_wire(np.zeros(2, dtype=np.complex64))
    with pytest.raises(BadRequest, match="malformed tensor"):
        tensor_from_wire({"shape": [1]})


def test_request_and_response_round_trip() -> None:
    req = P.RequestMessage(id="abc", operator="enc", inputs={"x": tensor_to_wire(np.arange(3))},
                           parameters={"k": [1, "a", {"b": None}]}, deadline=123.5, reply="_INBOX.x.abc", parent="p1",
                           instance="enc.1")
    back = P.decode_request(P.encode_request(req))
    assert back == req
    resp = P.ResponseMessage(id="abc", seq=3, final=True, worker="enc.1", attempt=2,
                             outputs={"y": tensor_to_wire(np.ones(2))}, parameters={"text": "hi"})
    assert P.decode_response(P.encode_response(resp)) == resp
    assert P.decode_cancel(P.encode_cancel("abc")) == "abc"


def test_errors_cross_the_wire_typed() -> None:
    err = RequestTimeout("too slow", operator="enc", request_id="r1", detail={"s": 1})
    msg = P.error_response("r1", 0, err, worker="enc.0")
    back = P.decode_response(P.encode_response(msg))
    again = RequestError.from_wire(back.error)
    assert isinstance(again, RequestTimeout) and again.operator == "enc" and again.detail == {"s": 1}
    assert isinstance(RequestError.from_wire({"kind": "operator_error", "message": "x"}), OperatorError)
    assert type(RequestError.from_wire({"kind": "martian", "message": "x"})) is RequestError


def test_malformed_messages() -> None:
    with pytest.raises(BadRequest, match="malformed request"):
        P.decode_request(b"\x93\x01\x02")
    with pytest.raises(BadRequest, match="malformed request"):
        P.decode_request(P._pack({"id": "x"}))
    with pytest.raises(BadRequest, match="parameters must be JSON-like"):
        P.encode_request(P.RequestMessage(id="a", operator="o", inputs={}, parameters={"f": object()}, deadline=1, reply="r"))


def test_subjects_are_namespaced_tokens() -> None:
    assert P.request_subject("hello-world", "encoder") == "tdist.hello-world.req.encoder"
    assert P.direct_subject("d", "enc", "enc.1") == "tdist.d.direct.enc.enc-1"
    assert P.request_subject("a", "x") != P.request_subject("b", "x")
    assert P.stream_name("a.b") == "TDIST_a-b"
    assert len({P.new_request_id() for _ in range(1000)}) == 1000


def test_overloaded_and_request_plane_down_cross_the_wire_typed() -> None:
    """Issue 15's request-plane errors keep their class (and data) across a hop."""
    from tdist.errors import Overloaded, RequestPlaneDown

    for cls, kind in ((Overloaded, "overloaded"), (RequestPlaneDown, "request_plane_down")):
        err = cls("why", operator="op", request_id="r1", detail={"err_code": 10077})
        back = RequestError.from_wire(err.to_wire())
        assert type(back) is cls and back.kind == kind
        assert (back.message, back.operator, back.request_id, back.detail) == ("why", "op", "r1", {"err_code": 10077})

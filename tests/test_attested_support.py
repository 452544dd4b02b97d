"""Helpers for the attested-mode tests (no tests here): small ONNX models and a man-in-the-middle relay."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import uvicorn
from onnx import TensorProto, helper, numpy_helper
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from veil.attested.tlskeys import generate_tls_identity

__all__ = ["tiny_model", "tiny_inputs", "Relay", "EXTERNAL_PLACES", "external_data_model", "loop_model",
           "expand_model"]


def tiny_model(scale: float = 0.1) -> onnx.ModelProto:
    """Six inputs (float32, float64, int32, int64, uint8, bool) and six outputs."""
    w = numpy_helper.from_array((np.arange(12, dtype=np.float32).reshape(4, 3) * scale).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("Add", ["d", "d"], ["d2"]),
        helper.make_node("Add", ["i", "i"], ["i2"]),
        helper.make_node("Mul", ["n", "n"], ["n2"]),
        helper.make_node("Identity", ["u"], ["u2"]),
        helper.make_node("Not", ["b"], ["nb"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "tiny",
        [vi("x", TensorProto.FLOAT, ["N", 4]), vi("d", TensorProto.DOUBLE, ["N"]), vi("i", TensorProto.INT32, [3]),
         vi("n", TensorProto.INT64, ["N"]), vi("u", TensorProto.UINT8, [3]), vi("b", TensorProto.BOOL, [2])],
        [vi("y", TensorProto.FLOAT, ["N", 3]), vi("d2", TensorProto.DOUBLE, ["N"]), vi("i2", TensorProto.INT32, [3]),
         vi("n2", TensorProto.INT64, ["N"]), vi("u2", TensorProto.UINT8, [3]), vi("nb", TensorProto.BOOL, [2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_inputs(n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "d": rng.standard_normal(n),
        "i": rng.integers(-1000, 1000, 3).astype(np.int32),
        "n": rng.integers(-1000, 1000, n).astype(np.int64),
        "u": rng.integers(0, 256, 3).astype(np.uint8),
        "b": np.array([True, False]),
    }


_vi = helper.make_tensor_value_info
_OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]


def _external(name: str, location: str, flag: bool = True) -> TensorProto:
    """A float32[4] tensor whose bytes are in ``location`` (data_location EXTERNAL unless ``flag`` is False)."""
    t = helper.make_tensor(name, TensorProto.FLOAT, [4], [0.0] * 4)
    t.ClearField("float_data")
    if flag:
        t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def _sparse(name: str, location: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(_external(name, location),
                                     helper.make_tensor(name + "_idx", TensorProto.INT64, [4], [0, 1, 2, 3]), [4])


def _const(out: str, location: str, kind: str) -> onnx.NodeProto:
    if kind == "sparse":
        return helper.make_node("Constant", [], [out], sparse_value=_sparse(out, location))
    return helper.make_node("Constant", [], [out], value=_external(out, location))


def _wrap(nodes: list, inits: list | None = None, sparse: list | None = None, functions: list | None = None,
          out: str = "y") -> bytes:
    g = helper.make_graph(nodes, "g", [_vi("x", TensorProto.FLOAT, [4])], [_vi(out, TensorProto.FLOAT, [4])],
                          inits or [], sparse_initializer=sparse or [])
    m = helper.make_model(g, opset_imports=_OPSETS)
    m.ir_version = 8
    m.functions.extend(functions or [])
    return m.SerializeToString()


def _subgraph_with(const: onnx.NodeProto) -> onnx.GraphProto:
    return helper.make_graph([const, helper.make_node("Add", ["x", "W"], ["z"])], "branch", [],
                             [_vi("z", TensorProto.FLOAT, [4])])


def external_data_model(place: str, location: str) -> bytes:
    """A model computing ``y = x + W`` whose W comes from the file ``location`` through external data
    placed at ``place`` (one of :data:`EXTERNAL_PLACES`)."""
    add = helper.make_node("Add", ["x", "W"], ["y"])
    if place == "initializer":
        return _wrap([add], inits=[_external("W", location)])
    if place == "initializer_entries_only":  # external_data entries without the EXTERNAL flag
        return _wrap([add], inits=[_external("W", location, flag=False)])
    if place == "sparse_initializer":
        sp = _sparse("W", location)
        return _wrap([add], sparse=[sp])
    if place in ("constant_value", "constant_sparse_value"):
        return _wrap([_const("W", location, "sparse" if place.endswith("sparse_value") else "dense"), add])
    if place == "function_body":
        f = helper.make_function("local", "AddSecret", ["a"], ["b"],
                                 [_const("W", location, "dense"), helper.make_node("Add", ["a", "W"], ["b"])],
                                 [helper.make_opsetid("", 17)])
        return _wrap([helper.make_node("AddSecret", ["x"], ["y"], domain="local")], functions=[f])
    if place == "function_sparse":
        f = helper.make_function("local", "AddSecret", ["a"], ["b"],
                                 [_const("W", location, "sparse"), helper.make_node("Add", ["a", "W"], ["b"])],
                                 [helper.make_opsetid("", 17)])
        return _wrap([helper.make_node("AddSecret", ["x"], ["y"], domain="local")], functions=[f])
    if place == "if_branch_sparse":
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        branch = _subgraph_with(_const("W", location, "sparse"))
        return _wrap([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], inits=[cond])
    if place == "tensors_attribute":  # a TENSORS attribute (no standard op reads it: the scan must still refuse)
        node = helper.make_node("Add", ["x", "x"], ["y"])
        node.attribute.append(helper.make_attribute("extra", [_external("W", location)]))
        return _wrap([node])
    if place == "sparse_tensors_attribute":
        node = helper.make_node("Add", ["x", "x"], ["y"])
        node.attribute.append(helper.make_attribute("extra", [_sparse("W", location)]))
        return _wrap([node])
    raise ValueError(place)


EXTERNAL_PLACES = ("initializer", "initializer_entries_only", "sparse_initializer", "constant_value",
                   "constant_sparse_value", "function_body", "function_sparse", "if_branch_sparse",
                   "tensors_attribute", "sparse_tensors_attribute")


def loop_model(trips: int = 10**12) -> bytes:
    """``y = x + trips`` computed by a Loop of ``trips`` iterations (float32[1])."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("x_in", TensorProto.FLOAT, [1])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("x_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    g = helper.make_graph([helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body)], "loop",
                          [_vi("x", TensorProto.FLOAT, [1])], [_vi("y", TensorProto.FLOAT, [1])],
                          [helper.make_tensor("M", TensorProto.INT64, [], [trips]),
                           helper.make_tensor("c", TensorProto.BOOL, [], [True])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def expand_model() -> bytes:
    """``y = Expand(1.0, shape)``: two int64 input elements decide the output size."""
    g = helper.make_graph([helper.make_node("Expand", ["one", "shape"], ["y"])], "expand",
                          [_vi("shape", TensorProto.INT64, [2])], [_vi("y", TensorProto.FLOAT, ["A", "B"])],
                          [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


class Relay:
    """A man in the middle on 127.0.0.1: terminates TLS with its *own* key and forwards every request
    to ``upstream``; ``rewrite`` may change the body of the ``/attestation`` answer. ``seen`` lists the
    paths of the requests it received (what reached it through a completed TLS handshake)."""

    def __init__(self, upstream: str, *, port: int = 0, rewrite: Callable[[bytes], bytes] | None = None):
        self.upstream, self.rewrite = upstream, rewrite
        self.seen: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="veil-relay-")
        tls = generate_tls_identity()
        key, cert = Path(self._tmp.name) / "k.pem", Path(self._tmp.name) / "c.pem"
        key.write_bytes(tls.encrypted_key_pem(b"relay-password"))
        cert.write_bytes(tls.cert_pem)
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, ssl_keyfile=str(key), ssl_certfile=str(cert), ssl_keyfile_password="relay-password",
                                log_level="error", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        self.seen.append(path)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with httpx.AsyncClient(verify=False, timeout=30) as c:
            r = await c.request(request.method, self.upstream + path, params=request.query_params, content=body,
                                headers=headers)
        content = r.content
        if path == "/attestation" and self.rewrite is not None:
            content = self.rewrite(content)
        return Response(content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    def __enter__(self) -> Relay:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("relay did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        self._tmp.cleanup()

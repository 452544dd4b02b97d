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

__all__ = ["tiny_model", "tiny_inputs", "Relay"]


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

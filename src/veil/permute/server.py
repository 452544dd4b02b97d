"""The cloud's HTTP server (FastAPI + uvicorn) around :class:`~veil.permute.cloud.CloudRuntime`.

Endpoints (JSON; arrays as in :mod:`veil.permute.wire`):

* ``GET /info``: public facts (family, mode, key_id, sizes). ``GET /stats``: batching counters.
* ``POST /forward`` ``{"inputs", "attention_mask"?, "token_type_ids"?}``: whole sequences, all positions
  (``token_type_ids``: BERT-style segment ids of sentence pairs, encoders only).
* ``POST /sessions``: open a decoder session (its KV cache stays here); ``DELETE /sessions/{id}``.
* ``POST /sessions/{id}/step`` ``{"inputs"}``: append positions, get the last position's output.

Batching: steps of different sessions wait in a queue; one worker thread runs the model and, each
time it is free, takes everything queued (up to ``max_batch``, optionally waiting ``window_ms`` for
more) as one batch. Every model call goes through that one thread, so the runtime needs no locks.

Errors come back as ``{"error": <class name>, "detail": <message>}`` with status 400 (bad input),
404 (unknown session) or 409/503; messages hold no array contents. The server binds wherever it is
told; tests use 127.0.0.1.

TLS (``--tls-cert`` / ``--tls-key``, uvicorn's own TLS over Python's ``ssl``): traffic is encrypted
and the user can check the cloud's certificate. ``--tls-client-ca`` also requires every client to
present a certificate from that CA (mutual TLS): only users holding one can call the cloud.
Certificates can come from ``veil keys`` (:mod:`veil.net.keys`). Without ``--tls-cert`` the server
speaks plain HTTP: no encryption, no authentication of either side.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from veil.errors import DeploymentError, InputError, VeilError
from veil.permute.cloud import CloudRuntime
from veil.permute.errors import CloudError, SequenceTooLongError, reason_of
from veil.permute.wire import decode_array, encode_array

__all__ = ["create_app", "StepBatcher", "main", "serve", "tls_options"]

log = logging.getLogger("veil.permute.server")
_TLS_SHUTDOWN_S = 3


class StepBatcher:
    """Collects session steps and runs them in batches on the single model thread."""

    def __init__(self, runtime: CloudRuntime, executor: ThreadPoolExecutor, max_batch: int = 16,
                 window_ms: float = 0.0):
        self.runtime, self.executor = runtime, executor
        self.max_batch, self.window = max_batch, window_ms / 1000.0
        self.queue: asyncio.Queue[tuple[str, np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.batches = self.steps = self.largest = 0

    async def submit(self, sid: str, x: np.ndarray) -> np.ndarray:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((sid, x, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(
                    self.executor, self.runtime.step_batch, [(sid, x) for sid, x, _ in items]
                )
            except Exception as exc:  # a failure of the whole batch goes to every request in it
                log.error("batch of %d steps failed: %s", len(items), exc.__class__.__name__)
                results = [CloudError("the cloud failed to run this batch")] * len(items)
            self.batches += 1
            self.steps += len(items)
            self.largest = max(self.largest, len(items))
            for (_, _, fut), res in zip(items, results, strict=True):
                if not fut.done():
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)


def _error_response(exc: Exception):
    body: dict[str, Any] = {"error": exc.__class__.__name__, "detail": str(exc)}
    if isinstance(exc, SequenceTooLongError):
        body.update(length=exc.length, limit=exc.limit)
    status = 400
    if isinstance(exc, CloudError):
        status = 404 if "unknown session" in str(exc) else 409
    elif not isinstance(exc, (InputError, VeilError)):
        body = {"error": "InternalError", "detail": "the cloud failed to run the request"}
        status = 500
    return JSONResponse(body, status_code=status)


def create_app(runtime: CloudRuntime, max_batch: int = 16, window_ms: float = 0.0):
    """The FastAPI application serving ``runtime``."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-permute-model")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = StepBatcher(runtime, executor, max_batch=max_batch, window_ms=window_ms)
        state["batcher"] = batcher
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="veil permute cloud", lifespan=lifespan)

    async def on_model_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise InputError("request body is not JSON") from None
        if not isinstance(body, dict):
            raise InputError("request body must be a JSON object")
        return body

    @app.exception_handler(VeilError)
    async def veil_error(request, exc):  # noqa: ARG001
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def other_error(request, exc):  # noqa: ARG001
        log.error("request failed: %s", exc.__class__.__name__)  # no message: it could hold data
        return _error_response(exc)

    @app.get("/info")
    async def info():
        return runtime.info()

    @app.get("/stats")
    async def stats():
        b: StepBatcher = state["batcher"]
        return {"batches": b.batches, "steps": b.steps, "largest_batch": b.largest,
                "open_sessions": len(runtime.sessions)}

    @app.post("/forward")
    async def forward(request: Request):
        body = await json_body(request)
        x = decode_array(body.get("inputs"), "inputs")
        mask = body.get("attention_mask")
        mask_arr = None if mask is None else decode_array(mask, "attention_mask")
        types = body.get("token_type_ids")
        types_arr = None if types is None else decode_array(types, "token_type_ids")
        out = await on_model_thread(runtime.forward, x, mask_arr, types_arr)
        return {"outputs": encode_array(out)}

    @app.post("/sessions")
    async def open_session():
        return {"session": await on_model_thread(runtime.open_session)}

    @app.delete("/sessions/{sid}")
    async def close_session(sid: str):
        await on_model_thread(runtime.close_session, sid)
        return {"closed": True}

    @app.post("/sessions/{sid}/step")
    async def step(sid: str, request: Request):
        body = await json_body(request)
        x = decode_array(body.get("inputs"), "inputs")
        out = await state["batcher"].submit(sid, x)
        return {"outputs": encode_array(out)}

    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m veil.permute.server --cloud DIR --port N`` (also ``veil permute serve``)."""
    parser = argparse.ArgumentParser(description="veil permute cloud server")
    parser.add_argument("--cloud", required=True, help="veil-permute-cloud/1 directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8470)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--developer-key", default=None, help="require the developer's signature (hex)")
    parser.add_argument("--tls-cert", default=None, help="server certificate (PEM): serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", default=None,
                        help="require client certificates issued by this CA (PEM)")
    args = parser.parse_args(argv)
    try:
        serve(args.cloud, args.host, args.port, args.max_batch, args.window_ms, args.threads, args.developer_key,
              tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    except VeilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def tls_options(tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments, after checking that the files load (a clear
    ``DeploymentError`` here instead of a traceback from inside uvicorn)."""
    if tls_cert is None and tls_key is None:
        if tls_client_ca is not None:
            raise DeploymentError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are a TLS feature)")
        return {}
    if tls_cert is None or tls_key is None:
        raise DeploymentError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls_cert, tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise DeploymentError(f"cannot load the TLS certificate {tls_cert} with key {tls_key}: "
                              f"{reason_of(exc)}") from None
    opts: dict[str, Any] = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
    if tls_client_ca is not None:
        try:
            ctx.load_verify_locations(tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise DeploymentError(f"cannot load the client CA {tls_client_ca}: {reason_of(exc)}") from None
        opts.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=tls_client_ca)
    return opts


def serve(cloud_dir: str, host: str, port: int, max_batch: int = 16, window_ms: float = 0.0, threads: int = 0,
          developer_key: str | None = None, *, tls_cert: str | None = None, tls_key: str | None = None,
          tls_client_ca: str | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """Run the server until interrupted; HTTPS when ``tls_cert``/``tls_key`` are given, requiring
    client certificates from ``tls_client_ca`` when that is given too. ``on_ready`` is called once the
    package is read and verified, just before the server starts listening."""
    ssl_kwargs = tls_options(tls_cert, tls_key, tls_client_ca)

    import torch
    import uvicorn

    from veil.permute.bundle import read_cloud_package

    if threads:
        torch.set_num_threads(threads)
    runtime = CloudRuntime(read_cloud_package(cloud_dir, developer_key))
    app = create_app(runtime, max_batch=max_batch, window_ms=window_ms)
    if ssl_kwargs:
        # on shutdown, a client that keeps an idle TLS connection open without answering the close
        # would hold the server for asyncio's SSL shutdown timeout (30 s); give up on it sooner
        ssl_kwargs["timeout_graceful_shutdown"] = _TLS_SHUTDOWN_S
    if on_ready is not None:
        on_ready()
    uvicorn.run(app, host=host, port=port, log_level="warning", **ssl_kwargs)


if __name__ == "__main__":
    main()

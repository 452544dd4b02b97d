"""The attested inference server (FastAPI app). Runs entirely on the trusted side.

Roles and credentials (``Authorization: Bearer <token>``):

* **operator** holds the *upload credential* (set at ``serve`` time): may add new models and list all;
* **model owner** receives an *owner credential* when a model is added: the only credential that can
  replace or delete that model, or issue run credentials for it; it may also run it;
* **user** holds a *run credential* issued by the owner: may run that one model and see it listed.

No credential, or an unknown one: 401. A known credential used outside its rights: 403.
Tokens are 256-bit random values, stored only as HMACs under a platform-derived key.

Limits are enforced on bytes and elements actually received, not on declared lengths or shapes,
and on what a run produces (output bytes, run time: a run past its time is stopped by onnxruntime);
every refusal is ``{"error": <code>, "detail": <reason>}`` with a 4xx status (503 for a run stopped
at its time limit), malformed bodies included, and never a traceback in the log. Requests per
credential are rate limited (token bucket, 429 with ``Retry-After``).

What the server says about its models: ``GET /attestation`` (anyone) carries only a fresh hiding
commitment to the loaded models; ``GET /models/{id}/attestation`` gives evidence plus the model's
inclusion proof to the owner and run credential holders of that model. The upload answer does not
say whether the bytes were already stored, and the operator's model list shows no hashes.

Races: adding a model checks the store's model count under the lock that inserts; issuing a
credential and deleting a model exclude each other, and a credential is bound to the model instance
it was issued for (a model later added under the same id does not accept it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.attested.commitment import MAX_PAD
from veil.attested.errors import StoreError, StoreFullError
from veil.attested.limits import Limits, RateLimiter
from veil.attested.onnx_model import (
    InputRejected,
    ModelRejected,
    RunLimitExceeded,
    ServedModel,
    load_served_model,
)
from veil.attested.server_ids import MODEL_ID_PATTERN, is_model_id
from veil.attested.store import Credential, ModelStore
from veil.attested.tensors import INPUT_DTYPES, WireFormatError, decode_tensor, encode_tensor
from veil.attested.trusted import TrustedSide

__all__ = ["Refusal", "ServerState", "create_app", "MODEL_ID_PATTERN"]

log = logging.getLogger("veil.attested.server")
_NONCE = re.compile(r"^[0-9a-f]{32,128}$")


class Refusal(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


# --- OpenAPI descriptions of bodies (the handlers read raw bodies themselves to enforce real sizes) ---
class TensorPayload(BaseModel):
    dtype: str
    shape: list[int]
    data: str


class RunRequest(BaseModel):
    inputs: dict[str, TensorPayload] | list[TensorPayload]
    outputs: list[str] | None = None


class RunResponse(BaseModel):
    model_id: str
    model_sha256: str
    outputs: dict[str, TensorPayload]


class TensorDeclModel(BaseModel):
    name: str
    dtype: str
    shape: list[int | None]


class ModelInfo(BaseModel):
    model_id: str
    sha256: str | None
    size: int
    access: str
    inputs: list[TensorDeclModel]
    outputs: list[TensorDeclModel]


class UploadResponse(BaseModel):
    model_id: str
    sha256: str
    size: int
    owner_credential: str | None = None


class EvidenceModel(BaseModel):
    format: str
    platform: str
    claims: str
    report: str
    endorsements: list[str]


class InclusionProofModel(BaseModel):
    model_id: str
    sha256: str
    salt: str
    index: int
    path: list[str]


class ModelEvidenceModel(BaseModel):
    evidence: EvidenceModel
    proof: InclusionProofModel


class ErrorModel(BaseModel):
    error: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorModel}
                                             for s in (400, 401, 403, 404, 409, 413, 422, 429, 503)}


class ServerState:
    """Everything the app serves from: trusted side, store, loaded models, limits and credentials."""

    def __init__(self, trusted: TrustedSide, store: ModelStore, limits: Limits, upload_token: str,
                 intra_op_threads: int = 1):
        self.trusted, self.store, self.limits = trusted, store, limits
        self.intra_op_threads = intra_op_threads
        self.pad_to = min(limits.max_models, MAX_PAD)
        self._upload_mac = hashlib.sha256(upload_token.encode()).digest()
        self.rate = RateLimiter(limits.rate_per_s, limits.burst)
        self.models: dict[str, ServedModel] = {}
        self.lock = threading.Lock()  # guards self.models / self.unavailable (held briefly, never across await)
        self.mutation = asyncio.Lock()  # serialises add / replace / delete
        self.unavailable: dict[str, str] = {}
        by_sha: dict[str, ServedModel] = {}
        for entry in store.list():
            try:
                if entry.sha256 not in by_sha:
                    by_sha[entry.sha256] = load_served_model(store.load(entry.sha256), entry.sha256, intra_op_threads)
                self.models[entry.model_id] = by_sha[entry.sha256]
            except (StoreError, ModelRejected) as e:
                self.unavailable[entry.model_id] = str(e)
                log.warning("model %r could not be restored: %s", entry.model_id, type(e).__name__)

    def model_hashes(self) -> dict[str, str]:
        with self.lock:
            return {k: m.sha256 for k, m in self.models.items()}

    def stop_runs(self) -> None:
        """Ask onnxruntime to stop every run in progress (at shutdown)."""
        with self.lock:
            models = list(self.models.values())
        for m in models:
            m.stop_all()

    def authenticate(self, request: Request) -> Credential:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refusal(401, "unauthenticated", "this endpoint needs a credential (Authorization: Bearer ...)",
                          {"WWW-Authenticate": "Bearer"})
        token = token.strip()
        if hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._upload_mac):
            cred = Credential("upload", None, "upload")
        else:
            found = self.store.lookup_credential(token)
            if found is None:
                raise Refusal(401, "unauthenticated", "the credential is not known to this server",
                              {"WWW-Authenticate": "Bearer"})
            cred = found
        wait = self.rate.take(cred.fingerprint)
        if wait > 0:
            raise Refusal(429, "rate_limited", f"more than {self.limits.rate_per_s:g} requests/s for this credential; "
                          f"retry in {wait:.2f} s", {"Retry-After": str(max(1, math.ceil(wait)))})
        return cred


def _check_model_id(model_id: str) -> None:
    if not is_model_id(model_id):
        raise Refusal(400, "bad_model_id", "model ids are 1-64 characters of letters, digits, '.', '_', '-', "
                      "starting with a letter or digit")


async def _read_limited(request: Request, limit: int, what: str, code: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, code, f"{what} declares {int(declared)} bytes; the limit is {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise Refusal(413, code, f"{what} exceeds the limit of {limit} bytes (more than {limit} bytes received)")
    return bytes(buf)


def _model_info(model_id: str, m: ServedModel, access: str, size: int) -> dict[str, Any]:
    return {"model_id": model_id, "sha256": m.sha256, "size": size, "access": access,
            "inputs": [d.to_json() for d in m.inputs], "outputs": [d.to_json() for d in m.outputs]}


def _decode_run_request(body: bytes, model: ServedModel, limits: Limits) -> tuple[dict, list[str] | None]:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, "malformed_request", "the run request body is not JSON") from None
    except RecursionError:
        raise Refusal(400, "malformed_request", "the run request body is nested too deeply") from None
    if not isinstance(req, dict) or "inputs" not in req:
        raise Refusal(400, "malformed_request", "the run request must be an object with 'inputs'")
    raw_inputs, outputs = req["inputs"], req.get("outputs")
    if isinstance(raw_inputs, list):
        if len(raw_inputs) != len(model.inputs):
            raise Refusal(422, "input_mismatch", f"{len(raw_inputs)} positional inputs sent; the model takes "
                          f"{len(model.inputs)}: {[d.name for d in model.inputs]}")
        raw_inputs = {d.name: v for d, v in zip(model.inputs, raw_inputs, strict=True)}
    if not isinstance(raw_inputs, dict) or not raw_inputs:
        raise Refusal(400, "malformed_request", "'inputs' must be a non-empty object (name -> tensor) or list")
    if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)):
        raise Refusal(400, "malformed_request", "'outputs' must be a list of output names")
    feeds, budget = {}, limits.max_input_elements
    for name, payload in raw_inputs.items():
        try:
            arr = decode_tensor(payload, str(name), INPUT_DTYPES, max_elements=budget)
        except OverflowError as e:
            raise Refusal(413, "input_too_large", f"{e} (limit for all inputs of one request: "
                          f"{limits.max_input_elements} elements)") from None
        except WireFormatError as e:
            raise Refusal(400, "malformed_input", str(e)) from None
        budget -= arr.size
        feeds[str(name)] = arr
    return feeds, outputs


class _InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 ``internal`` answer and one log line
    naming its type, never a traceback (which could carry inputs or secrets)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.error("internal error: %s", type(exc).__name__)
            if not started:
                await JSONResponse({"error": "internal", "detail": "internal server error"},
                                   status_code=500)(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="veil attested inference server", version="1",
                  description="Confidential ONNX inference. Verify /attestation before sending anything.")
    app.state.veil = state

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", ""))
                          for e in exc.errors()[:3])
        return JSONResponse({"error": "malformed_request", "detail": where[:300]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    app.add_middleware(_InternalErrors)

    @app.get("/health", summary="Liveness and platform name (no credential)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "platform": state.trusted.platform.name,
                "simulated": state.trusted.platform.simulated}

    def _check_nonce(nonce: str) -> None:
        if not _NONCE.fullmatch(nonce):
            raise Refusal(400, "bad_nonce", "nonce must be 32-128 lowercase hex characters (16-64 random bytes)")

    @app.get("/attestation", response_model=EvidenceModel, responses=_ERRORS,
             summary="Evidence binding code measurement, a commitment to the models and TLS key to the client's nonce")
    async def attestation(nonce: str) -> dict[str, Any]:
        _check_nonce(nonce)
        return state.trusted.evidence(nonce, state.model_hashes(), pad_to=state.pad_to).to_json()

    @app.get("/models/{model_id}/attestation", response_model=ModelEvidenceModel, responses=_ERRORS,
             summary="Evidence plus the model's inclusion proof (owner or run credential of this model)")
    async def model_attestation(model_id: str, nonce: str, request: Request) -> dict[str, Any]:
        _check_model_id(model_id)
        _check_nonce(nonce)
        cred = state.authenticate(request)
        _check_exists_for_operator(cred, model_id)
        if cred.kind not in ("owner", "run") or cred.model_id != model_id:
            raise Refusal(403, "forbidden", f"only credentials of model {model_id!r} get its inclusion proof")
        models = state.model_hashes()
        if model_id not in models:
            raise Refusal(404, "model_not_found", f"model {model_id!r} is not loaded")
        evidence, proof = state.trusted.model_evidence(nonce, models, model_id, pad_to=state.pad_to)
        return {"evidence": evidence.to_json(), "proof": proof.to_json()}

    @app.get("/models", response_model=list[ModelInfo], responses=_ERRORS, summary="Models this credential can see")
    async def list_models(request: Request) -> list[dict[str, Any]]:
        cred = state.authenticate(request)
        sizes = {m.model_id: m.size for m in state.store.list()}
        with state.lock:
            items = sorted(state.models.items())
        if cred.kind == "upload":  # ids and sizes only: the hashes would tell the operator which models it holds
            return [{**_model_info(k, m, "operator", sizes.get(k, 0)), "sha256": None} for k, m in items]
        return [_model_info(k, m, cred.kind, sizes.get(k, 0)) for k, m in items if k == cred.model_id]

    async def _receive_model(request: Request) -> tuple[bytes, str, ServedModel]:
        data = await _read_limited(request, state.limits.max_model_bytes, "the model upload", "model_too_large")
        if not data:
            raise Refusal(400, "invalid_model", "the upload is empty")
        sha = hashlib.sha256(data).hexdigest()
        # always a session of its own: sharing one with identical stored bytes would answer faster and so
        # tell the uploader that these bytes are already stored
        try:
            model = await run_in_threadpool(load_served_model, data, sha, state.intra_op_threads)
        except ModelRejected as e:
            raise Refusal(400, "invalid_model", str(e)) from None
        return data, sha, model

    upload_doc = {"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/models/{model_id}", status_code=201, response_model=UploadResponse, responses=_ERRORS,
              openapi_extra=upload_doc, summary="Add a model (upload credential); returns its owner credential")
    async def upload_model(model_id: str, request: Request) -> dict[str, Any]:
        _check_model_id(model_id)
        cred = state.authenticate(request)
        if cred.kind != "upload":
            raise Refusal(403, "forbidden", "only the upload credential may add models")
        with state.lock:
            if model_id in state.models or model_id in state.unavailable:
                raise Refusal(409, "model_exists", f"model {model_id!r} exists; its owner may replace it (PUT)")
            if len(state.models) >= state.limits.max_models:
                raise Refusal(413, "store_full", f"the server holds its maximum of {state.limits.max_models} models")
        data, sha, model = await _receive_model(request)
        owner_token = "veil_own_" + secrets.token_urlsafe(32)
        async with state.mutation:
            if model_id in state.models or model_id in state.unavailable:
                raise Refusal(409, "model_exists", f"model {model_id!r} exists; its owner may replace it (PUT)")
            try:  # the count is checked again by the store, under the lock that inserts
                await run_in_threadpool(state.store.put, model_id, data, sha, owner_token, state.limits.max_models)
            except StoreFullError as e:
                raise Refusal(413, "store_full", str(e)) from None
            with state.lock:
                state.models[model_id] = model
        return {"model_id": model_id, "sha256": sha, "size": len(data), "owner_credential": owner_token}

    def _owned(request: Request, model_id: str, action: str) -> Credential:
        _check_model_id(model_id)
        cred = state.authenticate(request)
        _check_exists_for_operator(cred, model_id)
        if cred.kind != "owner" or cred.model_id != model_id:
            raise Refusal(403, "forbidden", f"only the owner credential of model {model_id!r} may {action} it")
        with state.lock:
            if model_id not in state.models and model_id not in state.unavailable:
                raise Refusal(404, "model_not_found", f"no model {model_id!r}")
        return cred

    def _check_exists_for_operator(cred: Credential, model_id: str) -> None:
        # the operator sees every model id (GET /models), so it may learn that one does not exist;
        # other credentials get 403 for models that are not theirs, existing or not
        if cred.kind == "upload":
            with state.lock:
                known = model_id in state.models or model_id in state.unavailable
            if not known:
                raise Refusal(404, "model_not_found", f"no model {model_id!r}")

    @app.put("/models/{model_id}", response_model=UploadResponse, responses=_ERRORS, openapi_extra=upload_doc,
             summary="Replace a model's bytes (its owner credential only)")
    async def replace_model(model_id: str, request: Request) -> dict[str, Any]:
        cred = _owned(request, model_id, "replace")
        data, sha, model = await _receive_model(request)
        async with state.mutation:
            if state.store.instance(model_id) != cred.instance:
                raise Refusal(404, "model_not_found", f"model {model_id!r} was deleted meanwhile")
            try:
                await run_in_threadpool(state.store.replace, model_id, data, sha)
            except StoreError:
                raise Refusal(404, "model_not_found", f"model {model_id!r} was deleted meanwhile") from None
            with state.lock:
                state.models[model_id] = model
                state.unavailable.pop(model_id, None)
        return {"model_id": model_id, "sha256": sha, "size": len(data)}

    @app.delete("/models/{model_id}", responses=_ERRORS, summary="Delete a model (its owner credential only)")
    async def delete_model(model_id: str, request: Request) -> dict[str, Any]:
        cred = _owned(request, model_id, "delete")
        async with state.mutation:
            if state.store.instance(model_id) != cred.instance:
                raise Refusal(404, "model_not_found", f"model {model_id!r} was deleted meanwhile")
            await run_in_threadpool(state.store.delete, model_id)
            with state.lock:
                state.models.pop(model_id, None)
                state.unavailable.pop(model_id, None)
        return {"model_id": model_id, "deleted": True}

    @app.post("/models/{model_id}/credentials", status_code=201, responses=_ERRORS,
              summary="Issue a run-only credential for a model (its owner credential only)")
    async def issue_credential(model_id: str, request: Request) -> dict[str, Any]:
        cred = _owned(request, model_id, "issue credentials for")
        token = "veil_run_" + secrets.token_urlsafe(32)
        async with state.mutation:  # excludes a concurrent delete; the store also binds it to the model instance
            issued = await run_in_threadpool(state.store.add_credential, token, "run", model_id, cred.instance)
        if not issued:
            raise Refusal(404, "model_not_found", f"model {model_id!r} was deleted meanwhile")
        return {"model_id": model_id, "kind": "run", "credential": token}

    run_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": RunRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    @app.post("/models/{model_id}/run", responses={200: {"model": RunResponse}, **_ERRORS}, openapi_extra=run_doc,
              summary="Run a model on named (or positional) inputs (owner or run credential of this model)")
    async def run_model(model_id: str, request: Request) -> JSONResponse:
        _check_model_id(model_id)
        cred = state.authenticate(request)
        _check_exists_for_operator(cred, model_id)
        if cred.kind not in ("owner", "run") or cred.model_id != model_id:
            raise Refusal(403, "forbidden", f"this credential may not run model {model_id!r}")
        with state.lock:
            model = state.models.get(model_id)
        if model is None:
            raise Refusal(404, "model_not_found", f"model {model_id!r} is not loaded")
        body = await _read_limited(request, state.limits.max_request_bytes, "the run request", "request_too_large")

        def work() -> dict[str, Any]:
            feeds, outputs = _decode_run_request(body, model, state.limits)
            try:
                result = model.run(feeds, outputs, max_seconds=state.limits.max_run_seconds,
                                   max_output_bytes=state.limits.max_output_bytes)
            except InputRejected as e:
                raise Refusal(422, "input_mismatch", str(e)) from None
            except RunLimitExceeded as e:  # run_time_exceeded: 503; output_too_large, run_memory_exceeded: 413
                raise Refusal(503 if e.code == "run_time_exceeded" else 413, e.code, str(e)) from None
            return {"model_id": model_id, "model_sha256": model.sha256,
                    "outputs": {k: encode_tensor(v) for k, v in result.items()}}

        return JSONResponse(await run_in_threadpool(work))

    return app

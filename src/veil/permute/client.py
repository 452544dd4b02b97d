"""The user's role: embed (or map token ids), permute, call the cloud, un-permute.

Inference steps (STIP):
1. ``embed`` mode: ``x = E[tokens]`` with the user's own embedding table, then ``x' = x[..., pi]``.
   ``vocab`` mode: the token ids are mapped to ``argsort(sigma)[tokens]``.
2. The cloud runs the transformed model on ``x'`` and returns ``y'``.
3. ``embed`` mode: ``y = y'[..., argsort(pi)]``, and for decoders ``logits = y H^T`` with the user's
   head ``H``. ``vocab`` mode: logits come back in permuted order, ``logits = y'[..., argsort(sigma)]``;
   encoder hidden states are un-permuted with ``pi``.

Generation keeps the key/value cache on the cloud (a session): one round trip per new token.
Before anything is sent the client checks that its key bundle belongs to the cloud it talks to
(``key_id``, family, mode, sizes) and that the sequence fits the model.

Transport security: with an ``https://`` URL the client verifies the cloud's certificate (against
``ca`` when given, else the system's trust store; verification is never turned off) and can present
its own certificate (``client_cert``) to a cloud that requires one. Plain ``http://`` is accepted
silently only to a loopback address; to any other host it warns that traffic is unencrypted.
"""

from __future__ import annotations

import ipaddress
import ssl
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from veil.errors import DeploymentError, InputError, VeilError
from veil.permute.bundle import UserBundle
from veil.permute.cloud import CloudRuntime
from veil.permute.errors import CloudAuthError, CloudError, KeyBundleError, SequenceTooLongError, reason_of
from veil.permute.sentence import mean_pool, pool
from veil.permute.wire import decode_array, encode_array

__all__ = ["Transport", "LocalTransport", "HttpTransport", "PermuteClient", "UnencryptedTrafficWarning", "mean_pool"]


class Transport(Protocol):
    """How the client reaches the cloud (in-process for tests, HTTP for deployments)."""

    def info(self) -> dict[str, Any]: ...
    def forward(self, x: np.ndarray, attention_mask: np.ndarray | None,
                token_type_ids: np.ndarray | None = None) -> np.ndarray: ...
    def open_session(self) -> str: ...
    def step(self, sid: str, x: np.ndarray) -> np.ndarray: ...
    def close_session(self, sid: str) -> None: ...


class LocalTransport:
    """Calls a :class:`CloudRuntime` in the same process (tests, benchmarks)."""

    def __init__(self, runtime: CloudRuntime):
        self.runtime = runtime

    def info(self) -> dict[str, Any]:
        return self.runtime.info()

    def forward(self, x: np.ndarray, attention_mask: np.ndarray | None,
                token_type_ids: np.ndarray | None = None) -> np.ndarray:
        return self.runtime.forward(x, attention_mask, token_type_ids)

    def open_session(self) -> str:
        return self.runtime.open_session()

    def step(self, sid: str, x: np.ndarray) -> np.ndarray:
        (out,) = self.runtime.step_batch([(sid, x)])
        if isinstance(out, Exception):
            raise out
        return out

    def close_session(self, sid: str) -> None:
        self.runtime.close_session(sid)


class UnencryptedTrafficWarning(UserWarning):
    """A plain ``http://`` URL to a host other than this machine: anyone on the path sees the traffic."""


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ssl_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error somewhere in ``exc``'s chain (httpx wraps httpcore wraps ssl)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        e = e.__cause__ or e.__context__
    return None


PathLike = str | Path


class HttpTransport:
    """Talks to ``veil permute serve`` over HTTP or HTTPS (httpx, timeouts on every call).

    ``ca``: PEM file of the CA that must have issued the cloud's certificate (only that CA is
    trusted; default: the system's trust store). ``server_name``: the name the cloud's certificate
    must carry, when it differs from the URL's host (e.g. the party name of a ``veil keys``
    certificate while the URL is ``https://127.0.0.1:8470``); it is sent as SNI and checked as the
    TLS host name. ``client_cert``: ``(cert PEM, key PEM)`` for a cloud that requires client
    certificates. A TLS failure is a :class:`~veil.permute.errors.CloudAuthError`.
    """

    def __init__(self, url: str, timeout: float = 60.0, *, ca: PathLike | None = None,
                 client_cert: tuple[PathLike, PathLike] | None = None, server_name: str | None = None):
        import httpx

        self._httpx = httpx
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise InputError(f"not a valid cloud URL: {url!r}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InputError(f"the cloud URL must be http://host:port or https://host:port; got {url!r}")
        self.tls = parsed.scheme == "https"
        self.server_name, self.ca = server_name, ca
        self._answered = False  # a refused client certificate shows only on the first connection
        self._extensions: dict[str, Any] = {}
        verify: ssl.SSLContext | bool = True
        if not self.tls:
            if ca is not None or client_cert is not None or server_name is not None:
                raise InputError(f"ca, client_cert and server_name need an https:// URL; got {url!r}")
            if not _is_loopback(parsed.host):
                warnings.warn(f"{url} is plain HTTP to another machine: the permuted traffic is unencrypted and "
                              "the cloud is not authenticated; use https:// with ca=", UnencryptedTrafficWarning,
                              stacklevel=2)
        else:
            verify = self._context(ca, client_cert)
            if server_name is not None:
                self._extensions["sni_hostname"] = server_name
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, verify=verify)

    @staticmethod
    def _context(ca: PathLike | None, client_cert: tuple[PathLike, PathLike] | None) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=None if ca is None else str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise DeploymentError(f"cannot load the CA file {ca}: {reason_of(exc)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_cert is not None:
            cert, key = client_cert
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except (ssl.SSLError, OSError) as exc:
                raise DeploymentError(f"cannot load the client certificate {cert} with key {key}: "
                                      f"{reason_of(exc)}") from None
        return ctx

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self.client.request(method, path, json=body, extensions=self._extensions)
        except self._httpx.HTTPError as exc:
            self._raise_tls_failure(exc)
            raise CloudError(f"cannot reach the cloud at {self.client.base_url}: {reason_of(exc)}") from None
        self._answered = True
        try:
            data = resp.json()
        except ValueError:
            raise CloudError(f"cloud answered {resp.status_code} with a body that is not JSON") from None
        if resp.status_code != 200:
            _raise_remote(resp.status_code, data)
        return data

    def _raise_tls_failure(self, exc: BaseException) -> None:
        if not self.tls:
            return
        where = f"the cloud at {self.client.base_url}"
        err = _ssl_failure(exc)
        if isinstance(err, ssl.SSLCertVerificationError):
            name = self.server_name or self.client.base_url.host
            trusted = f"the CA in {self.ca}" if self.ca is not None else "the system's trusted CAs (no ca= given)"
            raise CloudAuthError(f"{where} is not authenticated: its certificate does not verify as {name!r} "
                                 f"against {trusted} ({err.verify_message})") from None
        if err is not None:
            reason = err.reason or err.__class__.__name__
            if "ALERT" in reason.upper() or "CERTIFICATE" in reason.upper():
                raise CloudAuthError(f"{where} refused the TLS handshake ({reason}): it requires a client "
                                     "certificate from its CA (client_cert=, --client-cert)") from None
            raise CloudAuthError(f"TLS with {where} failed ({reason})") from None
        if not self._answered and isinstance(exc, (self._httpx.ReadError, self._httpx.RemoteProtocolError,
                                                   self._httpx.WriteError)):
            # TLS 1.3: the server checks the client's certificate after the client's handshake is done,
            # so a refused (or missing) client certificate can surface as a dropped connection.
            raise CloudAuthError(f"{where} closed the TLS connection without answering: it probably requires a "
                                 "client certificate from its CA (client_cert=, --client-cert)") from None

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info")

    def forward(self, x: np.ndarray, attention_mask: np.ndarray | None,
                token_type_ids: np.ndarray | None = None) -> np.ndarray:
        body: dict[str, Any] = {"inputs": encode_array(x)}
        if attention_mask is not None:
            body["attention_mask"] = encode_array(attention_mask)
        if token_type_ids is not None:
            body["token_type_ids"] = encode_array(token_type_ids)
        return decode_array(self._request("POST", "/forward", body).get("outputs"), "outputs")

    def open_session(self) -> str:
        return str(self._request("POST", "/sessions").get("session"))

    def step(self, sid: str, x: np.ndarray) -> np.ndarray:
        data = self._request("POST", f"/sessions/{sid}/step", {"inputs": encode_array(x)})
        return decode_array(data.get("outputs"), "outputs")

    def close_session(self, sid: str) -> None:
        self._request("DELETE", f"/sessions/{sid}")


def _raise_remote(status: int, data: Any) -> None:
    kind = data.get("error") if isinstance(data, dict) else None
    detail = data.get("detail") if isinstance(data, dict) else None
    if kind == "SequenceTooLongError":
        raise SequenceTooLongError(int(data.get("length", -1)), int(data.get("limit", -1)))
    if kind in ("InputError", "InputShapeError", "InputDtypeError"):
        raise InputError(f"cloud rejected the input: {detail}")
    raise CloudError(f"cloud answered {status}: {detail or kind or 'error'}")


class PermuteClient:
    """The user: holds a :class:`UserBundle`, talks to one cloud through a transport."""

    def __init__(self, bundle: UserBundle, transport: Transport):
        self.bundle, self.transport = bundle, transport
        self.meta = bundle.meta
        self.key = bundle.key
        self._pi_inv, self._pi = self.key.hidden_inverse, self.key.hidden
        self._sigma_inv = self.key.vocab_inverse
        self._embedding = None if bundle.embedding is None else bundle.embedding.float().numpy()
        head = bundle.head if bundle.head is not None else bundle.embedding
        self._head_t = None if head is None else np.ascontiguousarray(head.float().numpy().T)
        self._scale = float(self.meta.get("embedding_scale") or 1.0)  # e.g. Gemma's sqrt(d)
        self._logit_scale = float(self.meta.get("logit_scale") or 1.0)  # e.g. Cohere's logit_scale
        cap = self.meta.get("logit_softcap")
        self._softcap = None if cap is None else float(cap)
        self.check_cloud(transport.info())

    def close(self) -> None:
        """Close the transport's connections (an HTTPS cloud then sees a clean TLS close)."""
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> PermuteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checks ---------------------------------------------------------------------------------
    def check_cloud(self, info: dict[str, Any]) -> None:
        if info.get("key_id") != self.key.key_id:
            raise KeyBundleError("the key bundle was made for a different transformed model than the cloud serves "
                                 "(key ids differ)")
        for name in ("family", "mode", "hidden_size", "vocab_size", "max_positions", "is_decoder"):
            if info.get(name) != self.meta.get(name):
                raise KeyBundleError(f"key bundle and cloud disagree on {name}: "
                                     f"{self.meta.get(name)!r} vs {info.get(name)!r}")

    @property
    def max_positions(self) -> int:
        return int(self.meta["max_positions"])

    @property
    def sentence_config(self) -> dict[str, Any]:
        """The sentence-transformers settings the developer carried into the bundle (``max_seq_length``,
        ``do_lower_case``, ``pooling``, ``normalize``); mean pooling and no limit but the model's when absent."""
        return dict(self.meta.get("sentence_transformers") or {})

    @property
    def max_text_tokens(self) -> int:
        """Texts are truncated to this many tokens: the sentence-transformers ``max_seq_length`` when the
        bundle has one (e.g. 256 for all-MiniLM-L6-v2), never more than the model's positions."""
        limit = self.sentence_config.get("max_seq_length")
        return self.max_positions if not limit else min(int(limit), self.max_positions)

    def _ids(self, token_ids: Any, ndim: int) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu" or ids.ndim != ndim:
            raise InputError(f"token ids must be integers with {ndim} axes; got {ids.dtype} with {ids.ndim}")
        vocab = int(self.meta["vocab_size"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"token ids must lie in 0..{vocab - 1}")
        if ids.shape[-1] == 0:
            raise InputError("at least one token is needed")
        return ids.astype(np.int64)

    # --- steps 1 and 3 --------------------------------------------------------------------------
    # np.take along the last axis is about 10x faster than torch.index_select there (measured).
    def permute_input(self, ids: np.ndarray) -> np.ndarray:
        if self._sigma_inv is not None:
            return np.take(self._sigma_inv, ids)
        assert self._embedding is not None
        x = np.take(self._embedding[ids], self._pi, axis=-1)
        return x if self._scale == 1.0 else x * np.float32(self._scale)

    def unpermute_output(self, y: np.ndarray) -> np.ndarray:
        if self._sigma_inv is not None:
            return np.take(y, self._sigma_inv if self.meta["is_decoder"] else self._pi_inv, axis=-1)
        h = np.take(y, self._pi_inv, axis=-1)
        if not self.meta["is_decoder"]:
            return h
        logits = h @ self._head_t
        if self._logit_scale != 1.0:
            logits = logits * np.float32(self._logit_scale)
        if self._softcap is not None:
            logits = np.float32(self._softcap) * np.tanh(logits / np.float32(self._softcap))
        return logits

    # --- inference ------------------------------------------------------------------------------
    def forward(self, token_ids: Any, attention_mask: Any | None = None,
                token_type_ids: Any | None = None) -> np.ndarray:
        """Whole sequences: encoder final hidden states, or decoder logits at every position.
        ``attention_mask``: 1 for real tokens, 0 for padding. ``token_type_ids``: segment ids of a
        sentence pair (BERT-style encoders); they travel to the cloud as they are (not permuted)."""
        ids = self._ids(token_ids, 2)
        if ids.shape[1] > self.max_positions:
            raise SequenceTooLongError(ids.shape[1], self.max_positions)
        mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask is not None and mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {mask.shape}; expected {ids.shape} like the token ids")
        types = None
        if token_type_ids is not None:
            types = np.asarray(token_type_ids)
            if types.shape != ids.shape or types.dtype.kind not in "iu":
                raise InputError(f"token_type_ids must be integers of shape {ids.shape}; got {types.dtype} "
                                 f"{types.shape}")
            limit = int(self.meta.get("type_vocab_size") or 0)
            if self.meta["is_decoder"] or limit < 1:
                raise InputError(f"{self.meta['family']} takes no token_type_ids")
            if types.min() < 0 or types.max() >= limit:
                raise InputError(f"token_type_ids must lie in 0..{limit - 1}")
            types = types.astype(np.int64)
        return self.unpermute_output(self.transport.forward(self.permute_input(ids), mask, types))

    def sentence_embedding(self, token_ids: Any, attention_mask: Any | None = None,
                           token_type_ids: Any | None = None) -> np.ndarray:
        """The final hidden states pooled over the real tokens (``attention_mask`` 1) as the model's
        sentence-transformers configuration says (mean when the bundle has none); not normalised.
        Without a mask every position counts, padding included."""
        ids = self._ids(token_ids, 2)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return pool(self.forward(ids, mask, token_type_ids), mask, self.sentence_config.get("pooling") or ("mean",))

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        choose: Callable[[np.ndarray], int] | None = None,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` ids (greedy unless ``choose`` picks from the logits)."""
        if not self.meta["is_decoder"]:
            raise InputError(f"{self.meta['family']} is an encoder; generation needs a decoder model")
        ids = self._ids(list(prompt_ids), 1)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        needed = len(ids) + max_new_tokens - 1
        if needed > self.max_positions:
            raise SequenceTooLongError(needed, self.max_positions)
        pick = choose or (lambda logits: int(np.argmax(logits)))
        sid = self.transport.open_session()
        out: list[int] = []
        try:
            x = self.permute_input(ids)
            for _ in range(max_new_tokens):
                logits = self.unpermute_output(self.transport.step(sid, x))
                token = pick(logits)
                out.append(token)
                if eos_token_id is not None and token == eos_token_id:
                    break
                x = self.permute_input(np.array([token], dtype=np.int64))
        finally:
            try:
                self.transport.close_session(sid)
            except VeilError:
                pass
        return out

"""The accelerator: an untrusted party that evaluates linear layers on blinded field elements.

Protocol (messages over an authenticated channel from the enclave; every reply goes back to it):

1. ``setup``: the layers it will run: kind, stride/padding, and weights, either Slalom's quantised
   weights (small signed integers: the accelerator *sees the model*) or one additive share of them
   (uniform field elements: it learns nothing about the weights unless it colludes with the other
   share holder). Reply ``ready`` naming the backend (torch on a GPU when present, else NumPy).
2. ``compute`` (repeated): for each listed layer, a blinded input ``z = x_q + r mod p`` (uint32);
   the accelerator returns ``W z mod p`` (uint32) for each. It never sees ``x``: ``r`` is uniform and
   used once, so ``z`` is uniform and independent of ``x``.
3. ``bye``: stop.

Malformed requests get an ``error`` reply (the enclave raises); the accelerator never crashes the
enclave and never decides anything about the result - the enclave verifies it (Freivalds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from veil.errors import ChannelError
from veil.net.channel import Channel
from veil.offload.backend import Backend, select_backend
from veil.offload.field import P

__all__ = ["Accelerator", "serve_accelerator", "answer_until_bye"]

log = logging.getLogger(__name__)


class Accelerator:
    """Stateless apart from the layer table; ``handle(msg)`` returns the reply (or None to stop)."""

    def __init__(self, backend: str | Backend = "auto"):
        self.backend = select_backend(backend) if isinstance(backend, str) else backend
        self.layers: dict[int, dict[str, Any]] = {}
        self.requests = 0
        self.compute_s = 0.0

    def handle(self, msg: Any) -> dict[str, Any] | None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind == "setup":
                return self._setup(msg)
            if kind == "compute":
                return self._compute(msg)
            if kind == "bye":
                return None
            return _error(f"unknown request type {kind!r}; expected setup, compute or bye")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch failures
            return _error(f"malformed {kind} request: {type(e).__name__}: {e}")

    def _setup(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("field") != P:
            return _error(f"enclave uses field {msg.get('field')}, this accelerator supports p = {P}")
        self.layers = {}
        for spec in msg["layers"]:
            w = np.asarray(spec["w"]).astype(np.int64)
            self.layers[int(spec["id"])] = {
                "kind": spec["kind"], "w": self.backend.prepare(w, bool(spec["full"])),
                "strides": tuple(spec.get("strides", (1, 1))), "pads": tuple(spec.get("pads", (0, 0, 0, 0))),
                "shape": tuple(w.shape)}
        return {"type": "ready", "backend": self.backend.name, "layers": len(self.layers)}

    def _compute(self, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = []
        for item in msg["items"]:
            lay = self.layers.get(int(item["id"]))
            z = item["z"]
            if lay is None:
                return _error(f"layer {item['id']} was not set up")
            if not isinstance(z, np.ndarray) or z.dtype != np.uint32:
                return _error("blinded inputs must be uint32 arrays")
            if z.size and int(z.max()) >= P:
                return _error("blinded input holds values outside the field")
            out.append(self.compute(int(item["id"]), z.astype(np.int64)))
        self.requests += 1
        self.compute_s += time.perf_counter() - t0
        return {"type": "result", "round": msg.get("round"), "items": out}

    def compute(self, layer: int, z: np.ndarray) -> np.ndarray:
        """``W z mod p`` for one layer (override in tests to model a lying accelerator)."""
        lay = self.layers[layer]
        if lay["kind"] == "linear":
            k = lay["shape"][1]
            if z.ndim < 1 or z.shape[-1] != k:
                raise ValueError(f"linear layer {layer} expects a last axis of {k}, got shape {z.shape}")
            y = self.backend.linear(z.reshape(-1, k), lay["w"]).reshape(*z.shape[:-1], lay["shape"][0])
        else:
            if z.ndim != 4 or z.shape[1] != lay["shape"][1]:
                raise ValueError(f"conv layer {layer} expects NCHW with C={lay['shape'][1]}, got shape {z.shape}")
            y = self.backend.conv2d(z, lay["w"], lay["strides"], lay["pads"])
        return y.astype(np.uint32)


def _error(message: str) -> dict[str, Any]:
    return {"type": "error", "message": message}


def serve_accelerator(channel: Channel, enclave: str = "enclave", backend: str | Backend = "auto",
                      idle_timeout: float | None = None, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Answer the enclave's requests until it says ``bye`` (or disconnects); return a summary."""
    acc = accelerator or Accelerator(backend)
    answer_until_bye(channel, enclave, acc.handle, idle_timeout, "accelerator")
    return {"backend": acc.backend.name, "requests": acc.requests, "compute_s": acc.compute_s}


def answer_until_bye(channel: Channel, enclave: str, handle: Callable[[Any], dict[str, Any] | None],
                     idle_timeout: float | None, what: str, close: bool = False) -> None:
    """An accelerator's loop (inference and training): answer each of the enclave's requests with
    ``handle(msg)`` until it returns None (``bye``) or the enclave goes away; close the channel at the end
    when ``close``, whatever stopped the loop."""
    try:
        while True:
            try:
                msg = channel.recv(enclave, timeout=idle_timeout)
            except ChannelError:
                log.info("%s %s: enclave went away", what, channel.me)
                break
            reply = handle(msg)
            if reply is None:
                break
            channel.send(enclave, reply)
    finally:
        if close:
            channel.close()

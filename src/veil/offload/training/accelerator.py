"""The untrusted accelerators of offload training (see :mod:`veil.offload.training.protocol`).

Requests from the enclave:

* ``tmatmul``: a list of products for one round. Role 0 (``accelerator0``) gets ``E, F`` and a seed,
  expands its masks ``(A0, B0)`` and returns ``E (F + B0) + A0 F``; role 1 (``accelerator1``) returns
  ``E B1 + A1 F``; role 2 (``accelerator2``, the triple helper) gets both seeds and the shape, expands
  ``A = A0 + A1``, ``B = B0 + B1`` itself and returns ``A B`` (it learns the masks, as it must).
  Every value is a uint32 field element; the answers are checked by the enclave (Freivalds).
* ``bye``: stop.

Malformed requests get an ``error`` reply. The accelerator decides nothing about the result.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from veil.net.channel import Channel
from veil.offload.accelerator import answer_until_bye
from veil.offload.backend import Backend, select_backend
from veil.offload.field import P
from veil.offload.training.conv_field import ConvSpec
from veil.offload.training.protocol import expected_answer

__all__ = ["TrainAccelerator", "serve_train_accelerator"]


def _field(a: Any, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint32 or a.ndim not in (2, 4):
        raise ValueError(f"{what} must be a 2-D (or, for a convolution, 4-D) uint32 array")
    if a.size and int(a.max()) >= P:
        raise ValueError(f"{what} holds values outside the field")
    return a


def _seed(s: Any) -> bytes:
    if not isinstance(s, bytes) or len(s) != 32:
        raise ValueError("seed must be 32 bytes")
    return s


def _shape(sh: Any) -> tuple[int, int, int]:
    if not isinstance(sh, list) or len(sh) != 3 or not all(isinstance(d, int) and 0 < d < 2**31 for d in sh):
        raise ValueError("shape must be three positive integers [n, k, m]")
    n, k, m = sh
    if n * k + k * m > 2**31:
        raise ValueError(f"product {n}x{k}x{m} too large")
    return n, k, m


class TrainAccelerator:
    """Stateless; ``handle(msg)`` returns the reply (None to stop). Override :meth:`product` in tests to
    model a cheating accelerator."""

    def __init__(self, backend: str | Backend = "auto"):
        self.backend = select_backend(backend) if isinstance(backend, str) else backend
        self.requests = 0
        self.compute_s = 0.0

    def handle(self, msg: Any) -> dict[str, Any] | None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind == "tmatmul":
                t0 = time.perf_counter()
                out = [self.product(it).astype(np.uint32) for it in msg["items"]]
                self.requests += 1
                self.compute_s += time.perf_counter() - t0
                return {"type": "result", "round": msg.get("round"), "items": out}
            if kind == "bye":
                return None
            return {"type": "error", "message": f"unknown request type {kind!r}; expected tmatmul or bye"}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            return {"type": "error", "message": f"malformed {kind} request: {type(e).__name__}: {e}"}

    def product(self, item: dict[str, Any]) -> np.ndarray:
        """The field product this accelerator owes for one item (see module docstring)."""
        role = int(item["role"])
        spec = ConvSpec.from_msg(item["conv"]) if "conv" in item else None
        if role == 2:
            shape = _shape(item.get("shape"))
            seeds = item.get("seeds")
            if not isinstance(seeds, list) or len(seeds) != 2:
                raise ValueError("the triple helper needs the two share holders' seeds")
            if spec is not None:
                _conv_fits(spec, shape)
            return expected_answer(self.backend, 2, None, None, (_seed(seeds[0]), _seed(seeds[1])), spec, shape)
        if role not in (0, 1):
            raise ValueError(f"role must be 0, 1 or 2, got {role}")
        e, f = _field(item["e"], "E"), _field(item["f"], "F")
        if spec is None:
            if e.ndim != 2 or f.ndim != 2 or e.shape[1] != f.shape[0]:
                raise ValueError(f"E {e.shape} and F {f.shape} do not chain")
        else:
            n, k, m = _matrix_shape(spec, e.shape, f.shape)
            if (e.shape, f.shape) != spec.raw_shapes(n, k, m):
                raise ValueError(f"E {e.shape} and F {f.shape} do not fit the convolution {spec}")
        return expected_answer(self.backend, role, e, f, (_seed(item["seed"]),), spec)


def _matrix_shape(spec: ConvSpec, eu: tuple[int, ...], fv: tuple[int, ...]) -> tuple[int, int, int]:
    if spec.op == "fwd":
        return spec.rows, spec.k, (fv[1] if len(fv) == 2 else 0)
    if spec.op == "dw":
        return (eu[0] if len(eu) == 2 else 0), spec.rows, spec.k
    return spec.rows, (eu[1] if len(eu) == 2 else 0), spec.k


def _conv_fits(spec: ConvSpec, shape: tuple[int, int, int]) -> None:
    n, k, m = shape
    o = m if spec.op == "fwd" else n if spec.op == "dw" else k
    if spec.matrix_shape(o) != shape:
        raise ValueError(f"shape {list(shape)} does not fit the convolution {spec}")


def serve_train_accelerator(channel: Channel, enclave: str = "enclave", backend: str | Backend = "auto",
                            idle_timeout: float | None = None,
                            accelerator: TrainAccelerator | None = None) -> dict[str, Any]:
    """Answer the enclave's training requests until it says ``bye`` (or disconnects), then close the channel;
    return a summary."""
    acc = accelerator or TrainAccelerator(backend)
    # close=True: the enclave notices at once if this accelerator stops for any reason
    answer_until_bye(channel, enclave, acc.handle, idle_timeout, "training accelerator", close=True)
    return {"backend": acc.backend.name, "requests": acc.requests, "compute_s": acc.compute_s}

"""The untrusted accelerators of offload training (see :mod:`veil.offload.training.protocol`).

Requests from the enclave:

* ``tmatmul``: a list of products for one round. Role 0 (``accelerator0``) gets ``E, F`` and a seed,
  expands its masks ``(A0, B0)`` and returns ``E (F + B0) + A0 F``; role 1 (``accelerator1``) returns
  ``E B1 + A1 F``; role 2 (``accelerator2``, the triple helper) gets both seeds and the shape, expands
  ``A = A0 + A1``, ``B = B0 + B1`` itself and returns ``A B`` (it learns the masks, as it must). Every item
  carries an integer ``id``, distinct within the request.
  An item with ``terms`` (a sum item, e.g. the cross terms at precision ``double``) owes the sum over its
  terms ``[u, v]``: ``u`` is ``"e"`` (the item's own ``E`` with the masks of its own seed) or the id of
  another item of the round whose ``E`` (and masks) the term reuses, ``v`` likewise ``"f"`` or an id; role 0
  returns ``sum_t E_t (F_t + B0_t) + A0_t F_t``, role 1 ``sum_t E_t B1_t + A1_t F_t``, role 2
  ``sum_t A_t B_t`` (:func:`~veil.offload.training.protocol.expected_sum`). Referenced items have the same
  role, shapes and convolution.
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
from veil.offload.training.protocol import expected_sum

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
        self._round: dict[int, Any] = {}  # the items of the request being answered, by id (for ``terms``)

    def handle(self, msg: Any) -> dict[str, Any] | None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind == "tmatmul":
                t0 = time.perf_counter()
                self._round = _by_id(msg.get("items"))
                try:
                    out = [self.product(it).astype(np.uint32) for it in self._round.values()]
                finally:
                    self._round = {}
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
            if spec is not None:
                _conv_fits(spec, shape)
            sources: list[tuple[np.ndarray | None, np.ndarray | None, tuple[bytes, ...]]] = [
                (None, None, _seeds2(item.get("seeds")))]
        elif role not in (0, 1):
            raise ValueError(f"role must be 0, 1 or 2, got {role}")
        else:
            e, f = _field(item["e"], "E"), _field(item["f"], "F")
            if spec is None:
                if e.ndim != 2 or f.ndim != 2 or e.shape[1] != f.shape[0]:
                    raise ValueError(f"E {e.shape} and F {f.shape} do not chain")
            else:
                n, k, m = _matrix_shape(spec, e.shape, f.shape)
                if (e.shape, f.shape) != spec.raw_shapes(n, k, m):
                    raise ValueError(f"E {e.shape} and F {f.shape} do not fit the convolution {spec}")
            shape = None
            sources = [(e, f, (_seed(item["seed"]),))]
        terms = self._terms(item, role, sources) if "terms" in item else [(0, 0)]
        return expected_sum(self.backend, role, sources, terms, spec, shape)

    def _terms(self, item: dict[str, Any], role: int,
               sources: list[tuple[np.ndarray | None, np.ndarray | None, tuple[bytes, ...]]]) -> list[tuple[int, int]]:
        """A sum item's ``terms`` as ``(U source, V source)`` indices into ``sources`` (index 0: the item's own
        operands), appending each other item of the round that a term names once (``ValueError`` for a term
        that is not ``[u, v]`` with ``u`` ``"e"`` or an id, ``v`` ``"f"`` or an id of another item)."""
        raw = item["terms"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= 16:
            raise ValueError("terms must be a list of 1 to 16 [u, v] pairs")
        at: dict[int, int] = {}
        terms = []
        for t in raw:
            if not isinstance(t, list) or len(t) != 2:
                raise ValueError("each term must be a pair [u, v]")
            ix = []
            for side, ref in zip(("e", "f"), t, strict=True):
                if isinstance(ref, str) and ref == side:
                    ix.append(0)
                    continue
                other = self._round.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None
                if other is None or ref == item.get("id"):
                    raise ValueError(f"term operand {_short(ref)} names no other item of this request "
                                     f"(expected {side!r} or the integer id of another item)")
                if ref not in at:
                    at[ref] = len(sources)
                    sources.append(self._reused(other, item, role))
                ix.append(at[ref])
            terms.append((ix[0], ix[1]))
        return terms

    def _reused(self, other: Any, item: dict[str, Any], role: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                           tuple[bytes, ...]]:
        """The operands and seeds of the item ``other`` that a term of ``item`` reuses (same role, shapes and
        convolution)."""
        if not isinstance(other, dict) or other.get("role") != item.get("role") or other.get("conv") != item.get("conv"):
            raise ValueError("a reused operand must come from an item of the same role and convolution")
        if role == 2:
            if other.get("shape") != item.get("shape"):
                raise ValueError("a reused operand must have the shape of the item's own")
            return None, None, _seeds2(other.get("seeds"))
        e, f = _field(other.get("e"), "E"), _field(other.get("f"), "F")
        if e.shape != item["e"].shape or f.shape != item["f"].shape:
            raise ValueError("a reused operand must have the shape of the item's own")
        return e, f, (_seed(other.get("seed")),)


def _by_id(items: Any) -> dict[int, dict[str, Any]]:
    """A request's items by id, in order (``ValueError`` unless a list of dicts with distinct integer ids: a
    term names another item by its id)."""
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise ValueError("items must be a list of item dicts")
    ids = [it.get("id") for it in items]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"every item needs an integer id, distinct within the request (got {_short(ids)})")
    return dict(zip(ids, items, strict=True))


def _short(x: Any) -> str:
    """``repr`` of a value from a request, cut to 40 characters (an error names what was wrong, not all of it)."""
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


def _seeds2(seeds: Any) -> tuple[bytes, bytes]:
    if not isinstance(seeds, list) or len(seeds) != 2:
        raise ValueError("the triple helper needs the two share holders' seeds")
    return _seed(seeds[0]), _seed(seeds[1])


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

"""Compile a veil graph into the offload split: enclave segments and rounds of accelerator layers.

Rules (automatic, no per-model code):

* ``linear`` and ``conv2d`` nodes (weights times one activation) go to the accelerator. Their bias is
  *not* sent: the enclave adds it after unblinding.
* Every other op (ReLU, pooling, softmax, layernorm, GELU, reshapes, residual adds, and ``matmul`` of
  two activations such as Q@K^T and attn@V in attention) runs inside the enclave with the plain
  executor's own op functions. Products of two activations stay inside: blinding both factors
  (``(A+R)(B+S)``) leaves ``A S + R B`` for the enclave, which costs as much as ``A B`` itself.
* Scheduling: each node gets the earliest round its inputs allow. Accelerator layers whose inputs
  are ready at the same point are sent together (Q, K and V projections share one round trip).

Quantisation: each offloaded layer gets its own weight scale ``2^fw`` so that
``|W_q| = |round(W 2^fw)| <= 2^WEIGHT_BITS``; the activation scale ``2^fx`` is chosen per query and per
sample by the enclave (:mod:`veil.offload.enclave`) so that the result provably fits in the field.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from veil.graph.ir import Graph, Node
from veil.offload.errors import OffloadModelError
from veil.offload.field import MAX_INNER_FULL, MAX_INNER_SMALL, WEIGHT_BITS
from veil.plain import PLAIN_OPS, trace_shapes

__all__ = ["OFFLOAD_OPS", "ACCELERATED_OPS", "WEIGHT_PRIVACY", "OffloadLayer", "Step", "OffloadPlan",
           "compile_offload"]

ACCELERATED_OPS = frozenset({"linear", "conv2d"})
OFFLOAD_OPS: frozenset[str] = frozenset(PLAIN_OPS)  #: the enclave runs every op the plain executor runs
WEIGHT_PRIVACY = ("none", "shares")


@dataclass
class OffloadLayer:
    """One accelerator layer: quantised weights and the facts the enclave needs about them."""

    index: int
    node: Node
    fw: int  #: weight fractional bits
    w_q: np.ndarray  #: int64 quantised weights, (O, K) for linear, (O, C, kh, kw) for conv2d
    inner: int  #: K, the length of each dot product
    out_features: int  #: O
    l1_q: float  #: max over output rows of sum |W_q|
    l2_q: float  #: max over output rows of ||W_q||_2
    l1_w: float  #: max over output rows of sum |W| (float weights), for the error bound
    in_shape1: tuple[int, ...]  #: input shape for one sample
    out_shape1: tuple[int, ...]  #: output shape for one sample

    @property
    def kind(self) -> str:
        return self.node.op

    @property
    def w_mat(self) -> np.ndarray:
        """Quantised weights as an (O, K) matrix (conv kernels flattened in im2col order)."""
        return self.w_q.reshape(self.out_features, -1)

    @property
    def in_size(self) -> int:
        return int(np.prod(self.in_shape1))

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape1))


@dataclass
class Step:
    """Either an enclave segment (``nodes``) or one accelerator round (``layers``)."""

    where: str  # "enclave" | "accelerator"
    nodes: list[Node] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)


@dataclass
class OffloadPlan:
    graph: Graph
    layers: list[OffloadLayer]
    steps: list[Step]
    weight_privacy: str
    fingerprint: str

    @property
    def rounds(self) -> int:
        return sum(1 for s in self.steps if s.where == "accelerator")

    def describe(self) -> str:
        out = [f"offload plan for {self.graph.name!r}: {len(self.layers)} accelerator layers in "
               f"{self.rounds} rounds, weight privacy {self.weight_privacy!r}"]
        for s in self.steps:
            if s.where == "enclave":
                out.append("  enclave     " + ", ".join(n.op for n in s.nodes))
            else:
                out.append("  accelerator " + ", ".join(f"{self.layers[i].kind}:{self.layers[i].node.name}"
                                                        for i in s.layers))
        return "\n".join(out)


def _weight_bits(w: np.ndarray) -> int:
    wmax = float(np.abs(w).max()) if w.size else 0.0
    if wmax == 0.0:
        return 0
    fw = math.floor(WEIGHT_BITS - math.log2(wmax))
    while round(wmax * 2.0**fw) > 2**WEIGHT_BITS:
        fw -= 1
    return fw


def _make_layer(idx: int, node: Node, s1: dict[str, tuple[int, ...]], weight_privacy: str) -> OffloadLayer:
    w = node.params["W"].astype(np.float64)
    fw = _weight_bits(w)
    w_q = np.rint(w * 2.0**fw).astype(np.int64)
    o = w.shape[0]
    mat_q = w_q.reshape(o, -1).astype(np.float64)
    k = mat_q.shape[1]
    limit = MAX_INNER_FULL if weight_privacy == "shares" else MAX_INNER_SMALL
    if k >= limit:
        raise OffloadModelError(f"layer {node.name!r}: inner dimension {k} is too long for exact float64 field "
                                f"arithmetic with weight privacy {weight_privacy!r} (must be < {limit})")
    return OffloadLayer(
        index=idx, node=node, fw=fw, w_q=w_q, inner=k, out_features=o,
        l1_q=float(np.abs(mat_q).sum(1).max()), l2_q=float(np.sqrt((mat_q**2).sum(1)).max()),
        l1_w=float(np.abs(w.reshape(o, -1)).sum(1).max()),
        in_shape1=s1[node.inputs[0]], out_shape1=s1[node.output])


def compile_offload(graph: Graph, weight_privacy: str = "none") -> OffloadPlan:
    """Split ``graph`` into enclave segments and accelerator rounds (see module docstring)."""
    graph.require_ops(OFFLOAD_OPS, where="offload mode")
    if weight_privacy not in WEIGHT_PRIVACY:
        raise OffloadModelError(f"unknown weight privacy option {weight_privacy!r}; choose one of {WEIGHT_PRIVACY}")
    s1, s2 = trace_shapes(graph, 1), trace_shapes(graph, 2)
    for name, shp in s1.items():  # the batch must be the leading, sample-major axis of every tensor
        if not shp or s2[name] != (2 * shp[0], *shp[1:]):
            raise OffloadModelError(f"tensor {name!r} (shape {shp} at batch 1, {s2[name]} at batch 2) does not keep the "
                                    "batch as its leading axis; offload mode needs sample-major tensors")
    avail: dict[str, int] = {spec.name: 0 for spec in graph.inputs}
    stage: list[int] = []
    layers: list[OffloadLayer] = []
    node_layer: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        t = max((avail[x] for x in node.inputs), default=0)
        stage.append(t)
        if node.op in ACCELERATED_OPS:
            node_layer[i] = len(layers)
            layers.append(_make_layer(len(layers), node, s1, weight_privacy))
            avail[node.output] = t + 1
        else:
            avail[node.output] = t
    steps: list[Step] = []
    for t in range(max(stage, default=0) + 1):
        enc = [n for i, n in enumerate(graph.nodes) if stage[i] == t and i not in node_layer]
        acc = [node_layer[i] for i in range(len(graph.nodes)) if stage[i] == t and i in node_layer]
        if enc:
            steps.append(Step("enclave", nodes=enc))
        if acc:
            steps.append(Step("accelerator", layers=acc))
    h = hashlib.sha256(graph.name.encode())
    for lay in layers:
        h.update(lay.node.name.encode() + lay.w_q.tobytes() + repr(lay.in_shape1).encode())
    return OffloadPlan(graph, layers, steps, weight_privacy, h.hexdigest()[:16])

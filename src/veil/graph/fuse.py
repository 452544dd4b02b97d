"""Recognise decomposed operators in an imported graph and replace each by one op.

Exporters (torch.onnx, Hugging Face) spell LayerNorm, RMSNorm, GELU and SiLU as chains of
element-wise ops and reductions. Matching their exact spelling is brittle (operand order, ``Div``
vs ``Mul`` by the reciprocal, ``Pow`` vs ``Mul``), so recognition is by *value*: from a tensor ``x``,
collect the region of element-wise ops with scalar constants (and last-axis means) that reads only
``x``, evaluate every tensor of the region on test inputs, and replace the largest sub-region whose
output equals a known function of ``x`` (and whose intermediates are used nowhere else):

- ``gelu``, ``gelu_tanh``, ``silu`` (unary regions, tested on [-8, 8]);
- ``layernorm`` / ``rmsnorm`` (regions with a mean over the last axis, tested on random rows), then
  the per-channel ``mul_const`` (gamma) and, for LayerNorm, ``add_const`` (beta) that follow;
- ``sqrt`` followed by ``reciprocal`` becomes ``rsqrt``;
- ``softmax(add_const(x))`` becomes a softmax with a public additive ``mask`` (entries at or below
  -1e4 become ``-inf``), dropping a preceding 0/1 ``mul_const`` whose zeros the mask excludes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from veil.graph.ir import Graph, Node
from veil.plain import kernels as K

__all__ = ["fuse_patterns", "MASKED"]

MASKED = -1e4  #: additive mask entries at or below this exclude their position from a softmax

_ELEMENTWISE = {"mul_const", "add_const", "erf", "tanh", "sigmoid", "mul", "add", "sub", "sqrt", "reciprocal", "rsqrt"}
_MAX_REGION = 48


def fuse_patterns(graph: Graph, shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Apply every recogniser (see the module docstring); returns a new graph. ``shapes`` (tensor ->
    shape, as the importer knows them) saves tracing the graph to find the normalised axis."""
    g = Graph(list(graph.nodes), list(graph.inputs), list(graph.outputs), graph.name, dict(graph.meta))
    _fuse_rsqrt(g)
    _fuse_regions(g, unary=True)
    _fuse_regions(g, unary=False, shapes=shapes)
    _fuse_softmax_mask(g)
    _prune(g)
    return g


# ---------------------------------------------------------------------------------------------
def _consumers(g: Graph) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for t in set(n.inputs):
            out.setdefault(t, []).append(i)
    return out


def _producer(g: Graph) -> dict[str, int]:
    return {n.output: i for i, n in enumerate(g.nodes)}


def _only_use(g: Graph, cons: dict[str, list[int]], t: str) -> int | None:
    users = cons.get(t, [])
    if len(users) != 1 or t in g.outputs:
        return None
    return users[0]


def _scalar_ok(n: Node) -> bool:
    return all(p.size == 1 for p in n.params.values())


def _fuse_rsqrt(g: Graph) -> None:
    cons = _consumers(g)
    drop: set[int] = set()
    for i, n in enumerate(g.nodes):
        if n.op != "sqrt":
            continue
        j = _only_use(g, cons, n.output)
        if j is not None and g.nodes[j].op == "reciprocal":
            r = g.nodes[j]
            g.nodes[j] = Node(r.name, "rsqrt", n.inputs, r.output)
            drop.add(i)
    g.nodes[:] = [n for i, n in enumerate(g.nodes) if i not in drop]


def _run(n: Node, xs: list[np.ndarray]) -> np.ndarray:
    from veil.plain.executor import run_node

    return run_node(n, xs)


def _region(g: Graph, cons: dict[str, list[int]], start: int, x: str, allowed: Callable[[Node], bool]) -> list[int]:
    """Indices (topological) of the ops reachable from ``x`` through allowed ops that read only the region."""
    have, heap = {x}, [j for j in cons.get(x, []) if j >= start]
    region: list[int] = []
    seen: set[int] = set()
    heapq.heapify(heap)
    while heap and len(region) < _MAX_REGION:
        j = heapq.heappop(heap)
        if j in seen:
            continue
        seen.add(j)
        n = g.nodes[j]
        if allowed(n) and all(i in have for i in n.inputs):
            region.append(j)
            have.add(n.output)
            for k in cons.get(n.output, []):
                heapq.heappush(heap, k)
    return region


def _ancestors(g: Graph, region: list[int], top: int, x: str) -> list[int]:
    by_out = {g.nodes[j].output: j for j in region}
    keep, todo = {top}, [top]
    while todo:
        for t in g.nodes[todo.pop()].inputs:
            j = by_out.get(t)
            if j is not None and j not in keep:
                keep.add(j)
                todo.append(j)
    return sorted(keep)


def _closed(g: Graph, cons: dict[str, list[int]], anc: list[int], top: int) -> bool:
    inside = set(anc)
    for j in anc:
        if j == top:
            continue
        out = g.nodes[j].output
        if out in g.outputs or any(k not in inside for k in cons.get(out, [])):
            return False
    return True


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {"gelu": K.gelu, "gelu_tanh": K.gelu_tanh, "silu": K.silu}


def _ln(x: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _fuse_regions(g: Graph, unary: bool, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    if shapes is None and not unary:
        from veil.plain.executor import trace_shapes

        try:
            shapes = trace_shapes(g, 1)
        except Exception:  # a graph the plain executor cannot trace is left as it is
            return
    shapes = shapes or {}
    done: set[str] = set()  # roots with nothing (left) to fuse: never scanned again
    changed = True
    while changed:
        changed = False
        cons = _consumers(g)
        prod = _producer(g)
        roots = [s.name for s in g.inputs] + [n.output for n in g.nodes]
        for x in roots:
            if x in done:
                continue
            done.add(x)  # removed again below if a fusion happened (x may start another pattern)
            start = prod.get(x, -1) + 1
            rank = -1  # reduce_mean allowed only over this axis + 1 (none for unary regions)
            if unary:
                test = np.linspace(-8.0, 8.0, 321)
            else:
                if x not in shapes or len(shapes[x]) < 1 or shapes[x][-1] < 2:
                    continue
                rank = len(shapes[x])
                rng = np.random.default_rng(0)
                test = rng.standard_normal((2,) * (rank - 1) + (shapes[x][-1],)) * 1.7 + 0.6
            def allowed(n: Node, rank: int = rank) -> bool:
                if n.op == "reduce_mean":
                    return tuple(n.attrs["axes"]) == (rank - 1,) and bool(n.attrs["keepdims"])
                return n.op in _ELEMENTWISE and _scalar_ok(n)

            region = _region(g, cons, start, x, allowed)
            if len(region) < 2 or (not unary and not any(g.nodes[j].op == "reduce_mean" for j in region)):
                continue
            env = {x: test}
            try:
                with np.errstate(all="ignore"):
                    for j in region:
                        n = g.nodes[j]
                        env[n.output] = _run(n, [env[i] for i in n.inputs])
            except Exception:
                continue
            for top in reversed(region):
                anc = _ancestors(g, region, top, x)
                if len(anc) < 2 or not _closed(g, cons, anc, top):
                    continue
                got = env[g.nodes[top].output]
                if got.shape != test.shape or not np.all(np.isfinite(got)):
                    continue
                new = _match_unary(g, top, x, got, test) if unary else _match_norm(g, cons, anc, top, x, got, test)
                if new is None:
                    continue
                node, absorbed = new
                _replace(g, sorted(set(anc) | absorbed), node)
                done.discard(x)
                changed = True
                break
            if changed:
                break


def _match_unary(g: Graph, top: int, x: str, got: np.ndarray, test: np.ndarray) -> tuple[Node, set[int]] | None:
    for op, f in _UNARY.items():
        want = f(test)
        if np.max(np.abs(got - want)) <= 2e-5 * max(1.0, float(np.max(np.abs(want)))):
            t = g.nodes[top]
            return Node(t.name, op, (x,), t.output), set()
    return None


def _match_norm(g: Graph, cons: dict[str, list[int]], anc: list[int], top: int, x: str, got: np.ndarray,
                test: np.ndarray) -> tuple[Node, set[int]] | None:
    if not any(g.nodes[j].op == "reduce_mean" for j in anc):
        return None
    eps_cands = sorted({float(g.nodes[j].params["c"].reshape(-1)[0]) for j in anc if g.nodes[j].op == "add_const"})
    d = test.shape[-1]
    for kind, f in (("layernorm", _ln), ("rmsnorm", _rms)):
        for eps in eps_cands:
            if eps <= 0:
                continue
            want = f(test, eps)
            if np.max(np.abs(got - want)) > 1e-4 * max(1.0, float(np.max(np.abs(want)))):
                continue
            absorbed: set[int] = set()
            out = g.nodes[top].output
            gamma, beta = np.ones(d, np.float32), np.zeros(d, np.float32)
            j = _only_use(g, cons, out)
            if j is not None and g.nodes[j].op == "mul_const" and _per_channel(g.nodes[j].params["c"], d):
                gamma = np.broadcast_to(g.nodes[j].params["c"].reshape(-1), (d,)).astype(np.float32)
                absorbed.add(j)
                out = g.nodes[j].output
                k = _only_use(g, cons, out)
                if kind == "layernorm" and k is not None and g.nodes[k].op == "add_const" and _per_channel(g.nodes[k].params["c"], d):
                    beta = np.broadcast_to(g.nodes[k].params["c"].reshape(-1), (d,)).astype(np.float32)
                    absorbed.add(k)
                    out = g.nodes[k].output
            name = g.nodes[top].name
            if kind == "layernorm":
                return Node(name, "layernorm", (x,), out, {"gamma": gamma, "beta": beta}, {"eps": eps}), absorbed
            return Node(name, "rmsnorm", (x,), out, {"gamma": gamma}, {"eps": eps}), absorbed
    return None


def _per_channel(c: np.ndarray, d: int) -> bool:
    return c.size in (1, d) and (c.ndim == 0 or (c.shape[-1] == c.size and all(s == 1 for s in c.shape[:-1])))


def _replace(g: Graph, idx: list[int], node: Node) -> None:
    """Remove the nodes at ``idx`` and put ``node`` where the last of them was."""
    last = idx[-1]
    drop = set(idx)
    out: list[Node] = []
    for i, n in enumerate(g.nodes):
        if i == last:
            out.append(node)
        elif i not in drop:
            out.append(n)
    g.nodes[:] = out


def _fuse_softmax_mask(g: Graph) -> None:
    cons = _consumers(g)
    prod = _producer(g)
    drop: set[int] = set()
    for i, n in enumerate(g.nodes):
        if n.op != "softmax":
            continue
        p = prod.get(n.inputs[0])
        if p is None or g.nodes[p].op != "add_const" or _only_use(g, cons, g.nodes[p].output) != i:
            continue
        add = g.nodes[p]
        mask = add.params["c"].astype(np.float32)
        if "mask" in n.params:
            mask = mask + n.params["mask"].astype(np.float32)
        mask = np.where(mask <= MASKED, np.float32(-np.inf), mask).astype(np.float32)
        src = add.inputs[0]
        q = prod.get(src)
        if q is not None and g.nodes[q].op == "mul_const" and _only_use(g, cons, src) == p:
            c = g.nodes[q].params["c"]
            if np.all((c == 0) | (c == 1)):
                try:
                    zeros = np.broadcast_to(c, np.broadcast_shapes(c.shape, mask.shape)) == 0
                    full = np.broadcast_to(mask, zeros.shape)
                    if np.all(full[zeros] == -np.inf):
                        mask = np.ascontiguousarray(full) if full.shape != mask.shape else mask
                        src = g.nodes[q].inputs[0]
                        drop.add(q)
                except ValueError:
                    pass
        g.nodes[i] = Node(n.name, "softmax", (src,), n.output, {"mask": mask}, dict(n.attrs))
        drop.add(p)
    g.nodes[:] = [n for i, n in enumerate(g.nodes) if i not in drop]


def _prune(g: Graph) -> None:
    """Drop nodes whose outputs no graph output depends on."""
    need = set(g.outputs)
    keep: list[Node] = []
    for n in reversed(g.nodes):
        if n.output in need:
            keep.append(n)
            need.update(n.inputs)
    g.nodes[:] = keep[::-1]

"""Convert an ONNX model into veil's :class:`~veil.graph.ir.Graph`.

Each supported ONNX operator has one converter function registered in ``_CONVERTERS``. Constant
operands (initializers and ``Constant`` nodes) become node params; BatchNormalization is folded into
a preceding Conv/Gemm when that producer has no other consumer, otherwise it becomes a per-channel
``mul_const`` + ``add_const``. ``Identity`` and ``Dropout`` vanish.

Nodes whose inputs are all constants are folded (:mod:`veil.graph.fold`), including ``Shape`` of an
activation whose shape is static except for the batch; ``constants=`` binds graph inputs to public
values (e.g. a padding mask) before folding. After conversion, :mod:`veil.graph.fuse` recognises
decomposed LayerNorm/RMSNorm, GELU (erf and tanh forms), SiLU and masked softmax.

An unsupported operator fails here, at load time, naming the node and listing what is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from veil.errors import ModelError, ModelFormatError, UnsupportedOpError
from veil.graph.fold import SYMBOLIC, fold_node
from veil.graph.fuse import fuse_patterns
from veil.graph.ir import Graph, Node, TensorSpec
from veil.graph.shapes import node_shape

__all__ = ["from_onnx", "bind_inputs", "SUPPORTED_ONNX_OPS", "ONNX_TO_IR", "onnx_ops_for"]

_ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 10: "float16"}


class _Ctx:
    """Conversion state: constants seen so far, emitted nodes, tensor renames."""

    def __init__(self) -> None:
        self.consts: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.uses: dict[str, int] = {}  # how many ONNX nodes read each tensor
        self.graph_outputs: tuple[str, ...] = ()
        self.shapes: dict[str, tuple[int, ...]] = {}  # static shapes, batch as fold.SYMBOLIC
        self.opset = 17

    def shape(self, t: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if t in self.consts:
            return tuple(self.consts[t].shape)
        for cand in (t, self.name(t)):
            if cand in self.shapes:
                return self.shapes[cand]
            if cand in self.consts:
                return tuple(self.consts[cand].shape)
        raise _unsupported(node, f"the shape of {t!r} is not static; export with static shapes (except the batch)")

    def rank(self, t: str, node: onnx.NodeProto) -> int:
        return len(self.shape(t, node))

    def name(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def const(self, t: str) -> np.ndarray | None:
        return self.consts.get(t)

    def emit(self, node: Node) -> None:
        self.nodes.append(node)
        ins = [self.consts[i].shape if i in self.consts else self.shapes.get(i) for i in node.inputs]
        if all(s is not None for s in ins):
            try:
                self.shapes[node.output] = node_shape(node, ins)  # type: ignore[arg-type]
            except (KeyError, IndexError, ValueError, TypeError):
                pass  # unknown here; a converter that needs it says so


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node: onnx.NodeProto, detail: str) -> UnsupportedOpError:
    return UnsupportedOpError(node.name or node.output[0], node.op_type, SUPPORTED_ONNX_OPS, detail=detail)


Converter = Callable[[onnx.NodeProto, _Ctx, dict[str, Any]], None]


def _split_inputs(node: onnx.NodeProto, ctx: _Ctx) -> tuple[list[str], list[np.ndarray | None]]:
    names = [ctx.name(i) for i in node.input if i]
    return names, [ctx.const(i) for i in node.input if i]


def _gemm(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    if at.get("transA", 0):
        raise _unsupported(node, "transA=1")
    w = consts[1]
    if consts[0] is not None or w is None:
        raise _unsupported(node, "Gemm needs an activation A and a constant B")
    w = w.astype(np.float32) * np.float32(at.get("alpha", 1.0))
    w = w if at.get("transB", 0) else w.T  # store as (out, in)
    b = None
    if len(consts) > 2:
        if consts[2] is None:
            raise _unsupported(node, "Gemm with a non-constant C")
        b = (consts[2].astype(np.float32) * np.float32(at.get("beta", 1.0))).reshape(-1)
        b = np.broadcast_to(b, (w.shape[0],)).copy()
    params = {"W": np.ascontiguousarray(w)}
    if b is not None:
        params["b"] = b
    ctx.emit(Node(node.name or node.output[0], "linear", (names[0],), node.output[0], params))


def _matmul(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    nm = node.name or node.output[0]
    if consts[0] is None and consts[1] is not None and consts[1].ndim == 2:
        ctx.emit(Node(nm, "linear", (names[0],), node.output[0], {"W": np.ascontiguousarray(consts[1].T.astype(np.float32))}))
    elif consts[0] is None and consts[1] is None:
        ctx.emit(Node(nm, "matmul", (names[0], names[1]), node.output[0]))
    else:
        raise _unsupported(node, "MatMul needs a 2-D constant right operand or two activations")


def _conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    w = consts[1]
    if w is None or w.ndim != 4:
        raise _unsupported(node, "Conv needs a constant 4-D weight (2-D convolution)")
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        raise _unsupported(node, f"dilations={at['dilations']}, only 1")
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _unsupported(node, "auto_pad, use explicit pads")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    params = {"W": w.astype(np.float32)}
    if len(consts) > 2 and consts[2] is not None:
        params["b"] = consts[2].astype(np.float32)
    attrs: dict[str, Any] = {"strides": tuple(at.get("strides", [1, 1])), "pads": (pads[0], pads[1], pads[2], pads[3])}
    if int(at.get("group", 1)) != 1:
        attrs["group"] = int(at["group"])
    ctx.emit(Node(node.name or node.output[0], "conv2d", (names[0],), node.output[0], params, attrs))


def _pool(kind: str) -> Converter:
    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        names, _ = _split_inputs(node, ctx)
        if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or at.get("ceil_mode", 0):
            raise _unsupported(node, "auto_pad and ceil_mode are not supported")
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            raise _unsupported(node, "dilated pooling")
        k = tuple(at["kernel_shape"])
        if len(k) != 2 or len(node.output) != 1:
            raise _unsupported(node, "only 2-D pooling with one output")
        pads = list(at.get("pads", [0, 0, 0, 0]))
        attrs: dict[str, Any] = {"kernel": k, "strides": tuple(at.get("strides", [1, 1])), "pads": tuple(pads)}
        if kind == "avgpool":
            attrs["count_include_pad"] = bool(at.get("count_include_pad", 0))
        ctx.emit(Node(node.name or node.output[0], kind, (names[0],), node.output[0], {}, attrs))

    return conv


def _simple(op: str, **fixed: Any) -> Converter:
    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        names, consts = _split_inputs(node, ctx)
        if any(c is not None for c in consts[:1]):
            raise _unsupported(node, "constant data input")
        ctx.emit(Node(node.name or node.output[0], op, (names[0],), node.output[0], {}, dict(fixed)))

    return conv


def _flatten(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    ctx.emit(Node(node.name or node.output[0], "flatten", (names[0],), node.output[0], {}, {"axis": int(at.get("axis", 1))}))


def _reshape(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    if consts[1] is None:
        raise _unsupported(node, "Reshape with a computed shape; export with a constant target shape")
    if at.get("allowzero", 0):
        raise _unsupported(node, "allowzero=1")
    shape = [int(s) for s in consts[1].reshape(-1)]
    if any(d != 0 and d % SYMBOLIC == 0 for d in shape):  # a folded shape chain that carries the batch
        try:
            src = ctx.shape(node.input[0], node)
        except UnsupportedOpError:
            src = ()
        for i, d in enumerate(shape):
            if d == SYMBOLIC and i < len(src) and src[i] == SYMBOLIC:
                shape[i] = 0
        rest = [i for i, d in enumerate(shape) if d != 0 and d % SYMBOLIC == 0]
        if len(rest) > 1 or (rest and -1 in shape):
            raise _unsupported(node, "a target shape with several batch-dependent dims")
        if rest:
            shape[rest[0]] = -1
    ctx.emit(Node(node.name or node.output[0], "reshape", (names[0],), node.output[0], {}, {"shape": tuple(shape)}))


def _transpose(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    perm = at.get("perm")
    if perm is None:
        perm = list(range(ctx.rank(node.input[0], node)))[::-1]
    ctx.emit(Node(node.name or node.output[0], "transpose", (names[0],), node.output[0], {}, {"perm": tuple(perm)}))


def _binary(kind: str) -> Converter:
    """Add/Sub/Mul/Div: two activations, or one activation and a constant."""

    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        names, consts = _split_inputs(node, ctx)
        a, b = consts
        nm, out = node.name or node.output[0], node.output[0]
        if a is not None and b is not None:  # constant folding
            f = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[kind]
            ctx.consts[out] = f(a, b)
            return
        if a is None and b is None:
            if kind == "div":  # a / b = a * (1 / b)
                ctx.emit(Node(nm + "/reciprocal", "reciprocal", (names[1],), out + "/reciprocal"))
                ctx.emit(Node(nm, "mul", (names[0], out + "/reciprocal"), out))
                return
            ctx.emit(Node(nm, kind, (names[0], names[1]), out))
            return
        x, c, c_left = (names[0], b, False) if b is not None else (names[1], a, True)
        assert c is not None
        c = c.astype(np.float32)
        if kind == "add":
            ctx.emit(Node(nm, "add_const", (x,), out, {"c": c}))
        elif kind == "mul":
            ctx.emit(Node(nm, "mul_const", (x,), out, {"c": c}))
        elif kind == "sub" and not c_left:
            ctx.emit(Node(nm, "add_const", (x,), out, {"c": -c}))
        elif kind == "sub":  # c - x
            ctx.emit(Node(nm + "/neg", "mul_const", (x,), out + "/neg", {"c": np.float32(-1.0) * np.ones((), np.float32)}))
            ctx.emit(Node(nm, "add_const", (out + "/neg",), out, {"c": c}))
        elif kind == "div" and not c_left:
            ctx.emit(Node(nm, "mul_const", (x,), out, {"c": (np.float32(1.0) / c).astype(np.float32)}))
        elif c.size == 1 and float(c.reshape(-1)[0]) == 1.0:  # 1 / x
            ctx.emit(Node(nm, "reciprocal", (x,), out))
        else:  # c / x
            ctx.emit(Node(nm + "/reciprocal", "reciprocal", (x,), out + "/reciprocal"))
            ctx.emit(Node(nm, "mul_const", (out + "/reciprocal",), out, {"c": c}))

    return conv


def _batchnorm(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    gamma, beta, mean, var = consts[1:5]
    if any(c is None for c in (gamma, beta, mean, var)) or len(node.output) != 1:
        raise _unsupported(node, "BatchNormalization in inference mode with constant statistics only")
    assert gamma is not None and beta is not None and mean is not None and var is not None
    scale = (gamma / np.sqrt(var + at.get("epsilon", 1e-5))).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    src = names[0]
    prod = next((n for n in reversed(ctx.nodes) if n.output == src), None)
    only_consumer = (
        prod is not None and prod.op in ("conv2d", "linear") and ctx.uses.get(node.input[0], 0) == 1
        and node.input[0] not in ctx.graph_outputs
    )
    if only_consumer and prod is not None:
        w = prod.params["W"]
        prod.params["W"] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b = prod.params.get("b", np.zeros(w.shape[0], np.float32))
        prod.params["b"] = (b * scale + shift).astype(np.float32)
        ctx.alias[node.output[0]] = src
        return
    nm = node.name or node.output[0]
    tail = (1,) * (ctx.rank(node.input[0], node) - 2)  # channels are axis 1: (N, C), (N, C, L), (N, C, H, W)
    ctx.emit(Node(nm + "/scale", "mul_const", (src,), nm + "/scaled", {"c": scale.reshape((-1,) + tail)}))
    ctx.emit(Node(nm, "add_const", (nm + "/scaled",), node.output[0], {"c": shift.reshape((-1,) + tail)}))


def _softmax(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    r = ctx.rank(node.input[0], node)
    axis = int(at.get("axis", -1 if ctx.opset >= 13 else 1)) % r
    if ctx.opset < 13 and axis != r - 1:
        raise _unsupported(node, "Softmax before opset 13 over other than the last axis")
    ctx.emit(Node(node.name or node.output[0], "softmax", (names[0],), node.output[0], {}, {"axis": axis}))


def _argmax(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    if at.get("select_last_index", 0):
        raise _unsupported(node, "select_last_index=1")
    attrs = {"axis": int(at.get("axis", 0)), "keepdims": bool(at.get("keepdims", 1))}
    ctx.emit(Node(node.name or node.output[0], "argmax", (names[0],), node.output[0], {}, attrs))


def _layernorm(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    axis = int(at.get("axis", -1))
    if axis not in (-1, ctx.rank(node.input[0], node) - 1) or consts[1] is None or len(node.output) != 1:
        raise _unsupported(node, "LayerNormalization over the last axis with a constant scale only")
    assert consts[1] is not None
    d = ctx.shape(node.input[0], node)[-1]
    beta = consts[2] if len(consts) > 2 and consts[2] is not None else np.zeros(d, np.float32)
    params = {"gamma": np.broadcast_to(consts[1], (d,)).astype(np.float32),
              "beta": np.broadcast_to(beta, (d,)).astype(np.float32)}
    ctx.emit(Node(node.name or node.output[0], "layernorm", (names[0],), node.output[0], params, {"eps": float(at.get("epsilon", 1e-5))}))


def _gelu(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    approx = at.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx not in ("none", "tanh"):
        raise _unsupported(node, f"Gelu approximate={approx!r}")
    ctx.emit(Node(node.name or node.output[0], "gelu" if approx == "none" else "gelu_tanh", (names[0],), node.output[0]))


def _axes_of(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any], rank: int, input_index: int = 1) -> tuple[int, ...] | None:
    """Axes from the attribute (older opsets) or the constant second input, made non-negative."""
    axes = at.get("axes")
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        c = ctx.const(node.input[input_index])
        if c is None:
            raise _unsupported(node, "axes computed at run time")
        axes = c.reshape(-1).tolist()
    if axes is None:
        return None
    return tuple(sorted(int(a) % rank for a in axes))


def _unary(op: str) -> Converter:
    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        ctx.emit(Node(node.name or node.output[0], op, (ctx.name(node.input[0]),), node.output[0]))

    return conv


def _neg(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    ctx.emit(Node(node.name or node.output[0], "mul_const", (ctx.name(node.input[0]),), node.output[0],
                  {"c": np.array(-1.0, np.float32)}))


def _pow(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    e = consts[1]
    if consts[0] is not None or e is None or e.size != 1:
        raise _unsupported(node, "Pow of an activation by a constant scalar exponent only")
    p, x, nm, out = float(e.reshape(-1)[0]), names[0], node.name or node.output[0], node.output[0]
    if p == 1.0:
        ctx.alias[out] = x
    elif p == 2.0:
        ctx.emit(Node(nm, "mul", (x, x), out))
    elif p == 3.0:
        ctx.emit(Node(nm + "/sq", "mul", (x, x), out + "/sq"))
        ctx.emit(Node(nm, "mul", (out + "/sq", x), out))
    elif p in (0.5, -0.5, -1.0):
        ctx.emit(Node(nm, {0.5: "sqrt", -0.5: "rsqrt", -1.0: "reciprocal"}[p], (x,), out))
    else:
        raise _unsupported(node, f"exponent {p:g} (supported: 1, 2, 3, 0.5, -0.5, -1)")


def _reduce(op: str) -> Converter:
    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        r = ctx.rank(node.input[0], node)
        axes = _axes_of(node, ctx, at, r)
        if axes is None or not axes:
            if at.get("noop_with_empty_axes", 0):
                ctx.alias[node.output[0]] = ctx.name(node.input[0])
                return
            axes = tuple(range(r))
        attrs = {"axes": axes, "keepdims": bool(at.get("keepdims", 1))}
        ctx.emit(Node(node.name or node.output[0], op, (ctx.name(node.input[0]),), node.output[0], {}, attrs))

    return conv


def _squeeze_like(op: str) -> Converter:
    def conv(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
        r = ctx.rank(node.input[0], node)
        if op == "unsqueeze":
            raw = at.get("axes")
            if raw is None:
                c = ctx.const(node.input[1]) if len(node.input) > 1 else None
                if c is None:
                    raise _unsupported(node, "Unsqueeze needs constant axes")
                raw = c.reshape(-1).tolist()
            axes = tuple(sorted(int(a) % (r + len(raw)) for a in raw))
        else:
            got = _axes_of(node, ctx, at, r)
            axes = got if got is not None else tuple(i for i, d in enumerate(ctx.shape(node.input[0], node)) if d == 1)
        ctx.emit(Node(node.name or node.output[0], op, (ctx.name(node.input[0]),), node.output[0], {}, {"axes": axes}))

    return conv


def _concat(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    if any(c is not None for c in consts):
        raise _unsupported(node, "Concat of activations with constants")
    axis = int(at["axis"]) % ctx.rank(node.input[0], node)
    ctx.emit(Node(node.name or node.output[0], "concat", tuple(names), node.output[0], {}, {"axis": axis}))


def _slice_attrs(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> dict[str, Any]:
    shape = ctx.shape(node.input[0], node)
    if ctx.opset < 10:
        starts, ends = list(at["starts"]), list(at["ends"])
        axes = list(at.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = [ctx.const(i) if i else None for i in node.input[1:]] + [None] * 4
        named = [bool(i) for i in node.input[1:]] + [False] * 4
        if vals[0] is None or vals[1] is None or any(n and v is None for n, v in zip(named[2:4], vals[2:4], strict=True)):
            raise _unsupported(node, "Slice bounds, axes or steps computed at run time")
        starts, ends = vals[0].reshape(-1).tolist(), vals[1].reshape(-1).tolist()
        axes = vals[2].reshape(-1).tolist() if vals[2] is not None else list(range(len(starts)))
        steps = vals[3].reshape(-1).tolist() if vals[3] is not None else [1] * len(starts)
    axes = [int(a) % len(shape) for a in axes]
    lim = np.iinfo(np.int64).max // 2
    clamp = [int(max(min(v, lim), -lim)) for v in starts], [int(max(min(v, lim), -lim)) for v in ends]
    for a, s0 in zip(axes, clamp[0], strict=True):
        if shape[a] == SYMBOLIC and s0 != 0:
            raise _unsupported(node, "slicing the batch dim")
    return {"starts": tuple(clamp[0]), "ends": tuple(clamp[1]), "axes": tuple(axes), "steps": tuple(int(v) for v in steps)}


def _slice(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    ctx.emit(Node(node.name or node.output[0], "slice", (ctx.name(node.input[0]),), node.output[0], {},
                  _slice_attrs(node, ctx, at)))


def _split(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    shape = ctx.shape(node.input[0], node)
    axis = int(at.get("axis", 0)) % len(shape)
    n = len(node.output)
    sizes = at.get("split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        c = ctx.const(node.input[1])
        if c is None:
            raise _unsupported(node, "split sizes computed at run time")
        sizes = c.reshape(-1).tolist()
    if sizes is None:
        if shape[axis] == SYMBOLIC:
            raise _unsupported(node, "splitting the batch dim")
        step = -(-shape[axis] // n)
        sizes = [min(step, shape[axis] - i * step) for i in range(n)]
    start = 0
    for out, size in zip(node.output, sizes, strict=True):
        attrs = {"starts": (int(start),), "ends": (int(start + size),), "axes": (axis,), "steps": (1,)}
        ctx.emit(Node(f"{node.name or node.output[0]}/{out}", "slice", (ctx.name(node.input[0]),), out, {}, attrs))
        start += size


def _gather(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    data, idx = consts
    nm, out = node.name or node.output[0], node.output[0]
    axis = int(at.get("axis", 0))
    if data is not None and idx is None:  # a table looked up by the user's ids
        if axis != 0 or data.ndim != 2:
            raise _unsupported(node, "Gather from a constant table needs a 2-D table and axis 0 (an embedding)")
        ctx.emit(Node(nm, "embedding", (names[1],), out, {"table": data.astype(np.float32)}))
        return
    if idx is None:
        raise _unsupported(node, "Gather of an activation by computed indices")
    shape = ctx.shape(node.input[0], node)
    axis %= len(shape)
    if shape[axis] == SYMBOLIC:
        raise _unsupported(node, "Gather along the batch dim")
    indices = np.asarray(idx, np.int64) % shape[axis]
    ctx.emit(Node(nm, "gather", (names[0],), out, {}, {"axis": axis, "indices": indices}))


def _where(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    """Where with a constant condition: ``a*c + b*(1-c)`` with public 0/1 constants (no new op)."""
    names, consts = _split_inputs(node, ctx)
    cond, a, b = consts
    if cond is None:
        raise _unsupported(node, "Where with a condition computed from activations (only a public, constant condition)")
    nm, out = node.name or node.output[0], node.output[0]
    c = cond.astype(bool)
    if a is None and b is None:
        ctx.emit(Node(nm + "/a", "mul_const", (names[1],), out + "/a", {"c": c.astype(np.float32)}))
        ctx.emit(Node(nm + "/b", "mul_const", (names[2],), out + "/b", {"c": (~c).astype(np.float32)}))
        ctx.emit(Node(nm, "add", (out + "/a", out + "/b"), out))
        return
    x, keep, other = (names[1], c, b) if a is None else (names[2], ~c, a)
    assert other is not None
    fill = np.where(keep, np.float32(0), other.astype(np.float32)).astype(np.float32)
    ctx.emit(Node(nm + "/keep", "mul_const", (x,), out + "/keep", {"c": keep.astype(np.float32)}))
    ctx.emit(Node(nm, "add_const", (out + "/keep",), out, {"c": fill}))


def _expand(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    shape = ctx.shape(node.input[0], node)
    target = ctx.const(node.input[1])
    if target is None:
        raise _unsupported(node, "Expand to a computed shape")
    try:
        full = np.broadcast_shapes(shape, tuple(int(d) for d in target.reshape(-1)))
    except ValueError:
        raise _unsupported(node, f"Expand of {shape} to {target.tolist()}") from None
    if tuple(full) == tuple(shape):
        ctx.alias[node.output[0]] = ctx.name(node.input[0])
        return
    # broadcasting: x + zeros, the zeros only as large as the new or stretched axes (e.g. GQA's repeat_kv)
    pad = (1,) * (len(full) - len(shape)) + tuple(shape)
    zshape = tuple(f if p == 1 else 1 for f, p in zip(full, pad, strict=True))
    if SYMBOLIC in zshape:
        raise _unsupported(node, "Expand along the batch dim")
    ctx.emit(Node(node.name or node.output[0], "add_const", (ctx.name(node.input[0]),), node.output[0],
                  {"c": np.zeros(zshape, np.float32)}))


def _cast(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    to = int(at["to"])
    if to not in (1, 10, 11, 16, 6, 7):  # floats and int32/int64 (token ids)
        raise _unsupported(node, f"Cast of an activation to ONNX type {to}")
    ctx.alias[node.output[0]] = ctx.name(node.input[0])


def _rmsnorm(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    shape = ctx.shape(node.input[0], node)
    axis = int(at.get("axis", -1))
    if axis not in (-1, len(shape) - 1) or consts[1] is None or len(node.output) != 1:
        raise _unsupported(node, "RMS normalisation over the last axis with a constant scale only")
    gamma = np.broadcast_to(consts[1], (shape[-1],)).astype(np.float32)
    ctx.emit(Node(node.name or node.output[0], "rmsnorm", (names[0],), node.output[0], {"gamma": gamma},
                  {"eps": float(at.get("epsilon", 1e-5))}))


def _constant(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    if "value" in at:
        ctx.consts[node.output[0]] = numpy_helper.to_array(at["value"])
        return
    for key, dt in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                    ("value_ints", np.int64)):
        if key in at:
            ctx.consts[node.output[0]] = np.asarray(at[key], dt)
            return
    raise _unsupported(node, "Constant without a tensor value")


def _shape(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    shape = np.array(ctx.shape(node.input[0], node), np.int64)
    r = len(shape)
    start, end = int(at.get("start", 0)), int(at.get("end", r))
    ctx.consts[node.output[0]] = shape[start:end]


def _size(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    ctx.consts[node.output[0]] = np.array(int(np.prod(ctx.shape(node.input[0], node), dtype=np.int64)), np.int64)


def _identity(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    src = node.input[0]
    if src in ctx.consts:
        ctx.consts[node.output[0]] = ctx.consts[src]
    else:
        ctx.alias[node.output[0]] = ctx.name(src)


_CONVERTERS: dict[str, Converter] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "Relu": _simple("relu"),
    "Tanh": _simple("tanh"),
    "Erf": _simple("erf"),
    "Sigmoid": _simple("sigmoid"),
    "Sqrt": _unary("sqrt"),
    "Reciprocal": _unary("reciprocal"),
    "Neg": _neg,
    "Pow": _pow,
    "Gelu": _gelu,
    "ReduceMean": _reduce("reduce_mean"),
    "ReduceSum": _reduce("reduce_sum"),
    "Unsqueeze": _squeeze_like("unsqueeze"),
    "Squeeze": _squeeze_like("squeeze"),
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Gather": _gather,
    "Where": _where,
    "Expand": _expand,
    "Cast": _cast,
    "Shape": _shape,
    "Size": _size,
    "RMSNormalization": _rmsnorm,
    "SimplifiedLayerNormalization": _rmsnorm,
    "MaxPool": _pool("maxpool"),
    "AveragePool": _pool("avgpool"),
    "GlobalAveragePool": _simple("global_avgpool"),
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Add": _binary("add"),
    "Sub": _binary("sub"),
    "Mul": _binary("mul"),
    "Div": _binary("div"),
    "Softmax": _softmax,
    "ArgMax": _argmax,
    "Constant": _constant,
    "Identity": _identity,
    "Dropout": _identity,
}
SUPPORTED_ONNX_OPS: tuple[str, ...] = tuple(sorted(_CONVERTERS))
_ORT_CONTRIB = ("SimplifiedLayerNormalization",)  # onnxruntime operators in the default domain

#: the veil ops each ONNX operator may become (on activations; constant inputs fold away).
#: Patterns recognised after conversion (GELU, SiLU, LayerNorm and RMSNorm spelt out) are not listed.
ONNX_TO_IR: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "Gemm": {"linear"}, "MatMul": {"linear", "matmul"}, "Conv": {"conv2d"}, "Relu": {"relu"}, "Tanh": {"tanh"},
    "Erf": {"erf"}, "Sigmoid": {"sigmoid"}, "Sqrt": {"sqrt"}, "Reciprocal": {"reciprocal"}, "Neg": {"mul_const"},
    "Pow": {"mul", "sqrt", "rsqrt", "reciprocal"}, "Gelu": {"gelu", "gelu_tanh"}, "ReduceMean": {"reduce_mean"},
    "ReduceSum": {"reduce_sum"}, "Unsqueeze": {"unsqueeze"}, "Squeeze": {"squeeze"}, "Concat": {"concat"},
    "Slice": {"slice"}, "Split": {"slice"}, "Gather": {"gather", "embedding"}, "Where": {"mul_const", "add_const", "add"},
    "Expand": set(), "Cast": set(), "Shape": set(), "Size": set(), "RMSNormalization": {"rmsnorm"},
    "SimplifiedLayerNormalization": {"rmsnorm"}, "MaxPool": {"maxpool"}, "AveragePool": {"avgpool"},
    "GlobalAveragePool": {"global_avgpool"}, "BatchNormalization": {"mul_const", "add_const"},
    "LayerNormalization": {"layernorm"}, "Flatten": {"flatten"}, "Reshape": {"reshape"}, "Transpose": {"transpose"},
    "Add": {"add", "add_const"}, "Sub": {"sub", "add_const", "mul_const"}, "Mul": {"mul", "mul_const"},
    "Div": {"mul_const", "reciprocal", "mul"}, "Softmax": {"softmax"}, "ArgMax": {"argmax"}, "Constant": set(),
    "Identity": set(), "Dropout": set(),
}.items()}


def onnx_ops_for(ir_ops: Iterable[str]) -> tuple[str, ...]:
    """The ONNX operators a mode running ``ir_ops`` accepts (at least one of their forms runs)."""
    have = set(ir_ops)
    return tuple(sorted(k for k, v in ONNX_TO_IR.items() if not v or v & have))


def _load_proto(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        path = Path(model)
        if not path.is_file():
            raise ModelFormatError(f"model file {str(path)!r} does not exist")
        return onnx.load(str(path))
    except ModelFormatError:
        raise
    except Exception as e:  # onnx raises DecodeError and friends
        raise ModelFormatError(f"could not parse the model as ONNX ({type(e).__name__}); expected an .onnx protobuf file") from None


def from_onnx(model: str | Path | bytes | onnx.ModelProto, name: str | None = None,
              constants: dict[str, np.ndarray] | None = None, fuse: bool = True,
              supported: Iterable[str] | None = None, where: str = "veil") -> Graph:
    """Convert an ONNX model (path, bytes or ``ModelProto``) into a veil :class:`Graph`.

    ``supported`` (a mode's veil ops, e.g. ``MPC_OPS``) checks the graph for that mode (``where``
    names it): an operator it cannot run is refused here, and the error lists what that mode runs.

    ``constants`` binds graph inputs to public values (e.g. ``{"attention_mask": m}``): they are
    folded into the graph and are no longer inputs. ``fuse=False`` keeps decomposed patterns as they
    are (for debugging the recognisers).
    """
    proto = _load_proto(model)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        # onnxruntime's operators in the default domain (optimised exports) are not in onnx's registry
        if not any(first.startswith(f"No Op registered for {op} ") for op in _ORT_CONTRIB):
            raise ModelFormatError(f"the ONNX model does not pass onnx.checker: {first[:200]}") from None
    g = proto.graph
    ctx = _Ctx()
    ctx.opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=17)
    ctx.graph_outputs = tuple(o.name for o in g.output)
    for node in g.node:
        for i in node.input:
            ctx.uses[i] = ctx.uses.get(i, 0) + 1
    for init in g.initializer:
        ctx.consts[init.name] = numpy_helper.to_array(init)
    bound = dict(constants or {})
    unknown = [k for k in bound if k not in {vi.name for vi in g.input}]
    if unknown:
        raise ModelError(f"constants= names {unknown} that are not inputs of the model; inputs: {[vi.name for vi in g.input]}")
    for k, v in bound.items():
        ctx.consts[k] = np.asarray(v)
    inputs = []
    for vi in g.input:
        if vi.name in ctx.consts:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        inputs.append(TensorSpec(vi.name, dims, _ONNX_DTYPES.get(tt.elem_type, f"onnx-type-{tt.elem_type}")))
        ctx.shapes[vi.name] = tuple(SYMBOLIC if d is None else int(d) for d in dims)
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(node.name or node.output[0], f"{node.domain}.{node.op_type}", SUPPORTED_ONNX_OPS)
        ins = [i for i in node.input if i]
        if ins and node.op_type not in ("Shape", "Size") and all(i in ctx.consts for i in ins):
            vals = fold_node(node, [ctx.consts.get(i) if i else None for i in node.input], ctx.opset)
            for o, v in zip(node.output, vals, strict=False):
                if o:
                    ctx.consts[o] = v
            continue
        conv = _CONVERTERS.get(node.op_type)
        if conv is None:
            listed = SUPPORTED_ONNX_OPS if supported is None else onnx_ops_for(supported)
            raise UnsupportedOpError(node.name or node.output[0], node.op_type, listed, where=where)
        conv(node, ctx, _attrs(node))
    const_out = [o.name for o in g.output if o.name in ctx.consts]
    if const_out:
        raise ModelError(f"outputs {const_out} do not depend on any input; expected a model computed from its inputs")
    outputs = [ctx.name(o.name) for o in g.output]
    graph = Graph(ctx.nodes, inputs, outputs, name=name or g.name or "model")
    graph.meta["opset"] = ctx.opset
    if fuse:
        graph = fuse_patterns(graph, ctx.shapes)
    if supported is not None:
        graph.require_ops(supported, where=where)
    return graph


def bind_inputs(model: str | Path | bytes | onnx.ModelProto, constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the ONNX model whose inputs named in ``constants`` are initializers with those
    (public) values: what ``from_onnx(model, constants=...)`` imports, as a file another process loads."""
    proto = _load_proto(model)
    names = {vi.name for vi in proto.graph.input}
    unknown = [k for k in constants if k not in names]
    if unknown:
        raise ModelError(f"cannot bind {unknown}: not inputs of the model; inputs: {sorted(names)}")
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    keep = [vi for vi in m.graph.input if vi.name not in constants]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for k, v in constants.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    return m

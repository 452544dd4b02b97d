"""Convert an ONNX model into veil's :class:`~veil.graph.ir.Graph`.

Each supported ONNX operator has one converter function registered in ``_CONVERTERS``. Constant
operands (initializers and ``Constant`` nodes) become node params; BatchNormalization is folded into
a preceding Conv/Gemm when that producer has no other consumer, otherwise it becomes a per-channel
``mul_const`` + ``add_const``. ``Identity`` and ``Dropout`` vanish.

An unsupported operator fails here, at load time, naming the node and listing what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from veil.errors import ModelFormatError, UnsupportedOpError
from veil.graph.ir import Graph, Node, TensorSpec

__all__ = ["from_onnx", "SUPPORTED_ONNX_OPS"]

_ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 10: "float16"}


class _Ctx:
    """Conversion state: constants seen so far, emitted nodes, tensor renames."""

    def __init__(self) -> None:
        self.consts: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.uses: dict[str, int] = {}  # how many ONNX nodes read each tensor
        self.graph_outputs: tuple[str, ...] = ()

    def name(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def const(self, t: str) -> np.ndarray | None:
        return self.consts.get(t)

    def emit(self, node: Node) -> None:
        self.nodes.append(node)


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
    if at.get("group", 1) != 1:
        raise _unsupported(node, f"group={at['group']}, only group=1")
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        raise _unsupported(node, f"dilations={at['dilations']}, only 1")
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _unsupported(node, "auto_pad, use explicit pads")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    params = {"W": w.astype(np.float32)}
    if len(consts) > 2 and consts[2] is not None:
        params["b"] = consts[2].astype(np.float32)
    attrs = {"strides": tuple(at.get("strides", [1, 1])), "pads": (pads[0], pads[1], pads[2], pads[3])}
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
    shape = tuple(int(s) for s in consts[1].reshape(-1))
    ctx.emit(Node(node.name or node.output[0], "reshape", (names[0],), node.output[0], {}, {"shape": shape}))


def _transpose(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    perm = at.get("perm")
    if perm is None:
        raise _unsupported(node, "Transpose without perm")
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
            if kind == "div":
                raise _unsupported(node, "Div of two activations (only division by a constant)")
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
        else:
            raise _unsupported(node, "division by an activation")

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
    ctx.emit(Node(nm + "/scale", "mul_const", (src,), nm + "/scaled", {"c": scale.reshape(-1, 1, 1)}))
    ctx.emit(Node(nm, "add_const", (nm + "/scaled",), node.output[0], {"c": shift.reshape(-1, 1, 1)}))


def _softmax(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    ctx.emit(Node(node.name or node.output[0], "softmax", (names[0],), node.output[0], {}, {"axis": int(at.get("axis", -1))}))


def _argmax(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    if at.get("select_last_index", 0):
        raise _unsupported(node, "select_last_index=1")
    attrs = {"axis": int(at.get("axis", 0)), "keepdims": bool(at.get("keepdims", 1))}
    ctx.emit(Node(node.name or node.output[0], "argmax", (names[0],), node.output[0], {}, attrs))


def _layernorm(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, consts = _split_inputs(node, ctx)
    if int(at.get("axis", -1)) != -1 or consts[1] is None or len(node.output) != 1:
        raise _unsupported(node, "LayerNormalization over the last axis with a constant scale only")
    assert consts[1] is not None
    d = consts[1].shape[-1]
    beta = consts[2] if len(consts) > 2 and consts[2] is not None else np.zeros(d, np.float32)
    params = {"gamma": consts[1].astype(np.float32), "beta": beta.astype(np.float32)}
    ctx.emit(Node(node.name or node.output[0], "layernorm", (names[0],), node.output[0], params, {"eps": float(at.get("epsilon", 1e-5))}))


def _gelu(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    names, _ = _split_inputs(node, ctx)
    if at.get("approximate", b"none") not in (b"none", "none"):
        raise _unsupported(node, "tanh-approximated Gelu")
    ctx.emit(Node(node.name or node.output[0], "gelu", (names[0],), node.output[0]))


def _constant(node: onnx.NodeProto, ctx: _Ctx, at: dict[str, Any]) -> None:
    if "value" not in at:
        raise _unsupported(node, "Constant without a tensor value")
    ctx.consts[node.output[0]] = numpy_helper.to_array(at["value"])


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
    "Gelu": _gelu,
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


def from_onnx(model: str | Path | bytes | onnx.ModelProto, name: str | None = None) -> Graph:
    """Convert an ONNX model (path, bytes or ``ModelProto``) into a veil :class:`Graph`."""
    proto = _load_proto(model)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelFormatError(f"the ONNX model does not pass onnx.checker: {str(e).splitlines()[0][:200]}") from None
    g = proto.graph
    ctx = _Ctx()
    ctx.graph_outputs = tuple(o.name for o in g.output)
    for node in g.node:
        for i in node.input:
            ctx.uses[i] = ctx.uses.get(i, 0) + 1
    for init in g.initializer:
        ctx.consts[init.name] = numpy_helper.to_array(init)
    inputs = []
    for vi in g.input:
        if vi.name in ctx.consts:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        inputs.append(TensorSpec(vi.name, dims, _ONNX_DTYPES.get(tt.elem_type, f"onnx-type-{tt.elem_type}")))
    for node in g.node:
        conv = _CONVERTERS.get(node.op_type)
        if conv is None or (node.domain not in ("", "ai.onnx")):
            raise UnsupportedOpError(node.name or node.output[0], node.op_type, SUPPORTED_ONNX_OPS)
        conv(node, ctx, _attrs(node))
    outputs = [ctx.name(o.name) for o in g.output]
    graph = Graph(ctx.nodes, inputs, outputs, name=name or g.name or "model")
    graph.meta["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return graph

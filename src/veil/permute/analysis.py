"""Which weight axes carry the residual stream, found from what the model computes (not its name).

The STIP transform is exact when every axis that indexes the residual stream is permuted and no
operation mixes that axis in an order-dependent way. This module finds those axes for any Hugging
Face model by running one short forward pass under a :class:`torch.overrides.TorchFunctionMode`
that records every operation and gives every tensor axis a label. Operations impose constraints:

* ``linear(x, W, b)``: the input axis of ``x`` is ``W``'s axis 1; the output axis is ``W``'s axis 0
  and ``b``'s axis 0 (``addmm``/``matmul``: the contracted axes are one label);
* elementwise operations with broadcasting (residual adds, norm gains ``w * x``, ``(1 + w)``
  gains, embedding scales, parallel residual sums): aligned axes are one label;
* ``layer_norm``/``rms_norm`` and reductions (mean, sum, variance) over an axis: symmetric in that
  axis, so they are exact under a permutation of it; softmax likewise;
* views, transposes, slices and concatenations that keep an axis carry its label;
* every other operation (a reshape that splits the axis, a cumulative sum, a gather, attention
  kernels) marks the axes it touches as *order-dependent*.

Labels joined by these constraints form classes (union-find). The class of the token embedding's
hidden axis is the residual stream. The model is accepted only if no order-dependent use touches
that class, no constant created inside ``forward`` joins it, the base model's output lies on it,
and every parameter with an axis of the hidden size was used. The parameter axes in the class are
the ones the transform permutes; axes in the class of the output head's rows (and the embedding's
rows) are the vocabulary axes. A numerical check (:func:`verify_exact`) then runs the transformed
weights against the original on random tokens; it must agree, or the model is refused.

This is how Llama, Qwen2/3 (q/k biases, per-head q/k norms), Mistral, Phi-3 (fused qkv and
gate/up), Gemma/Gemma2 ((1 + w) RMSNorm, scaled embeddings, extra post-norms), GPT-2, GPT-NeoX and
Falcon (parallel residual, fused qkv), OPT, BERT, RoBERTa and DistilBERT are all handled by one
code path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ResidualAnalysis", "analyse_residual"]

_CARRY_UNARY = {
    "to", "float", "half", "double", "bfloat16", "type", "type_as", "contiguous", "clone", "detach",
    "tanh", "rsqrt", "sqrt", "exp", "log", "neg", "__neg__", "abs", "__abs__", "sigmoid", "relu", "gelu",
    "silu", "dropout", "clamp", "clamp_min", "clamp_max", "softplus", "erf", "square", "reciprocal",
    "isinf", "isnan", "isfinite", "tanh_", "mish", "elu", "leaky_relu", "hardtanh", "sign", "requires_grad_",
}
_ELEMENTWISE = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
    "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__rtruediv__", "__itruediv__",
    "div_", "true_divide", "maximum", "minimum", "where", "masked_fill", "masked_fill_", "pow", "__pow__",
    "__rpow__", "addcmul", "lerp", "__and__", "__or__", "eq", "ne", "__eq__", "__ne__", "lt", "gt", "le", "ge",
}
_REDUCTIONS = {"mean", "sum", "var", "std", "amax", "amin", "norm", "logsumexp", "any", "all"}
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
               "full_like", "new_tensor"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Tracer(TorchFunctionMode):
    """Records axis-label constraints for every torch operation run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.uf = _UnionFind()
        self.labels: dict[int, tuple[int, ...]] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.order_dependent: list[tuple[int, str]] = []  # (label, operation)
        self.constants: dict[int, str] = {}  # label -> what created it (anything but a parameter)
        self.embedding_axes: list[tuple[torch.Tensor, int]] = []  # (weight, hidden label) per embedding call
        self.used: set[int] = set()

    # --- labels -------------------------------------------------------------------------------
    def fresh(self, t: torch.Tensor, origin: str | None = None) -> tuple[int, ...]:
        labs = tuple(self.uf.new() for _ in range(t.dim()))
        if origin is not None:
            for lab in labs:
                self.constants[lab] = origin
        self.set(t, labs)
        return labs

    def set(self, t: torch.Tensor, labs: Iterable[int]) -> None:
        self.labels[id(t)] = tuple(labs)
        self.keep.append(t)

    def of(self, t: torch.Tensor) -> tuple[int, ...]:
        self.used.add(id(t))
        labs = self.labels.get(id(t))
        if labs is None or len(labs) != t.dim():
            labs = self.fresh(t, origin=f"a tensor of shape {tuple(t.shape)} from outside the traced operations")
        return labs

    def join(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def mark(self, t: torch.Tensor, op: str, axes: Iterable[int] | None = None) -> None:
        labs = self.of(t)
        for ax in range(t.dim()) if axes is None else axes:
            if t.shape[ax] > 1:
                self.order_dependent.append((labs[ax], op))

    # --- dispatch -----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if outs:
            name = getattr(func, "__name__", str(func))
            if name == "__get__":  # a property such as Tensor.T: name it by the property
                name = "Tensor." + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
            try:
                self.handle(name, args, kwargs, out, outs)
            except Exception:  # an unexpected call signature: treat it as an unknown operation
                self.unknown(name, args, kwargs, outs)
        return out

    def unknown(self, name: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        ins = _tensors(args) + _tensors(kwargs)
        for t in ins:
            if t.dim():
                self.mark(t, name)
        for o in outs:
            if all(o is not t for t in ins):
                self.fresh(o, origin=f"the output of {name!r}" if ins else f"a tensor made by {name}()")

    def handle(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list[torch.Tensor]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in ("Tensor.T", "Tensor.mT") and x is not None and x.dim() >= 2 and isinstance(out, torch.Tensor):
            lx = list(self.of(x))
            if name == "Tensor.T":
                lx = lx[::-1]
            else:
                lx[-1], lx[-2] = lx[-2], lx[-1]
            self.set(out, lx)
        elif name in _SHAPE_ONLY:
            for o in outs:
                self.fresh(o, origin=f"{name}()")
        elif name in _CARRY_UNARY and x is not None and isinstance(out, torch.Tensor) and out.shape == x.shape:
            self.set(out, self.of(x))
        elif name in _ELEMENTWISE and isinstance(out, torch.Tensor):
            self.elementwise([a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)], out)
        elif name in _REDUCTIONS and x is not None and isinstance(out, torch.Tensor):
            self.reduction(name, x, args, kwargs, out)
        elif name in _SOFTMAX and x is not None and isinstance(out, torch.Tensor) and out.shape == x.shape:
            self.set(out, self.of(x))
        elif name == "linear" and isinstance(out, torch.Tensor):
            self.linear(args, kwargs, out)
        elif name == "embedding" and isinstance(out, torch.Tensor):
            ids, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            wl = self.of(weight)
            self.set(out, self.of(ids) + (wl[1],))
            self.embedding_axes.append((weight, wl[1]))
        elif name in ("layer_norm", "rms_norm") and isinstance(out, torch.Tensor):
            self.norm(name, args, kwargs, out)
        elif name in ("addmm",):
            bias, m1, m2 = args[0], args[1], args[2]
            l1, l2 = self.of(m1), self.of(m2)
            self.join(l1[1], l2[0])
            self.set(out, (l1[0], l2[1]))
            self.elementwise([bias, out], out)
        elif name in ("matmul", "__matmul__", "bmm", "mm") and isinstance(out, torch.Tensor):
            self.matmul(args[0], args[1], out, name)
        elif name in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as") and x is not None:
            self.reshape(name, x, out)
        elif name in ("transpose", "swapaxes", "t", "permute", "movedim", "unsqueeze", "squeeze") and x is not None:
            self.move_axes(name, x, args, kwargs, out)
        elif name in ("expand", "expand_as") and x is not None and isinstance(out, torch.Tensor):
            lx_e = self.of(x)
            lo = list(self.fresh(out))
            for i in range(1, x.dim() + 1):
                if x.shape[-i] == out.shape[-i]:
                    lo[-i] = lx_e[-i]
            self.set(out, lo)
        elif name == "__getitem__" and x is not None and isinstance(out, torch.Tensor):
            self.getitem(x, args[1], out)
        elif name in ("cat", "concat", "concatenate", "stack") and isinstance(out, torch.Tensor):
            self.cat(name, args, kwargs, out)
        else:
            self.unknown(name, args, kwargs, outs)

    # --- operations ---------------------------------------------------------------------------
    def elementwise(self, ins: list[torch.Tensor], out: torch.Tensor) -> None:
        result: list[int | None] = [None] * out.dim()
        for t in ins:
            lt = self.of(t)
            for i in range(1, t.dim() + 1):
                if i > out.dim():
                    break
                if t.shape[-i] == out.shape[-i] and (out.shape[-i] > 1 or result[-i] is None):
                    if result[-i] is None:
                        result[-i] = lt[-i]
                    elif out.shape[-i] > 1:
                        self.join(result[-i], lt[-i])  # type: ignore[arg-type]
        self.set(out, [r if r is not None else self.uf.new() for r in result])

    def reduction(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        pos = list(args[1:])
        if name == "norm" and pos:
            pos = pos[1:]  # norm(x, p, dim, keepdim)
        dim = kwargs.get("dim", pos[0] if pos else None)
        keepdim = bool(kwargs.get("keepdim", pos[1] if len(pos) > 1 else False))
        lx = self.of(x)
        if dim is None:
            dims = set(range(x.dim()))
        else:
            dims = {d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)}
        labs: list[int] = []
        for i in range(x.dim()):
            if i not in dims:
                labs.append(lx[i])
            elif keepdim:
                labs.append(self.uf.new())
        if len(labs) != out.dim():
            self.unknown(name, args, kwargs, [out])
            return
        self.set(out, labs)

    def linear(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        lx, lw = self.of(x), self.of(w)
        self.join(lx[-1], lw[1])
        if b is not None:
            self.join(self.of(b)[0], lw[0])
        self.set(out, lx[:-1] + (lw[0],))

    def norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x = args[0]
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        if shape is None or len(tuple(shape)) != 1:
            self.unknown(name, args, kwargs, [out])
            return
        lx = self.of(x)
        params = list(args[2:]) + [kwargs.get("weight"), kwargs.get("bias")]
        for p in params:
            if isinstance(p, torch.Tensor) and p.dim() == 1:
                self.join(self.of(p)[0], lx[-1])
        self.set(out, lx)

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, name: str) -> None:
        if a.dim() < 2 or b.dim() < 2:
            self.unknown(name, (a, b), {}, [out])
            return
        la, lb = self.of(a), self.of(b)
        self.join(la[-1], lb[-2])
        labs = list(self.fresh(out))
        labs[-1], labs[-2] = lb[-1], la[-2]
        for i in range(3, out.dim() + 1):
            for t, lt in ((a, la), (b, lb)):
                if t.dim() >= i and t.shape[-i] == out.shape[-i] and out.shape[-i] > 1:
                    self.join(labs[-i], lt[-i])
        self.set(out, labs)

    def reshape(self, name: str, x: torch.Tensor, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            self.unknown(name, (x,), {}, _tensors(out))
            return
        lx = self.of(x)
        lo = list(self.fresh(out))
        kept = 0
        for i in range(1, min(x.dim(), out.dim()) + 1):
            if x.shape[-i] != out.shape[-i]:
                break
            lo[-i] = lx[-i]
            kept = i
        self.set(out, lo)
        for ax in range(x.dim() - kept):
            if x.shape[ax] > 1:
                self.order_dependent.append((lx[ax], f"{name} to {tuple(out.shape)}"))

    def move_axes(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            self.unknown(name, args, kwargs, _tensors(out))
            return
        lx = list(self.of(x))
        n = x.dim()
        rest = list(args[1:])
        if name in ("transpose", "swapaxes", "t"):
            d0, d1 = (rest + [0, 1])[:2] if name == "t" else (rest[0], rest[1])
            d0, d1 = d0 % n, d1 % n
            lx[d0], lx[d1] = lx[d1], lx[d0]
        elif name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            lx = [lx[d % n] for d in dims]
        elif name == "movedim":
            src, dst = rest[0] % n, rest[1] % n
            lab = lx.pop(src)
            lx.insert(dst, lab)
        elif name == "unsqueeze":
            d = rest[0] if rest else kwargs["dim"]
            lx.insert(d % (n + 1), self.uf.new())
        elif name == "squeeze":
            d = rest[0] if rest else kwargs.get("dim")
            if d is None:
                lx = [lab for lab, s in zip(lx, x.shape, strict=True) if s != 1]
            elif isinstance(d, int):
                if x.shape[d] == 1:
                    lx.pop(d % n)
            else:
                drop = {i % n for i in d if x.shape[i] == 1}
                lx = [lab for i, lab in enumerate(lx) if i not in drop]
        if len(lx) != out.dim():
            self.unknown(name, args, kwargs, [out])
            return
        self.set(out, lx)

    def getitem(self, x: torch.Tensor, index: Any, out: torch.Tensor) -> None:
        idx = index if isinstance(index, tuple) else (index,)
        consumed = 0
        for it in idx:
            if it is None or it is Ellipsis:
                continue
            consumed += it.dim() if isinstance(it, torch.Tensor) and it.dtype == torch.bool else 1
        per_axis: list[Any] = []
        for it in idx:
            if it is Ellipsis:
                per_axis += [slice(None)] * (x.dim() - consumed)
            elif it is not None:
                per_axis.append(it)
        per_axis += [slice(None)] * (x.dim() - len(per_axis))
        last = per_axis[-1] if per_axis else slice(None)
        lx = self.of(x)
        lo = list(self.fresh(out))
        if isinstance(last, slice) and last == slice(None) and out.dim() and out.shape[-1] == x.shape[-1]:
            lo[-1] = lx[-1]
        elif x.dim():
            self.mark(x, "indexing", [x.dim() - 1])
        self.set(out, lo)

    def cat(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        ts = list(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        n = out.dim()
        lo = list(self.fresh(out))
        for t in ts:
            lt = self.of(t)
            if name == "stack":
                d = dim % n
                src = [i for i in range(n) if i != d]
                for j, i in enumerate(src):
                    if out.shape[i] > 1:
                        self.join(lo[i], lt[j])
            else:
                d = dim % n
                for i in range(n):
                    if i == d:
                        self.mark(t, name, [i])
                    elif out.shape[i] > 1:
                        self.join(lo[i], lt[i])
        self.set(out, lo)


@dataclass
class ResidualAnalysis:
    """The outcome: per parameter name, its residual (hidden) axes and vocabulary axes; or why not."""

    hidden_axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    vocab_axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    embedding_scale: float = 1.0
    head_input: torch.Tensor | None = None  # decoders: the hidden states the head read in the trace
    logits: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return not self.problems


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(state-dict name, tensor object, persistent) for every parameter and buffer, tied names included."""
    out: list[tuple[str, torch.Tensor, bool]] = [(n, p, True) for n, p in model.named_parameters(remove_duplicate=False)]
    sd_names = set(model.state_dict().keys())
    for n, b in model.named_buffers(remove_duplicate=False):
        out.append((n, b, n in sd_names))
    return out


def analyse_residual(model: Any, base: torch.nn.Module, hidden_size: int, is_decoder: bool,
                     sample_ids: torch.Tensor) -> ResidualAnalysis:
    """Trace one forward pass of ``model`` on ``sample_ids`` and solve for the residual axes.

    ``base``: the part of ``model`` that returns hidden states (its output must be on the residual
    stream); ``model`` is the full model (decoders: with the head)."""
    result = ResidualAnalysis()
    tracer = _Tracer()
    named = _named_tensors(model)
    for _, t, _ in named:
        if id(t) not in tracer.labels:
            tracer.fresh(t)
    captured: dict[str, torch.Tensor] = {}

    def grab_output(_module, _inputs, output):
        hs = getattr(output, "last_hidden_state", None)
        if isinstance(hs, torch.Tensor):
            captured["hidden"] = hs

    def grab_head_input(_module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            captured["hidden"] = inputs[0]

    emb_module = model.get_input_embeddings()
    emb_weight = emb_module.weight
    head = model.get_output_embeddings() if is_decoder else None
    # the hidden states the head reads (decoders) or the model returns (encoders) must be on the stream
    handles = [head.register_forward_pre_hook(grab_head_input) if head is not None else
               base.register_forward_hook(grab_output)]
    layer_inputs: list[torch.Tensor] = []

    def grab_layer_input(_module, args, kwargs):
        hs = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if isinstance(hs, torch.Tensor):
            layer_inputs.append(hs)

    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    for stack in stacks:
        for layer in stack:
            handles.append(layer.register_forward_pre_hook(grab_layer_input, with_kwargs=True))
    try:
        with torch.no_grad(), tracer:
            out = model(input_ids=sample_ids, use_cache=False) if is_decoder else model(input_ids=sample_ids)
    finally:
        for h in handles:
            h.remove()
    uf = tracer.uf
    emb_calls_early = [lab for w, lab in tracer.embedding_axes if w is emb_weight]
    if emb_calls_early and not is_decoder and hasattr(out, "values"):
        # every hidden-width output of an encoder (e.g. BERT's pooler) leaves the cloud permuted too,
        # never in the clear: its last axis is tied to the stream
        for value in out.values():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] == hidden_size:
                tracer.join(tracer.of(value)[-1], emb_calls_early[0])
    emb_calls = [lab for w, lab in tracer.embedding_axes if w is emb_weight]
    if not emb_calls:
        result.problems.append("the token embedding table is never looked up by F.embedding in the forward pass")
        return result
    residual = uf.find(emb_calls[0])

    # the embedding module may scale its lookup (Gemma): measure it, the user must apply it in embed mode
    with torch.no_grad():
        looked_up = emb_module(sample_ids)
        plain = torch.nn.functional.embedding(sample_ids, emb_weight)
        ratio = looked_up / torch.where(plain == 0, torch.ones_like(plain), plain)
        mask = plain.abs() > 1e-6
        scale = float(ratio[mask].mean()) if mask.any() else 1.0
        if not torch.allclose(looked_up, plain * scale, rtol=1e-5, atol=1e-6):
            result.problems.append("the embedding module is not a table lookup times a constant")
    result.embedding_scale = scale

    seen: set[str] = set()
    for lab, op in tracer.order_dependent:
        if uf.find(lab) == residual and op not in seen:
            seen.add(op)
            result.problems.append(f"operation {op!r} depends on the order of the residual (hidden) axis")
    for lab, origin in tracer.constants.items():
        if uf.find(lab) == residual and origin not in seen:
            seen.add(origin)
            result.problems.append(f"{origin} meets the residual stream and cannot be permuted")
    if not stacks or not layer_inputs:
        result.problems.append("no stack of config.num_hidden_layers layers was found to check the residual stream")
    elif any(uf.find(tracer.of(t)[-1]) != residual for t in layer_inputs):
        result.problems.append("the layers' input is not on the residual stream (e.g. a projection between the "
                               "embedding width and the hidden width), so it would not be permuted")
    hidden = captured.get("hidden")
    if hidden is None or uf.find(tracer.of(hidden)[-1]) != residual:
        result.problems.append("the final hidden states are not on the residual stream (e.g. a projection "
                               "between the embedding width and the hidden width)")

    vocab_classes = {uf.find(tracer.of(emb_weight)[0])}
    if head is not None:
        vocab_classes.add(uf.find(tracer.of(head.weight)[0]))
        logits = getattr(out, "logits", None)
        if logits is not None and uf.find(tracer.of(logits)[-1]) not in vocab_classes:
            result.problems.append("the logits' last axis is not the output head's rows")
        result.head_input = hidden
        result.logits = logits
    if residual in vocab_classes:
        result.problems.append("the vocabulary axis and the hidden axis are mixed")

    for name, t, persistent in named:
        labs = tracer.labels[id(t)]
        hid = tuple(i for i, lab in enumerate(labs) if uf.find(lab) == residual)
        voc = tuple(i for i, lab in enumerate(labs) if uf.find(lab) in vocab_classes and t.shape[i] > 1)
        if t is emb_weight:
            voc = (0,)
        if (hid or voc) and not persistent:
            result.problems.append(f"buffer {name!r} carries the residual stream but is not saved with the model")
        if id(t) not in tracer.used and hidden_size in tuple(t.shape) and persistent:
            result.problems.append(f"parameter {name!r} (shape {tuple(t.shape)}) is not used in the forward pass, "
                                   "so whether it touches the residual stream cannot be told")
        result.hidden_axes[name] = hid
        result.vocab_axes[name] = voc
    return result

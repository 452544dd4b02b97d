"""Double-precision convolutions in offload training: each convolution product (forward, dX, dW) becomes
three tensor items through the secure engine's convolution path (no im2col in the enclave), in one round,
and matches float64 within the stated bound; a small CNN's gradients match torch autograd; cheats are caught."""

from __future__ import annotations

import numpy as np
import pytest

from offload_train_helpers import DirectSecureMatmul, runtime, small_cnn, torch_mirror
from veil.errors import IntegrityError
from veil.offload.field import P
from veil.offload.training import TRAIN_ACCELERATORS, PlainMatmul, TrainAccelerator, TrainGraph
from veil.offload.training.conv_field import ConvSpec, cols
from veil.offload.training.layers import softmax_cross_entropy
from veil.offload.training.precision import PrecisionMatmul, split_items, split_pair
from veil.offload.training.protocol import choose_conv_scales

#: stated bound, double convolutions: max |error| / max |reference| over each normalisation block
#: (forward: sample x output channel; dX: sample x input channel; dW: output channel x input channel)
DOUBLE_CONV_BOUND = 1e-5

CONVS = [((3, 2, 7, 6), (4, 2, 3, 3), (1, 1), (1, 1, 1, 1)), ((2, 3, 9, 8), (5, 3, 3, 2), (2, 2), (1, 0, 2, 1)),
         ((4, 1, 8, 8), (3, 1, 5, 5), (1, 1), (0, 0, 0, 0)), ((2, 8, 12, 12), (16, 8, 5, 5), (1, 1), (2, 2, 2, 2))]


def _case(i: int, wide: bool):
    g = np.random.default_rng(40 + i)
    xs, ws, st, pads = CONVS[i]
    x, w = g.normal(size=xs), g.normal(0, 0.5, size=ws)
    if wide:  # 10 decades across samples, input channels and output channels
        x = x * 10.0 ** g.uniform(-5, 5, (xs[0], 1, 1, 1)) * 10.0 ** g.uniform(-5, 5, (1, xs[1], 1, 1))
        w = w * 10.0 ** g.uniform(-5, 5, (ws[0], 1, 1, 1)) * 10.0 ** g.uniform(-5, 5, (1, ws[1], 1, 1))
    return x, w, st, pads, g


class Recorder(TrainAccelerator):
    """Keeps the arrays of every item it gets."""

    def __init__(self, name: str, seen: dict, cheat_op: str | None = None):
        super().__init__("numpy")
        self.name, self.seen, self.cheat_op = name, seen, cheat_op

    def product(self, item):
        self.seen[self.name].append({k: v.shape for k, v in item.items() if isinstance(v, np.ndarray)}
                                    | {"conv": item.get("conv", {}).get("op"), "terms": item.get("terms")})
        z = super().product(item)
        if self.cheat_op is not None and item.get("conv", {}).get("op") == self.cheat_op:
            z = z.copy()
            z.flat[z.size // 2] = (int(z.flat[z.size // 2]) + 1) % P
        return z


def _engine(precision: str = "double", cheat: tuple[str, str] | None = None):
    seen: dict = {a: [] for a in TRAIN_ACCELERATORS}
    accs = {a: Recorder(a, seen, cheat[1] if cheat and cheat[0] == a else None) for a in TRAIN_ACCELERATORS}
    return PrecisionMatmul(DirectSecureMatmul.make(runtime(), accs), precision), seen


def _blockwise(got: np.ndarray, want: np.ndarray, axes: tuple[int, ...]) -> float:
    """max over the blocks (the indices outside ``axes``) of max |error| / max |reference| within the block."""
    err = np.abs(got - want).max(axis=axes)
    ref = np.abs(want).max(axis=axes)
    return float((err / np.maximum(ref, 1e-300)).max())


def _run(eng, x, w, st, pads, gy):
    y, ctx = eng.conv_forward(x, w, st, pads)
    dx, dw = eng.conv_backward(x, w, gy, st, pads, ctx, True)
    return y, dx, dw, ctx


@pytest.mark.parametrize("wide", [False, True], ids=["gaussian", "10 decades"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_double_convolutions_match_float64_within_the_bound_and_beat_single(case, wide):
    x, w, st, pads, g = _case(case, wide)
    plain = PlainMatmul()
    yp, ctxp = plain.conv_forward(x, w, st, pads)
    gy = g.normal(size=yp.shape) * (10.0 ** g.uniform(-4, 4, (yp.shape[0], 1, 1, 1)) if wide else 1.0)
    dxp, dwp = plain.conv_backward(x, w, gy, st, pads, ctxp, True)
    errs = {}
    for precision in ("double", "single"):
        y, dx, dw, _ = _run(_engine(precision)[0], x, w, st, pads, gy)
        errs[precision] = (_blockwise(y, yp, (2, 3)), _blockwise(dx, dxp, (2, 3)), _blockwise(dw, dwp, (2, 3)))
    assert max(errs["double"]) < DOUBLE_CONV_BOUND, errs  # measured <= 2.7e-7 (case 3, 10 decades)
    if not wide:  # plain relative error too, and far below single's
        y, dx, dw, _ = _run(_engine()[0], x, w, st, pads, gy)
        for got, want in ((y, yp), (dx, dxp), (dw, dwp)):
            assert np.abs(got - want).max() / np.abs(want).max() < DOUBLE_CONV_BOUND
        assert all(d < s / 50 for d, s in zip(errs["double"], errs["single"], strict=True)), errs


def test_at_double_the_enclave_builds_no_im2col_matrix_and_sends_two_tensor_items_per_product():
    x, w, st, pads, g = _case(1, False)
    eng, seen = _engine()
    y, ctx = eng.conv_forward(x, w, st, pads)
    eng.conv_backward(x, w, g.normal(size=y.shape), st, pads, ctx, True)
    assert ctx is None
    c = eng.counters
    assert c["products"] == 6 and c["split_products"] == 3 and c["rounds"] == 2 and "local_products" not in c
    o = w.shape[0]
    kdim = int(np.prod(w.shape[1:]))
    rows = y.shape[0] * y.shape[2] * y.shape[3]
    want = {"fwd": (x.shape, (kdim, o)), "dw": ((o, rows), x.shape), "dx": ((rows, o), (o, kdim))}
    for name in ("accelerator0", "accelerator1"):
        items = seen[name]
        assert [it["conv"] for it in items] == ["fwd"] * 2 + ["dw"] * 2 + ["dx"] * 2
        for it in items:  # the tensors themselves (x, not cols(x)), as at single; each sent once
            assert (it["e"], it["f"]) == want[it["conv"]], it
        # the second item of each product is the cross sum, reusing the first's U_h and V_h (item ids count
        # within a round: forward, then backward's dW and dX)
        assert [it["terms"] for it in items] == [None, [["e", 0], [0, "f"]], None, [["e", 0], [0, "f"]],
                                                 None, [["e", 2], [2, "f"]]]
    assert all(set(it) == {"conv", "terms"} for it in seen["accelerator2"])  # the triple helper: seeds only


def test_the_high_part_of_a_convolution_is_exact_in_the_field():
    x, w, st, pads, _ = _case(0, True)
    o = w.shape[0]
    spec = ConvSpec("fwd", x.shape, w.shape[2:], st, pads)
    wt = w.reshape(o, -1).T
    xh, xl, wh, wl = split_pair(x, wt, spec)
    assert np.array_equal(xh + xl, x) and np.array_equal(wh + wl, wt)
    (o_xh, o_wh), = split_items(x, wt, spec)[0].terms
    assert np.array_equal(o_xh.x, xh) and np.array_equal(o_wh.x, wh)
    fu, fv = o_xh.frac, o_wh.frac  # the engine quantises (xh, wh) at these scales: no rounding
    assert fu + fv >= sum(choose_conv_scales(spec, x, wt)) - 1
    assert np.array_equal(np.rint(np.ldexp(xh, fu)), np.ldexp(xh, fu))
    assert np.array_equal(np.rint(np.ldexp(wh, fv)), np.ldexp(wh, fv))
    # ... and the convolution of the pair is inside the field (im2col product, exact in Python integers)
    q = cols(np.rint(np.ldexp(xh, fu)), spec).astype(object).dot(np.rint(np.ldexp(wh, fv)).astype(object))
    assert max(abs(int(z)) for z in q.ravel()) < (P - 1) // 2
    assert np.abs(xl).max() < 1e-3 * np.abs(x).max()


def test_a_small_cnn_step_at_double_matches_torch_autograd():
    import torch

    rng = np.random.default_rng(7)
    graph = small_cnn(2)
    x, y = rng.normal(size=(6, 1, 8, 8)), rng.integers(0, 5, 6)
    eng, _ = _engine()
    net = TrainGraph(graph)
    out, cache = net.forward({"x": x}, eng)
    grads = net.backward(softmax_cross_entropy(out, y)[1], cache, eng)
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}
    tout = torch_mirror(graph, tp, {"x": x})
    torch.nn.functional.cross_entropy(tout, torch.as_tensor(y)).backward()
    tref = tout.detach().numpy()
    assert np.abs(out - tref).max() <= 1e-6 * np.abs(tref).max()
    for k in tp:
        ref = tp[k].grad.numpy()
        assert np.abs(grads[k] - ref).max() <= 1e-6 * np.abs(ref).max() + 1e-12, k
    # 2 convs (fwd, dW; dX for the second) and 1 linear (fwd, dX, dW): 8 products, 2 items each, 6 rounds
    c = eng.counters
    assert c["split_products"] == 8 and c["products"] == 16 and c["rounds"] == 6


@pytest.mark.parametrize("op", ["fwd", "dx", "dw"])
@pytest.mark.parametrize("acc", TRAIN_ACCELERATORS)
def test_a_wrong_convolution_answer_at_double_is_caught_and_named(op, acc):
    x, w, st, pads, g = _case(1, False)
    eng, _ = _engine(cheat=(acc, op))
    with pytest.raises(IntegrityError, match=f"'{acc}' returned a wrong product in round {1 if op == 'fwd' else 2}"):
        y, ctx = eng.conv_forward(x, w, st, pads)
        eng.conv_backward(x, w, g.normal(size=y.shape), st, pads, ctx, True)

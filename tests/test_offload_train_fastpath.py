"""The enclave's fast path of the offload-training protocol: uint32 masks equal the reference expansion,
float64-limb matrix-vector products and the centred reconstruction are exact at their worst cases,
the triple helper gets seeds only (first in each round), and the single Freivalds check on
``Z0 + Z1 + C`` judges the result (a lie that cancels between share holders changes nothing)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from offload_train_helpers import DirectSecureMatmul, runtime
from veil.errors import IntegrityError
from veil.offload.field import HALF, P, centered, uniform_field
from veil.offload.training import TRAIN_ACCELERATORS, TrainAccelerator
from veil.offload.training.field_ops import masked as _masked
from veil.offload.training.protocol import _lift, exact_matvec, masks_u32


def _ref_matvec(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Python-integer reference of ``a @ x mod p``."""
    ao = a.astype(np.int64).astype(object)
    return np.array((ao @ x.astype(object)) % P, dtype=np.int64)


def test_uint32_masks_equal_the_reference_expansion():
    for count in (1, 7, 1000, 123457):
        seed = os.urandom(32)
        m = masks_u32(seed, count)
        assert m.dtype == np.uint32 and np.array_equal(m.astype(np.int64), uniform_field(seed, count))


@pytest.mark.parametrize("rows,cols,amax", [(3, 8192, 2**30), (5, 1, 2**31 - 1), (4, 50_000, 2**30), (7, 500, 3)])
def test_limb_matvec_is_exact_at_the_worst_case(rows, cols, amax):
    g = np.random.default_rng(cols)
    a = g.choice([-amax, amax, amax - 1, 0], size=(rows, cols)).astype(np.float64)
    x = np.full((cols, 2), P - 1, np.int64)
    x[:, 1] = g.integers(0, P, cols)
    assert np.array_equal(exact_matvec(a, float(amax), x), _ref_matvec(a, x))


def test_centred_reconstruction_and_masking_are_exact():
    g = np.random.default_rng(1)
    zs = [g.integers(0, P, (50, 40)).astype(np.uint32) for _ in range(3)]
    zs[0][0, :3] = [P - 1, 0, P - 1]
    zs[1][0, :3] = [P - 1, 0, P - 1]
    zs[2][0, :3] = [P - 1, 0, 0]
    want = centered(sum(z.astype(np.int64) for z in zs) % P)
    got = _lift(zs)
    assert np.array_equal(got, want.astype(np.float64)) and np.abs(got).max() <= HALF
    q = g.integers(-HALF, HALF + 1, (30, 20)).astype(np.float64)
    m0, m1 = (g.integers(0, P, (30, 20)).astype(np.uint32) for _ in range(2))
    e = _masked(q, m0, m1)
    assert e.dtype == np.uint32 and np.array_equal(e.astype(np.int64), (q.astype(np.int64) - m0 - m1) % P)


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the protocol's fixed-point error (~1e-3 of the largest entry, docs/offload.md)."""
    assert np.abs(got - want).max() <= 3e-3 * np.abs(want).max()


class Log(TrainAccelerator):
    def __init__(self, name: str, order: list):
        super().__init__("numpy")
        self.name, self.order = name, order

    def handle(self, msg):
        self.order.append((self.name, msg.get("type"), [sorted(it) for it in msg.get("items", [])]))
        return super().handle(msg)


def test_the_triple_helper_gets_seeds_first_and_no_arrays():
    order: list = []
    accs = {a: Log(a, order) for a in TRAIN_ACCELERATORS}
    eng = DirectSecureMatmul.make(runtime(), accs)
    g = np.random.default_rng(2)
    u, v = g.normal(size=(9, 13)), g.normal(size=(13, 4))
    close(eng.matmuls([(u, v), (v.T, u.T)])[0], u @ v)
    assert [o[0] for o in order] == ["accelerator2", "accelerator0", "accelerator1"]
    assert order[0][2] == [["id", "role", "seeds", "shape"]] * 2
    assert order[1][2] == [["e", "f", "id", "role", "seed"]] * 2


class Shift(TrainAccelerator):
    """Adds ``delta`` to entry (0, 0) of every answer."""

    def __init__(self, delta: int):
        super().__init__("numpy")
        self.delta = delta

    def product(self, item):
        z = super().product(item).copy()
        z[0, 0] = (z[0, 0] + self.delta) % P
        return z


def test_the_check_judges_the_result_a_cancelling_lie_changes_nothing_a_lone_one_is_named():
    g = np.random.default_rng(3)
    u, v = g.normal(size=(6, 10)), g.normal(size=(10, 5))
    accs = {"accelerator0": Shift(12345), "accelerator1": Shift(P - 12345), "accelerator2": TrainAccelerator("numpy")}
    eng = DirectSecureMatmul.make(runtime(), accs)
    close(eng.matmul(u, v), u @ v)  # the sum is right: accepted
    accs = {"accelerator0": Shift(12345), "accelerator1": TrainAccelerator("numpy"), "accelerator2": Shift(7)}
    eng = DirectSecureMatmul.make(runtime(), accs)
    with pytest.raises(IntegrityError, match="'accelerator0' and 'accelerator2' returned a wrong product in round 1"):
        eng.matmul(u, v)


# --- convolutions: tensors masked, im2col/col2im on the accelerators ------------------------------------
CONVS = [((3, 2, 7, 6), (4, 2, 3, 3), (1, 1), (1, 1, 1, 1)), ((2, 3, 9, 8), (5, 3, 3, 2), (2, 2), (1, 0, 2, 1)),
         ((4, 1, 8, 8), (3, 1, 5, 5), (1, 1), (0, 0, 0, 0))]


def _conv_case(i: int):
    g = np.random.default_rng(10 + i)
    xs, ws, st, pads = CONVS[i]
    return g.normal(size=xs), g.normal(0, 0.5, size=ws), st, pads, g


@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_offloaded_convolutions_match_float_and_the_matrix_path(case, backend):
    """Forward, dX and dW through the convolution path equal float64 im2col products up to the fixed-point
    error; with stride 1 the forward and dW results equal the matrix path's (same scales) bit for bit."""
    from veil.offload.training import PlainMatmul
    from veil.offload.training.conv_field import ConvSpec, cols

    if backend.startswith("torch"):
        pytest.importorskip("torch", reason="the torch backend needs torch")
    x, w, st, pads, g = _conv_case(case)
    eng = DirectSecureMatmul.make(runtime(), {a: TrainAccelerator(backend) for a in TRAIN_ACCELERATORS})
    plain = PlainMatmul()
    y, ctx = eng.conv_forward(x, w, st, pads)
    yp, ctxp = plain.conv_forward(x, w, st, pads)
    gy = g.normal(size=yp.shape)
    dx, dw = eng.conv_backward(x, w, gy, st, pads, ctx, True)
    dxp, dwp = plain.conv_backward(x, w, gy, st, pads, ctxp, True)
    for got, want in ((y, yp), (dx, dxp), (dw, dwp)):
        assert got.shape == want.shape
        close(got, want)
    assert eng.counters["products"] == 3 and eng.counters["rounds"] == 2 and "local_products" not in eng.counters
    assert ctx is None  # nothing im2col'd in the enclave
    if st == (1, 1):
        o = w.shape[0]
        mat = cols(x, ConvSpec("fwd", x.shape, w.shape[2:], st, pads))
        assert np.array_equal(y, eng.matmul(mat, w.reshape(o, -1).T).reshape(*yp.shape[:1], *yp.shape[2:], o)
                              .transpose(0, 3, 1, 2))
        g2 = gy.transpose(0, 2, 3, 1).reshape(-1, o)
        assert np.array_equal(dw, eng.matmul(g2.T, mat).reshape(w.shape))


class ConvCheater(TrainAccelerator):
    """Adds 1 to one entry of its answer to the first convolution item of kind ``op``."""

    def __init__(self, op: str):
        super().__init__("numpy")
        self.op = op

    def product(self, item):
        z = super().product(item)
        if item.get("conv", {}).get("op") == self.op:
            z = z.copy()
            z.flat[z.size // 2] = (int(z.flat[z.size // 2]) + 1) % P
        return z


@pytest.mark.parametrize("op", ["fwd", "dx", "dw"])
@pytest.mark.parametrize("acc", TRAIN_ACCELERATORS)
def test_a_wrong_convolution_answer_is_caught_and_named(op, acc):
    x, w, st, pads, g = _conv_case(1)
    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    accs[acc] = ConvCheater(op)
    eng = DirectSecureMatmul.make(runtime(), accs)
    with pytest.raises(IntegrityError, match=f"'{acc}' returned a wrong product in round {1 if op == 'fwd' else 2}"):
        y, ctx = eng.conv_forward(x, w, st, pads)
        eng.conv_backward(x, w, g.normal(size=y.shape), st, pads, ctx, True)


def test_what_the_accelerators_get_for_a_convolution_is_uniform_and_uncorrelated():
    """The share holders get the masked tensors (X, not cols(X)) and masked dY, W: uniform (chi-square) and
    uncorrelated with the plaintext (|r| < 5/sqrt(n)); constant data too."""
    from test_offload_train_protocol import chi2_uniform, pearson

    seen: dict = {a: [] for a in TRAIN_ACCELERATORS}

    class Rec(TrainAccelerator):
        def __init__(self, name):
            super().__init__("numpy")
            self.name = name

        def product(self, item):
            seen[self.name].append({k: v.copy() for k, v in item.items() if isinstance(v, np.ndarray)})
            return super().product(item)

    eng = DirectSecureMatmul.make(runtime(), {a: Rec(a) for a in TRAIN_ACCELERATORS})
    x, w, st, pads, g = _conv_case(0)
    for data in (x, np.ones_like(x)):
        y, ctx = eng.conv_forward(data, w, st, pads)
        gy = g.normal(size=y.shape)
        eng.conv_backward(data, w, gy, st, pads, ctx, True)
        plain = [(data, w.reshape(w.shape[0], -1).T), (gy.transpose(0, 2, 3, 1).reshape(-1, w.shape[0]), w.reshape(w.shape[0], -1)),
                 (gy.transpose(0, 2, 3, 1).reshape(-1, w.shape[0]).T, data)]
        for name in ("accelerator0", "accelerator1"):
            got = seen[name][-3:]
            for item, (u, v) in zip(got, plain, strict=True):
                assert item["e"].shape == u.shape and item["f"].shape == v.shape  # tensors, not im2col matrices
                for s_arr, p_arr in ((item["e"], u), (item["f"], v)):
                    if p_arr.std() > 0:
                        assert abs(pearson(p_arr, s_arr)) < 5 / np.sqrt(p_arr.size)
        assert seen["accelerator2"] and all(not arrs for arrs in seen["accelerator2"])  # seeds only
    for name in ("accelerator0", "accelerator1"):
        vals = np.concatenate([a.ravel() for it in seen[name] for a in it.values()])
        assert chi2_uniform(vals) < 130, name

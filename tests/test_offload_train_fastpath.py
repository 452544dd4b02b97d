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
from veil.offload.training.protocol import _lift, _masked, exact_matvec, masks_u32


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

"""Precision ``double`` as two secure products per product: the exact ``U_h V_h`` and the cross sum
``U_l V_h + U_h V_l``, which reuses the masked ``U_h`` and ``V_h`` (sent once) and comes back as one result.
Checked here: the sum item's arithmetic against float64 and the arithmetic-only engine (bit for bit), the
field bound of the cross scale, what the wire refuses, and that a wrong sum answer is caught and named in
forward and backward rounds, matrix and convolution items alike."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offload_train_helpers import DirectSecureMatmul, runtime, small_cnn
from veil.errors import IntegrityError
from veil.offload.field import HALF, P
from veil.offload.training import (
    TRAIN_ACCELERATORS,
    TrainAccelerator,
    TrainConfig,
    Trainer,
    train_offload_local,
)
from veil.offload.training.conv_field import ConvSpec
from veil.offload.training.precision import FieldArithmeticMatmul, _norms, cross_scale, split_items
from veil.offload.training.protocol import Operand, SumItem


def _engine(accs: dict | None = None):
    return DirectSecureMatmul.make(runtime(), accs or {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS})


def _items(g: np.random.Generator):
    """Two products as two pairs of sum items (matrix, and a forward convolution)."""
    u, v = g.normal(size=(12, 300)), g.normal(size=(300, 7))
    u /= np.sqrt((u * u).sum(1, keepdims=True))
    v /= np.sqrt((v * v).sum(0, keepdims=True))
    spec = ConvSpec("fwd", (3, 2, 7, 6), (3, 3), (1, 1), (1, 1, 1, 1))
    x, w = g.normal(size=spec.x_shape) * 0.2, g.normal(size=(spec.k, 4)) * 0.3
    return (u, v, None), (x, w, spec)


def test_sum_items_give_the_fields_exact_sum_and_match_the_arithmetic_engine_bit_for_bit():
    g = np.random.default_rng(0)
    (u, v, _), (x, w, spec) = _items(g)
    items = [*split_items(u, v), *split_items(x, w, spec)]
    eng = _engine()
    got = eng.sum_products(items)
    assert eng.counters["products"] == 4 and eng.counters["rounds"] == 1 and eng.counters["freivalds_checks"] == 4
    want = FieldArithmeticMatmul().sum_products(items)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    # the high item is exact; the cross item is U_l V_h + U_h V_l up to the rounding of U_l and V_l
    (uh, vh), = [(a.x, b.x) for a, b in items[0].terms]
    assert np.array_equal(got[0], uh @ vh)
    (o_ul, _), (_, o_vl) = items[1].terms
    cross = o_ul.x @ vh + uh @ o_vl.x
    # only U_l and V_l are rounded (to 2^-frac, entries by at most half of it): Cauchy-Schwarz per entry
    half_k = math.sqrt(u.shape[1]) / 2
    limit = half_k * (2.0 ** -o_ul.frac * np.sqrt((vh * vh).sum(0))[None, :]
                      + 2.0 ** -o_vl.frac * np.sqrt((uh * uh).sum(1))[:, None])
    assert np.all(np.abs(got[1] - cross) <= limit) and limit.max() < 1e-6
    assert np.abs(got[0] + got[1] - u @ v).max() < 1e-7  # rows and columns of norm 1: normwise error


def test_the_cross_scale_is_the_largest_that_keeps_the_sum_inside_the_field():
    g = np.random.default_rng(1)
    for k, spread in ((50, 0.0), (3000, 0.0), (400, 6.0)):
        u = g.normal(size=(20, k)) * 10.0 ** g.uniform(-spread, spread, (20, 1))
        v = g.normal(size=(k, 9)) * 10.0 ** g.uniform(-spread, spread, (1, 9))
        hi, cross = split_items(u, v)
        (o_ul, o_vh), (o_uh, o_vl) = cross.terms
        t = o_ul.frac + o_vh.frac
        assert t == o_uh.frac + o_vl.frac  # one output scale
        nh, nl = _norms(o_uh.x, o_vh.x, None), _norms(o_ul.x, o_vl.x, None)
        d = math.sqrt(k) / 2

        bound = [(math.ldexp(nl[0], s - o_vh.frac) + d) * (math.ldexp(nh[1], o_vh.frac) + d)
                 + (math.ldexp(nh[0], o_uh.frac) + d) * (math.ldexp(nl[1], s - o_uh.frac) + d) for s in (t, t + 1)]
        assert bound[0] < HALF <= bound[1]
        assert cross_scale(nh, nl, o_uh.frac, o_vh.frac) == t
        # the integer sum itself (exact in Python integers) lies inside (-p/2, p/2)
        q = [np.rint(np.ldexp(o.x, o.frac)).astype(object) for o in (o_ul, o_vh, o_uh, o_vl)]
        s = q[0].dot(q[1]) + q[2].dot(q[3])
        assert max(abs(int(z)) for z in s.ravel()) < HALF


def test_the_wire_refuses_items_it_cannot_carry():
    g = np.random.default_rng(2)
    a, b, c = Operand(g.normal(size=(4, 5)), 10), Operand(g.normal(size=(5, 3)), 10), Operand(g.normal(size=(4, 5)), 10)
    d = Operand(g.normal(size=(5, 3)), 12)
    eng = _engine()
    with pytest.raises(ValueError, match="exactly one new operand"):
        eng.sum_products([SumItem([(a, b), (c, b)])])  # two new U operands in one item
    with pytest.raises(ValueError, match="one output scale"):
        eng.sum_products([SumItem([(a, b)]), SumItem([(c, b), (a, d)])])
    with pytest.raises(ValueError, match="fractional bits"):
        eng.sum_products([SumItem([(Operand(a.x), b)])])
    assert eng.counters["rounds"] == 0


def test_an_accelerator_refuses_malformed_references_with_an_error_reply():
    acc = TrainAccelerator("numpy")
    e, f = np.zeros((2, 3), np.uint32), np.zeros((3, 2), np.uint32)
    base = {"id": 0, "role": 0, "e": e, "f": f, "seed": bytes(32)}
    for terms, words in (([["e", 5]], "names no other item"), ([["e", 0]], "names no other item"),
                         ([["e", "f", "g"]], "pair"), ("ef", "list of 1 to 16"), ([["e", 1]], "shape")):
        other = {"id": 1, "role": 0, "e": np.zeros((2, 4), np.uint32), "f": np.zeros((4, 2), np.uint32),
                 "seed": bytes(32)}
        reply = acc.handle({"type": "tmatmul", "round": 1, "items": [base | {"terms": terms}, other]})
        assert reply["type"] == "error" and words in reply["message"], (terms, reply)
    helper = {"id": 0, "role": 2, "seeds": [bytes(32), bytes(32)], "shape": [2, 3, 2]}
    reply = acc.handle({"type": "tmatmul", "round": 1, "items": [helper | {"terms": [["e", 1]]}, base | {"id": 1}]})
    assert reply["type"] == "error" and "same role" in reply["message"], reply


class SumLiar(TrainAccelerator):
    """Adds 1 to one entry of every sum item's answer in request ``at``."""

    def __init__(self, at: int):
        super().__init__("numpy")
        self.at = at

    def product(self, item):
        z = super().product(item)
        if self.requests + 1 == self.at and "terms" in item:
            z = z.copy()
            z.flat[z.size // 3] = (int(z.flat[z.size // 3]) + 1) % P
        return z


@pytest.mark.parametrize("acc", TRAIN_ACCELERATORS)
@pytest.mark.parametrize("rnd,phase", [(1, "forward conv"), (3, "forward linear"), (4, "backward linear"),
                                       (5, "backward conv dX and dW")])
def test_a_wrong_sum_answer_is_caught_and_named_in_forward_and_backward(acc, rnd, phase):
    g = np.random.default_rng(3)
    x, y = g.normal(size=(8, 1, 8, 8)).astype(np.float32), g.integers(0, 5, 8)
    tr = Trainer(small_cnn(1), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.1}, batch_size=8,
                                                        precision="double"))
    before = {k: v.copy() for k, v in tr.net.params.items()}
    with pytest.raises(IntegrityError, match=f"accelerator {acc!r} returned a wrong product in round {rnd}"):
        train_offload_local(tr, runtime(), steps=1, accelerator_factory=lambda name: SumLiar(rnd) if name == acc
                            else TrainAccelerator("numpy"))
    assert tr.step_count == 0 and all(np.array_equal(before[k], tr.net.params[k]) for k in before)


@pytest.mark.parametrize("conv", [False, True], ids=["matrix", "dx convolution"])
def test_a_sum_answer_split_into_backend_calls_is_the_same(monkeypatch, conv):
    """A share holder's sum item joins 4 pairs (inner dimension 4k); above the Karatsuba limit the pairs go
    to the backend in groups whose results are added mod p: same answer."""
    from veil.offload.backend import NumpyBackend
    from veil.offload.training import protocol

    g = np.random.default_rng(5)
    if conv:
        spec = ConvSpec("dx", (2, 3, 6, 5), (3, 2), (1, 1), (1, 0, 1, 1))
        n, k, m = spec.matrix_shape(4)
    else:
        spec, (n, k, m) = None, (6, 9, 5)
    su, sv = ((n, k), (k, m)) if spec is None else spec.raw_shapes(n, k, m)
    sources = [(g.integers(0, P, su).astype(np.uint32), g.integers(0, P, sv).astype(np.uint32),
                (g.bytes(32), g.bytes(32))) for _ in range(2)]
    terms = [(1, 0), (0, 1)]
    whole = [protocol.expected_sum(NumpyBackend(), j, sources, terms, spec, (n, k, m)) for j in range(3)]
    monkeypatch.setattr(protocol, "MAX_INNER_KARATSUBA", k + 1)  # one pair per backend call
    for j in range(3):
        assert np.array_equal(protocol.expected_sum(NumpyBackend(), j, sources, terms, spec, (n, k, m)), whole[j])
    # and the three answers add up to the sum of the products (U = E + A, V = F + B)
    from veil.offload.training.protocol import masks_u32

    def mats(i):
        e, f, (s0, s1) = sources[i]
        r0, r1 = (masks_u32(s, int(np.prod(su)) + int(np.prod(sv))).astype(np.int64) for s in (s0, s1))
        a = (r0[:np.prod(su)] + r1[:np.prod(su)]).reshape(su)
        b = (r0[np.prod(su):] + r1[np.prod(su):]).reshape(sv)
        return (e.astype(np.int64) + a) % P, (f.astype(np.int64) + b) % P

    from veil.offload.training.conv_field import col2im_field

    total = sum(protocol.field_matmul(NumpyBackend(), mats(iu)[0], mats(iv)[1]) for iu, iv in terms) % P
    if conv:
        total = col2im_field(total, spec)
    assert np.array_equal((whole[0].astype(np.int64) + whole[1] + whole[2]) % P, total)


def test_the_wire_refuses_a_reused_operand_from_an_item_of_another_shape():
    """Reusing ``F`` of an item whose ``U`` has another shape would draw that item's ``B`` from the wrong place
    of its key stream: the enclave refuses the plan (ValueError) before anything is sent, instead of an honest
    accelerator refusing it and being reported as the one that failed."""
    g = np.random.default_rng(4)
    c, b = Operand(g.normal(size=(6, 5)), 10), Operand(g.normal(size=(5, 3)), 10)  # item 0: 6 x 5 x 3
    a, d = Operand(g.normal(size=(4, 5)), 10), Operand(g.normal(size=(5, 3)), 10)  # item 1: 4 x 5 x 3
    eng = _engine()
    with pytest.raises(ValueError, match="same shape"):
        eng.sum_products([SumItem([(c, b)]), SumItem([(a, d), (a, b)])])
    assert eng.counters["rounds"] == 0


def test_an_accelerator_names_what_is_wrong_with_items_and_term_references():
    acc = TrainAccelerator("numpy")
    e, f = np.zeros((2, 3), np.uint32), np.zeros((3, 2), np.uint32)
    base = {"id": 0, "role": 0, "e": e, "f": f, "seed": bytes(32)}
    for items, words in (([base | {"terms": [[np.arange(3), "f"]]}, base | {"id": 1}], "expected 'e' or the integer id"),
                         ([base, base], "distinct within the request"), ([base | {"id": "0"}], "integer id"),
                         ([{k: v for k, v in base.items() if k != "id"}], "integer id"), (5, "list of item dicts")):
        reply = acc.handle({"type": "tmatmul", "round": 1, "items": items})
        assert reply["type"] == "error" and words in reply["message"], (words, reply)

"""Offload training, what the untrusted accelerators see and can do: uniform views uncorrelated with
data, weights and gradients; every wrong product caught (forward and backward, any accelerator);
bit-for-bit reproducible steps; sealed checkpoints and resume; a dead accelerator."""

from __future__ import annotations

import numpy as np
import pytest

from offload_train_helpers import DirectSecureMatmul, runtime, small_cnn
from veil.errors import IntegrityError, VeilError
from veil.offload.errors import AcceleratorUnavailableError, SealError
from veil.offload.field import P, uniform_field
from veil.offload.training import (
    TRAIN_ACCELERATORS,
    TrainAccelerator,
    TrainConfig,
    Trainer,
    TrainGraph,
    train_offload_local,
)
from veil.offload.training.conv_field import ConvSpec
from veil.offload.training.protocol import SecureMatmul, expand_masks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def chi2_uniform(values: np.ndarray, bins: int = 64) -> float:
    counts = np.bincount((values.astype(np.int64).ravel() * bins) // P, minlength=bins)
    exp = values.size / bins
    return float(((counts - exp) ** 2 / exp).sum())


def data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.normal(size=(n, 1, 8, 8)).astype(np.float32), g.integers(0, 5, n)


def cfg(**kw) -> TrainConfig:
    base = {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "epochs": 2, "batch_size": 8, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)


# --- what the accelerators see ------------------------------------------------------------------
class Recorder(TrainAccelerator):
    def __init__(self, name: str, log: list):
        super().__init__("numpy")
        self.name, self.log = name, log

    def product(self, item):
        arrays = {k: v.copy() for k, v in item.items() if isinstance(v, np.ndarray)}
        if int(item["role"]) == 2:
            # the triple helper receives two seeds and the shape, no array: what it learns are the masks
            # A = A0 + A1, B = B0 + B1 it expands from them (audited here in their place)
            assert not arrays and set(item) - {"conv", "terms"} == {"id", "role", "seeds", "shape"}, sorted(item)
            n, k, m = item["shape"]
            if "conv" in item:  # a convolution: the masks have the shapes of the tensors sent (e.g. X, not cols(X))
                su, sv = ConvSpec.from_msg(item["conv"]).raw_shapes(n, k, m)
                (a0, b0), (a1, b1) = ((r[:np.prod(su)].reshape(su), r[np.prod(su):].reshape(sv))
                                      for r in (uniform_field(s, int(np.prod(su) + np.prod(sv))) for s in item["seeds"]))
            else:
                (a0, b0), (a1, b1) = (expand_masks(s, n, k, m) for s in item["seeds"])
            arrays = {"a": (a0 + a1) % P, "b": (b0 + b1) % P}
        self.log.append((self.name, self.requests + 1, int(item["id"]), arrays))
        return super().product(item)


class Truth(SecureMatmul):
    """The enclave's plaintext operands per (round, item), kept only by this test."""

    def matmuls(self, pairs):
        for i, (u, v) in enumerate(pairs):
            self.truth[(self.round + 1, i)] = (u.copy(), v.copy())
        return super().matmuls(pairs)

    # convolutions reach the accelerators as tensors: the operands as sent, in the engine's item order
    def conv_forward(self, x, w, strides, pads):
        self.truth[(self.round + 1, 0)] = (x.copy(), w.reshape(w.shape[0], -1).T.copy())
        return super().conv_forward(x, w, strides, pads)

    def conv_backward(self, x, w, g, strides, pads, ctx, need_dx):
        g2 = g.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
        items = ([(g2, w.reshape(w.shape[0], -1))] if need_dx else []) + [(g2.T, x)]
        for i, (u, v) in enumerate(items):
            self.truth[(self.round + 1, i)] = (u.copy(), v.copy())
        return super().conv_backward(x, w, g, strides, pads, ctx, need_dx)

    # at precision "double" every product arrives here as two sum items; an item sends (and masks) the operands
    # no earlier item of the round sent: its E and F stand for those
    def sum_products(self, items):
        seen_u: set[int] = set()
        seen_v: set[int] = set()
        for i, it in enumerate(items):
            u = [a for a, _ in it.terms if id(a) not in seen_u][0]
            v = [b for _, b in it.terms if id(b) not in seen_v][0]
            seen_u.add(id(u))
            seen_v.add(id(v))
            self.truth[(self.round + 1, i)] = (u.x.copy(), v.x.copy())
        return super().sum_products(items)


@pytest.fixture(scope="module")
def views():
    rt = runtime()
    log: list = []
    accs = {a: Recorder(a, log) for a in TRAIN_ACCELERATORS}
    x, y = data(16)
    tr = Trainer(small_cnn(5), {"x": x}, y, cfg(epochs=1))
    eng = DirectSecureMatmul.make(rt, accs)
    eng.__class__ = type("TruthDirect", (eng.__class__, Truth), {})
    eng.truth = {}
    tr.step(eng)
    tr.step(eng)  # second step: weights updated by private gradients
    return log, eng.truth


def test_every_accelerator_input_is_uncorrelated_with_data_weights_and_gradients(views):
    """Forward (data x weights) and backward (gradients x weights, gradients x data) products of two
    steps: |Pearson r| < 5/sqrt(n) between each plaintext operand and what each accelerator received
    in its place (false failure ~6e-7 per pair)."""
    log, truth = views
    checked = 0
    for name, rnd, item, arrays in log:
        u, v = truth[(rnd, item)]
        pairs = [("e", u), ("f", v)] if "e" in arrays else [("a", u), ("b", v)]
        for key, plain in pairs:
            seen = arrays[key]
            assert seen.shape == plain.shape
            if plain.std() == 0 or seen.size < 30:
                continue
            r = pearson(plain, seen)
            assert abs(r) < 5 / np.sqrt(plain.size), (name, rnd, key, r)
            checked += 1
    assert checked >= 2 * 3 * 8 * 2 - 12  # two steps, three accelerators, eight products, two operands


def test_every_accelerator_input_is_uniform_on_the_field(views):
    log, _ = views
    for name in TRAIN_ACCELERATORS:
        vals = np.concatenate([a.ravel() for n, _, _, arrs in log if n == name for a in arrs.values()])
        assert vals.size > 5000
        assert chi2_uniform(vals) < 130, name  # chi2(63): P(> 130) ~ 1e-6


def test_constant_data_and_weights_still_look_uniform():
    rt = runtime()
    log: list = []
    accs = {a: Recorder(a, log) for a in TRAIN_ACCELERATORS}
    eng = DirectSecureMatmul.make(rt, accs)
    u, v = np.ones((40, 60)), np.full((60, 30), 0.25)
    out = eng.matmul(u, v)
    np.testing.assert_allclose(out, u @ v, rtol=1e-6)
    eng.matmul(u, v)
    for name in TRAIN_ACCELERATORS:
        vals = np.concatenate([a.ravel() for n, _, _, arrs in log if n == name for a in arrs.values()])
        assert chi2_uniform(vals) < 130, name
    first, second = [arrs for n, _, _, arrs in log if n == "accelerator0"]
    assert not np.array_equal(first["e"], second["e"])  # fresh masks for the same product


# --- cheating accelerators ----------------------------------------------------------------------
class Cheater(TrainAccelerator):
    def __init__(self, at_round: int, row: int = 0, col: int = 0, delta: int = 1):
        super().__init__("numpy")
        self.at_round, self.row, self.col, self.delta = at_round, row, col, delta

    def product(self, item):
        z = super().product(item)
        if self.requests + 1 == self.at_round and int(item["id"]) == 0:
            z = z.copy()
            r, c = self.row % z.shape[0], self.col % z.shape[1]
            z[r, c] = (z[r, c] + self.delta) % P
        return z


@pytest.mark.parametrize("acc", TRAIN_ACCELERATORS)
@pytest.mark.parametrize("rnd,phase", [(1, "forward conv"), (3, "forward linear"), (4, "backward linear"),
                                       (6, "backward first conv")])
def test_a_wrong_product_is_caught_in_forward_and_backward(acc, rnd, phase):
    rt = runtime()
    x, y = data(8)
    tr = Trainer(small_cnn(1), {"x": x}, y, cfg(epochs=1))
    with pytest.raises(IntegrityError, match=f"{acc}.*round {rnd}"):
        train_offload_local(tr, rt, steps=1, accelerator_factory=lambda name: Cheater(rnd) if name == acc
                            else TrainAccelerator("numpy"))
    assert tr.step_count == 0  # the step never completed: no update from a wrong product


def test_every_single_element_lie_is_caught_over_many_positions():
    """One product (backward dW of the linear layer), a +d lie at 40 random positions, each accelerator."""
    rt = runtime()
    g = np.random.default_rng(9)
    u, v = g.normal(size=(5, 16)), g.normal(size=(16, 8))
    for acc in TRAIN_ACCELERATORS:
        for _ in range(40):
            accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
            accs[acc] = Cheater(1, int(g.integers(0, 99)), int(g.integers(0, 99)), int(g.integers(1, P)))
            eng = DirectSecureMatmul.make(rt, accs)
            with pytest.raises(IntegrityError, match=acc):
                eng.matmul(u, v)


def test_malformed_or_missing_answers_are_clear_errors():
    rt = runtime()

    class Wrong(TrainAccelerator):
        def handle(self, msg):
            return {"type": "result", "round": msg.get("round"), "items": [np.zeros((2, 2), np.uint32)]}

    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    accs["accelerator1"] = Wrong("numpy")
    eng = DirectSecureMatmul.make(rt, accs)
    with pytest.raises(VeilError, match="accelerator1.*shape"):
        eng.matmul(np.ones((3, 4)), np.ones((4, 5)))


# --- reproducibility, checkpoints, faults -------------------------------------------------------
def test_one_training_step_is_bit_for_bit_reproducible_from_the_seed():
    """Two runs with independent enclave randomness (different masks) give identical parameters."""
    x, y = data(16)
    outs = []
    for _ in range(2):
        tr = Trainer(small_cnn(1), {"x": x}, y, cfg(optimizer={"name": "adam", "lr": 0.01}))
        train_offload_local(tr, runtime(), steps=1)
        outs.append(tr.net.params)
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k
    init = TrainGraph(small_cnn(1)).params
    assert all(not np.array_equal(outs[0][k], init[k]) for k in init)  # the step changed every parameter


def test_resume_from_a_sealed_checkpoint_equals_the_uninterrupted_run(tmp_path):
    x, y = data(24)
    key = tmp_path / "sealing.key"
    full = Trainer(small_cnn(2), {"x": x}, y, cfg())
    train_offload_local(full, runtime(key))
    assert full.step_count == 6  # 2 epochs x 3 batches

    first = Trainer(small_cnn(2), {"x": x}, y, cfg())
    ck = tmp_path / "run.ckpt"
    train_offload_local(first, runtime(key), steps=4, checkpoint=ck, checkpoint_every=2)  # stops mid-epoch 2
    second = Trainer(small_cnn(2), {"x": x}, y, cfg())
    second.resume(ck, runtime(key))  # a new enclave process: same sealing key, fresh everything else
    assert (second.epoch, second.pos, second.step_count) == (1, 1, 4)
    train_offload_local(second, runtime(key))
    assert second.history == full.history
    for k in full.net.params:
        assert np.array_equal(second.net.params[k], full.net.params[k]), k
    for k, v in full.opt.state.items():
        assert np.array_equal(second.opt.state[k], v), k


def test_checkpoints_are_sealed_bound_to_the_job_and_tamper_evident(tmp_path):
    x, y = data(24)
    key = tmp_path / "sealing.key"
    tr = Trainer(small_cnn(2), {"x": x}, y, cfg())
    ck = tmp_path / "run.ckpt"
    tr.save(ck, runtime(key))
    raw = ck.read_bytes()
    assert b"c1/W" not in raw  # sealed: parameter names (and values) are not readable
    with pytest.raises(SealError):
        Trainer(small_cnn(2), {"x": x}, y, cfg()).resume(ck, runtime(tmp_path / "other.key"))
    with pytest.raises(SealError):  # another job (different settings) cannot use it
        Trainer(small_cnn(2), {"x": x}, y, cfg(batch_size=4)).resume(ck, runtime(key))
    ck.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(SealError):
        Trainer(small_cnn(2), {"x": x}, y, cfg()).resume(ck, runtime(key))


class DiesAfter(TrainAccelerator):
    """Answers ``n`` rounds, then its process 'dies' (the channel closes)."""

    def __init__(self, n: int):
        super().__init__("numpy")
        self.n = n

    def handle(self, msg):
        if self.requests >= self.n and isinstance(msg, dict) and msg.get("type") == "tmatmul":
            return None  # stops serving: its channel closes, as when the process is killed
        return super().handle(msg)


def test_an_accelerator_killed_mid_epoch_is_a_clear_error_and_the_checkpoint_survives(tmp_path):
    x, y = data(24)
    key, ck = tmp_path / "sealing.key", tmp_path / "run.ckpt"
    tr = Trainer(small_cnn(2), {"x": x}, y, cfg())
    # 6 rounds per step; dies in the forward pass of step 3 (after step 2's checkpoint)
    with pytest.raises(AcceleratorUnavailableError, match="accelerator2"):
        train_offload_local(tr, runtime(key), checkpoint=ck, checkpoint_every=1, timeout=10,
                            accelerator_factory=lambda n: DiesAfter(14) if n == "accelerator2" else TrainAccelerator("numpy"))
    assert tr.step_count == 2
    again = Trainer(small_cnn(2), {"x": x}, y, cfg())
    again.resume(ck, runtime(key))
    assert again.step_count == 2 and again.history == tr.history
    for k in tr.net.params:
        assert np.array_equal(again.net.params[k], tr.net.params[k])

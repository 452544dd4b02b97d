"""Offload training's product precision (``single``: one secure field product per product, ``double``:
three in the same round) against float64, what the accelerators see at ``double``, and the settings
checks of ``TrainConfig`` / ``veil offload train`` (bad settings refused before anything starts, the
offload plan said at start, the default data)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from offload_train_helpers import DirectSecureMatmul, runtime, small_cnn
from veil.errors import IntegrityError, VeilError
from veil.offload.field import P
from veil.offload.training import TRAIN_ACCELERATORS, PlainMatmul, TrainAccelerator, TrainConfig, Trainer
from veil.offload.training.precision import (
    SECURE_PRODUCTS,
    PrecisionMatmul,
    normalise_exponents,
    split_items,
    split_pair,
)
from veil.offload.training.protocol import choose_scales

#: stated bound, double: max_ij |C_ij - (U V)_ij| / (||U row i|| ||V col j||) (measured <= 2.5e-7 up to k = 50000)
DOUBLE_BOUND = 1e-6


def normwise_error(out: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    ref = u @ v
    den = np.sqrt((u * u).sum(1))[:, None] * np.sqrt((v * v).sum(0))[None, :]
    return float((np.abs(out - ref) / np.maximum(den, 1e-300)).max())


def operands() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(11)
    n, k, m = 24, 800, 20
    return {
        "gaussian": (g.normal(size=(n, k)), g.normal(size=(k, m))),
        # adversarial: 12 decades between rows of U and between columns of V (one scale per matrix fails)
        "rows and columns over 1e-6..1e6": (g.normal(size=(n, k)) * 10.0 ** g.uniform(-6, 6, (n, 1)),
                                            g.normal(size=(k, m)) * 10.0 ** g.uniform(-6, 6, (1, m))),
        # adversarial: 8 decades between the entries of every row
        "entries over 1e-4..1e4": (g.normal(size=(n, k)) * 10.0 ** g.uniform(-4, 4, (n, k)),
                                   g.normal(size=(k, m)) * 10.0 ** g.uniform(-4, 4, (k, m))),
        "relu activations x small gradients": (np.maximum(g.normal(size=(n, k)), 0), g.normal(size=(k, m)) * 1e-3),
        "inner dimension 30000 (a dW of C)": (g.normal(size=(6, 30000)), np.maximum(g.normal(size=(30000, 5)), 0)),
        "constant": (np.full((n, k), 0.3), np.full((k, m), -7.0)),
        "zero rows": (np.vstack([np.zeros((3, k)), g.normal(size=(n - 3, k))]), g.normal(size=(k, m))),
    }


@pytest.fixture(scope="module")
def engines():
    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    rt = runtime()
    return {p: PrecisionMatmul(DirectSecureMatmul.make(rt, accs), p) for p in ("single", "double")}


def test_double_precision_error_is_below_the_stated_bound_and_far_below_single(engines):
    for name, (u, v) in operands().items():
        e1 = normwise_error(engines["single"].matmul(u, v), u, v)
        e2 = normwise_error(engines["double"].matmul(u, v), u, v)
        assert e2 < DOUBLE_BOUND, (name, e2)
        if name != "zero rows" or e1 > 0:
            assert e2 < e1 / 50, (name, e1, e2)
    # single's error is what the docs say (~1e-3 relative to the largest output on C-like shapes)
    u, v = operands()["inner dimension 30000 (a dW of C)"]
    ref = u @ v
    rel1 = np.abs(engines["single"].matmul(u, v) - ref).max() / np.abs(ref).max()
    rel2 = np.abs(engines["double"].matmul(u, v) - ref).max() / np.abs(ref).max()
    assert rel1 > 1e-4 and rel2 < rel1 / 50


def test_the_high_part_product_is_exact_in_the_field():
    g = np.random.default_rng(2)
    for u, v in ((g.normal(size=(9, 700)), g.normal(size=(700, 4))),
                 (g.normal(size=(9, 30)) * 10.0 ** g.uniform(-3, 3, (9, 30)), g.normal(size=(30, 4)))):
        a, b = normalise_exponents(u, 1), normalise_exponents(v, 0)
        un, vn = np.ldexp(u, a[:, None]), np.ldexp(v, b[None, :])
        assert np.all((np.sqrt((un * un).sum(1)) >= 0.5) & (np.sqrt((un * un).sum(1)) < 1))
        uh, ul, vh, vl = split_pair(un, vn)
        assert np.array_equal(uh + ul, un) and np.array_equal(vh + vl, vn)
        (o_uh, o_vh), = split_items(un, vn)[0].terms  # the high item: U_h, V_h at their fractional bits
        assert np.array_equal(o_uh.x, uh) and np.array_equal(o_vh.x, vh)
        fu, fv = o_uh.frac, o_vh.frac  # the protocol quantises (uh, vh) at these scales: no rounding
        assert np.array_equal(np.rint(np.ldexp(uh, fu)), np.ldexp(uh, fu))
        assert np.array_equal(np.rint(np.ldexp(vh, fv)), np.ldexp(vh, fv))
        # ... and the pair is inside the field (Cauchy-Schwarz, exact in Python integers)
        q = np.rint(np.ldexp(uh, fu)).astype(object).dot(np.rint(np.ldexp(vh, fv)).astype(object))
        assert max(abs(int(z)) for z in q.ravel()) < (P - 1) // 2
        assert fu + fv >= sum(choose_scales(un, vn)) - 1  # about as many bits as one product of (U, V)
        assert np.abs(ul).max() <= np.abs(un).max() * 2.0**-8


def test_products_kept_in_the_enclave_are_not_split(engines):
    rt = runtime()
    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    inner = DirectSecureMatmul.make(rt, accs)
    inner.min_intensity = 16.0
    eng = PrecisionMatmul(inner, "double")
    g = np.random.default_rng(0)
    small, big = (g.normal(size=(4, 3)), g.normal(size=(3, 5))), (g.normal(size=(100, 200)), g.normal(size=(200, 100)))
    out = eng.matmuls([small, big])
    # one model product offloaded as two secure products (U_h V_h and the cross sum), one kept inside
    assert inner.counters["products"] == 2 and inner.counters["local_products"] == 1
    assert eng.counters is inner.counters and eng.counters["split_products"] == 1
    assert inner.counters["freivalds_checks"] >= 2
    assert np.array_equal(out[0], small[0] @ small[1])
    assert normwise_error(out[1], *big) < DOUBLE_BOUND


# --- what the accelerators see at double precision ----------------------------------------------------
class Recorder(TrainAccelerator):
    def __init__(self, log: list):
        super().__init__("numpy")
        self.log = log

    def product(self, item):
        self.log.append({k: v.copy() for k, v in item.items() if isinstance(v, np.ndarray)}
                        | {"terms": item.get("terms")})
        return super().product(item)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_at_double_precision_every_accelerator_view_is_uniform_and_uncorrelated():
    """At double each product is two secure products, the exact ``U_h V_h`` and the cross sum
    ``U_l V_h + U_h V_l``, which reuses the masked ``U_h`` and ``V_h``: every operand is masked and sent once.
    What each share holder receives in an item is uncorrelated with every plaintext operand of the item's terms
    (its own and the reused ones) and with what it received for the reused operands; every view is uniform."""
    logs: dict[str, list] = {a: [] for a in TRAIN_ACCELERATORS}
    inner = DirectSecureMatmul.make(runtime(), {a: Recorder(logs[a]) for a in TRAIN_ACCELERATORS})
    truth: list[dict] = []
    sent = inner.sum_products

    def spy(items):  # per item: its own (new) operands and every operand of its terms, as plaintext
        seen_u: set[int] = set()
        seen_v: set[int] = set()
        for it in items:
            own_u = [a for a, _ in it.terms if id(a) not in seen_u][0]
            own_v = [b for _, b in it.terms if id(b) not in seen_v][0]
            seen_u.add(id(own_u))
            seen_v.add(id(own_v))
            truth.append({"e": own_u.x.copy(), "f": own_v.x.copy(), "us": [a.x.copy() for a, _ in it.terms],
                          "vs": [b.x.copy() for _, b in it.terms]})
        return sent(items)

    inner.sum_products = spy
    g = np.random.default_rng(4)
    x, y = g.normal(size=(16, 1, 8, 8)).astype(np.float32), g.integers(0, 5, 16)
    tr = Trainer(small_cnn(5), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                                                        batch_size=8, precision="double"))
    tr.step(inner)
    tr.step(inner)
    assert len(truth) == 2 * inner.counters["split_products"] == inner.counters["products"] > 0
    for acc in TRAIN_ACCELERATORS:
        assert len(logs[acc]) == len(truth)
        # one sum item per split product, naming the E of U_h and the F of V_h of the item before it
        sums = [rec["terms"] for rec in logs[acc] if rec["terms"] is not None]
        assert len(sums) == inner.counters["split_products"]
        assert all(len(t) == 2 and t[0][0] == "e" and t[1][1] == "f" for t in sums), sums
        arrays = [a.ravel() for rec in logs[acc] for k, a in rec.items() if isinstance(a, np.ndarray)]
        if acc == "accelerator2":
            assert not arrays  # the triple helper gets only seeds of the masks (nothing derived from data)
            continue
        assert len(arrays) == 2 * len(truth)  # every masked operand arrives once: 4 per split product, not 6
        vals = np.concatenate(arrays).astype(np.int64)
        counts = np.bincount((vals * 64) // P, minlength=64)
        chi2 = float(((counts - vals.size / 64) ** 2 / (vals.size / 64)).sum())
        assert chi2 < 130, (acc, chi2)  # 63 degrees of freedom: P(chi2 > 130) ~ 1e-6
    checked = 0
    for acc in ("accelerator0", "accelerator1"):
        for i, (rec, tru) in enumerate(zip(logs[acc], truth, strict=True)):
            for key, plains in (("e", tru["us"]), ("f", tru["vs"])):
                got = rec[key]
                assert got.shape == tru[key].shape
                if got.size < 30:
                    continue
                others = [logs[acc][i - 1][key]] if rec["terms"] is not None else []  # the reused operand's view
                for plain in [*plains, *others]:
                    if plain.std() > 0:
                        r = _pearson(got, plain)
                        assert abs(r) < 5 / np.sqrt(plain.size), (acc, i, key, r)
                        checked += 1
    assert checked >= 60


class Liar(TrainAccelerator):
    def product(self, item):
        z = super().product(item)
        z[0, 0] = (int(z[0, 0]) + 1) % P
        return z


@pytest.mark.parametrize("liar", TRAIN_ACCELERATORS)
def test_at_double_precision_a_wrong_product_is_still_caught(liar):
    accs = {a: (Liar if a == liar else TrainAccelerator)("numpy") for a in TRAIN_ACCELERATORS}
    g = np.random.default_rng(1)
    x, y = g.normal(size=(8, 1, 8, 8)).astype(np.float32), g.integers(0, 5, 8)
    tr = Trainer(small_cnn(1), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.1}, batch_size=8))
    before = {k: v.copy() for k, v in tr.net.params.items()}
    with pytest.raises(IntegrityError, match=liar):
        tr.step(DirectSecureMatmul.make(runtime(), accs))
    assert all(np.array_equal(before[k], tr.net.params[k]) for k in before)


def test_a_double_precision_step_tracks_float64_far_closer_than_single():
    g = np.random.default_rng(6)
    x, y = g.normal(size=(16, 1, 8, 8)).astype(np.float32), g.integers(0, 5, 16)
    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}

    def params(engine, precision):
        tr = Trainer(small_cnn(2), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                                                            batch_size=16, precision=precision))
        for _ in range(3):
            tr.step(engine)
        return tr.net.params

    ref = params(PlainMatmul(), "double")
    dev = {p: max(float(np.abs(params(DirectSecureMatmul.make(runtime(), accs), p)[k] - ref[k]).max()
                        / np.abs(ref[k]).max()) for k in ref) for p in ("single", "double")}
    assert dev["double"] < 1e-6 and dev["double"] < dev["single"] / 50, dev


@pytest.mark.parametrize("precision, net", [("double", "cnn"), ("single", "mlp")])
def test_the_arithmetic_engine_reproduces_the_protocol_bit_for_bit(precision, net):
    """The benchmark's accuracy runs may use FieldArithmeticMatmul: same parameters as the protocol, bit for bit
    (at double, convolutions too; at single for products: the secure engine's single-precision convolutions
    are masked as tensors with their own scale rule, which this engine does not reproduce)."""
    from offload_train_helpers import small_residual
    from veil.offload.training.precision import FieldArithmeticMatmul

    g = np.random.default_rng(8)
    if net == "cnn":
        graph, feeds, y, loss = small_cnn(3), {"x": g.normal(size=(16, 1, 8, 8)).astype(np.float32)}, \
            g.integers(0, 5, 16), "cross_entropy"
    else:
        graph, loss = small_residual(3), "bce"
        feeds = {"cat0": np.eye(6, dtype=np.float32)[g.integers(0, 6, 16)],
                 "dense": g.normal(size=(16, 3)).astype(np.float32)}
        y = g.integers(0, 2, 16)
    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    runs = []
    for eng in (DirectSecureMatmul.make(runtime(), accs), FieldArithmeticMatmul()):
        tr = Trainer(graph, feeds, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                                                  batch_size=8, precision=precision, loss=loss))
        for _ in range(3):
            tr.step(eng)
        runs.append((tr.history, tr.net.params, eng.counters["products"]))
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
    for k in runs[0][1]:
        assert np.array_equal(runs[0][1][k], runs[1][1][k]), k


# --- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"optimizer": {"name": "nope", "lr": 0.1}}, "unknown optimizer 'nope'"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "momentum": -1}}, "momentum"),
    ({"optimizer": {"name": "sgd", "lr": float("nan")}}, "lr"),
    ({"optimizer": {"name": "adam", "lr": 0.1, "gamma": 2}}, "bad optimizer settings"),
    ({"precision": "quad"}, "unknown product precision 'quad'"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_training_settings_are_refused_naming_them(change, words):
    d = {"optimizer": {"name": "sgd", "lr": 0.1}, **change}
    with pytest.raises(VeilError, match=words.replace("(", r"\(")):
        TrainConfig.from_dict(d)


def test_cli_refuses_bad_settings_before_starting_anything(tmp_path):
    from veil.cli.main import app

    for args, words in ((["--optimizer", "nope"], "unknown optimizer 'nope'"),
                        (["--precision", "quad"], "unknown product precision"),
                        (["--min-intensity", "-1"], "min_intensity must be >= 0"),
                        (["--optimizer", "sgd", "--momentum", "-0.5"], "momentum")):
        r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation", "--workdir",
                                     str(tmp_path / "wd"), *args])
        assert r.exit_code != 0 and isinstance(r.exception, VeilError), (args, r.output)
        assert words in str(r.exception), (words, str(r.exception))
        assert not (tmp_path / "wd").exists()  # no deployment, keys or process was started


@pytest.fixture
def no_training(monkeypatch):
    """``veil offload train`` up to the point where it would start the parties."""
    import veil.offload.training.launch as launch

    def stop(*a, **k):
        raise VeilError("parties not started (test)")

    monkeypatch.setattr(launch, "run_train_deployment", stop)


def test_cli_says_how_many_products_are_offloaded_and_warns_when_none_is(no_training, monkeypatch):
    from veil.cli.main import app

    monkeypatch.setenv("COLUMNS", "300")
    # B at batch 16: its convolutions' tensor items pass the default 16 (conv1 forward and dW at 23.0, conv2's
    # three at 109.9), its linear products (at most 13.1) do not
    r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation", "--data", "mnist-slice",
                                 "--batch-size", "16"])
    assert "5 offloaded to the accelerators (10 secure products at precision double), 6 kept" in r.output, r.output
    assert "nothing is offloaded" not in r.output
    r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation", "--data", "mnist-slice",
                                 "--batch-size", "16", "--min-intensity", "200"])
    assert "0 offloaded to the accelerators" in r.output and "11 kept inside the enclave" in r.output, r.output
    assert "nothing is offloaded" in r.output and "--min-intensity 0" in r.output
    assert "the highest arithmetic intensity of B at batch 16 is 109.9" in r.output, r.output
    r = CliRunner().invoke(app, ["offload", "train", "C", "--hazmat-allow-simulation", "--data", "mnist-slice",
                                 "--batch-size", "64"])
    # the 4 forward/dW convolution products go as tensor items (their tensors' intensity passes the rule; their
    # im2col matrices' would not), fc1's forward and dW and fc2's forward and dW: 8, measured on a real step below
    assert "8 offloaded to the accelerators (16 secure products at precision double), 3 kept" in r.output, r.output
    assert "nothing is offloaded" not in r.output
    r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation", "--data", "mnist-slice",
                                 "--batch-size", "16", "--min-intensity", "0", "--precision", "single"])
    assert "11 offloaded to the accelerators (11 secure products at precision single), 0 kept" in r.output, r.output


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("min_intensity", [0.0, 4.0, 6.0, 12.0])
def test_the_printed_plan_counts_what_a_real_step_sends(precision, min_intensity):
    """``Trainer.product_plan`` (what ``veil offload train`` prints) against the secure engine's counters on the
    same step: at 4 and 6 the convolutions' tensor items pass the rule while their im2col matrices would not."""
    g = np.random.default_rng(5)
    x, y = g.normal(size=(8, 1, 8, 8)).astype(np.float32), g.integers(0, 5, 8)
    tr = Trainer(small_cnn(5), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.05}, batch_size=8,
                                                        precision=precision))
    plan = tr.product_plan(min_intensity)
    inner = DirectSecureMatmul.make(runtime(), {a: TrainAccelerator() for a in TRAIN_ACCELERATORS})
    inner.min_intensity = min_intensity
    tr.step(PrecisionMatmul(inner, precision))
    c = inner.counters
    sent = sum(off for _, _, off in plan)
    assert c["products"] == SECURE_PRODUCTS[precision] * sent, (plan, dict(c))
    assert c.get("local_products", 0) == len(plan) - sent, (plan, dict(c))


def test_cli_default_data_is_the_training_slice_when_the_shared_file_is_there(no_training, monkeypatch, tmp_path):
    from veil.cli.main import app
    from veil.offload.training.data import mnist_path

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("VEIL_MNIST", str(tmp_path / "missing.npz"))
    r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation"])
    assert "data: mnist-slice" in r.output and "HELD-OUT" in r.output, r.output
    monkeypatch.delenv("VEIL_MNIST")
    if not mnist_path().is_file():
        pytest.skip(f"the shared MNIST file {mnist_path()} is not on this machine")
    r = CliRunner().invoke(app, ["offload", "train", "B", "--hazmat-allow-simulation"])
    assert "data: mnist (images 0..7999" in r.output, r.output


def test_cli_and_config_share_the_default_precision():
    from typer.main import get_command

    from veil.cli.main import app
    from veil.offload.training.precision import DEFAULT_PRECISION

    params = {p.name: p for p in get_command(app).commands["offload"].commands["train"].params}  # type: ignore[attr-defined]
    assert params["precision"].default == DEFAULT_PRECISION == TrainConfig(optimizer={"name": "sgd"}).precision
    assert params["data"].default == "auto" and params["min_intensity"].default == 16.0

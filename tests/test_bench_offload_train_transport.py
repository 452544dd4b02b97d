"""bench/bench_offload_train.py's accelerator transports: three accelerator processes over mutual TLS on
loopback give the same training step, bit for bit, as accelerator threads (and as the field arithmetic
requires: the masks cancel), each process reports the backend it was asked for, and none is left running."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_offload_train as bench  # noqa: E402
from offload_train_helpers import runtime, small_cnn  # noqa: E402
from veil.errors import VeilError  # noqa: E402
from veil.offload.training import TRAIN_ACCELERATORS, SecureMatmul, TrainConfig, Trainer  # noqa: E402


def _one_step(transport: str, backend: str = "numpy") -> tuple[float, dict, dict]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (6, 1, 8, 8)), rng.integers(0, 5, 6)
    tr = Trainer(small_cnn(0), {"x": x}, y, TrainConfig(optimizer={"name": "sgd", "lr": 0.1}, batch_size=6,
                                                        precision="single"))

    def session(ch):
        eng = SecureMatmul(ch, runtime(), timeout=120)
        try:
            return tr.step(eng), {k: v.copy() for k, v in tr.net.params.items()}
        finally:
            eng.close()

    (loss, params), accs = bench.run_with_accelerators(session, backend, transport, timeout=120)
    return loss, params, accs


def test_processes_and_threads_give_the_same_step() -> None:
    loss_t, params_t, accs_t = _one_step("threads")
    loss_p, params_p, accs_p = _one_step("processes")
    assert loss_p == loss_t
    assert params_p.keys() == params_t.keys()
    for k in params_t:
        assert np.array_equal(params_p[k], params_t[k]), k
    for accs in (accs_t, accs_p):
        assert sorted(accs) == sorted(TRAIN_ACCELERATORS)
        for name, (backend, log) in accs.items():
            assert backend == "numpy", name
            assert log and all(dt >= 0 for _, dt in log), name  # every accelerator computed its products


def test_unknown_backend_or_transport_fails_at_once() -> None:
    with pytest.raises(VeilError, match="unknown accelerator backend"):
        bench.run_with_accelerators(lambda ch: None, "tpu", "processes")
    with pytest.raises(SystemExit, match="threads or processes"):
        bench.run_with_accelerators(lambda ch: None, "numpy", "carrier-pigeon")

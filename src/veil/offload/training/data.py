"""Training data sets for offload training: MNIST (shared file or the shipped slice) and synthetic clicks.

MNIST: the project's file ``../shared/data/mnist_test.npz`` relative to the repository root, or the
path in ``VEIL_MNIST``; images 0..7999 train, 8000..9999 are held out (as for the shipped networks).
The shipped 256-image slice (``veil.assets``) serves the tests.

Synthetic click data (:func:`synthetic_clicks`), documented generator, deterministic in its seed:

* ``fields`` categorical features, field ``f`` with vocabulary ``vocab[f]``; category ids are drawn
  from a Zipf-like law (probability proportional to ``1 / (rank + 1)^1.1``), as click logs are skewed;
* ``dense`` real features, standard normal;
* the true click logit is ``bias + sum_f e_f[c_f] + (c_0 == c_1 mod 3) * 1.5 * sign-pattern`` (a
  cross-feature effect between fields 0 and 1) ``+ 0.8 * tanh(d . w) + 0.5 * d_0 d_1`` with effects
  ``e_f ~ N(0, 0.8^2)`` and ``w ~ N(0, 1/dense)``; ``bias`` sets a click rate of about 25 %;
* label ``y ~ Bernoulli(sigmoid(logit))``.

The model inputs are one-hot vectors per field (``cat0``, ``cat1``, ...; an embedding lookup is a
product of a one-hot row with the embedding table, so embeddings are ordinary linear layers here) and
the dense vector ``dense``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from veil.errors import VeilError

__all__ = ["REPO_ROOT", "mnist_path", "load_mnist", "ClickData", "synthetic_clicks", "one_hot_feeds"]

REPO_ROOT = Path(__file__).resolve().parents[4]
TRAIN_RANGE, HELDOUT_RANGE = (0, 8000), (8000, 10000)


def mnist_path() -> Path:
    """``$VEIL_MNIST``, else ``../shared/data/mnist_test.npz`` next to the repository root."""
    env = os.environ.get("VEIL_MNIST")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "mnist_test.npz"


def load_mnist(split: str = "train", path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N,1,28,28) in [0,1], y int64) of ``split`` 'train' (0..7999) or 'heldout' (8000..9999)."""
    p = Path(path) if path else mnist_path()
    if not p.is_file():
        raise VeilError(f"MNIST file not found at {p}; set VEIL_MNIST to the mnist_test.npz file")
    lo, hi = TRAIN_RANGE if split == "train" else HELDOUT_RANGE
    with np.load(p) as f:
        x, y = f["x_test"][lo:hi], f["y_test"][lo:hi]
    return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)


@dataclass
class ClickData:
    """Categorical ids (N, fields), dense features (N, dense), labels (N,), vocabulary sizes."""

    cats: np.ndarray
    dense: np.ndarray
    y: np.ndarray
    vocab: tuple[int, ...]

    def feeds(self, idx: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
        return one_hot_feeds(self.cats if idx is None else self.cats[idx], self.dense if idx is None else self.dense[idx],
                             self.vocab)


def one_hot_feeds(cats: np.ndarray, dense: np.ndarray, vocab: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Model inputs: ``cat{f}`` one-hot (N, vocab[f]) float32 per field, and ``dense`` float32."""
    out = {}
    for f, v in enumerate(vocab):
        oh = np.zeros((len(cats), v), np.float32)
        oh[np.arange(len(cats)), cats[:, f]] = 1.0
        out[f"cat{f}"] = oh
    out["dense"] = dense.astype(np.float32)
    return out


def synthetic_clicks(n: int, seed: int = 0, vocab: tuple[int, ...] = (20, 16, 12, 10), dense: int = 8) -> ClickData:
    """The seeded synthetic click data set described in the module docstring."""
    gen = np.random.default_rng(seed)
    eff = [gen.normal(0, 0.8, v) for v in vocab]
    w = gen.normal(0, 1 / np.sqrt(dense), dense)
    sign = gen.choice([-1.0, 1.0], size=(vocab[0], vocab[1]))
    data = np.random.default_rng([seed, 1])
    cats = np.stack([data.choice(v, size=n, p=(p := 1.0 / np.arange(1, v + 1) ** 1.1) / p.sum()) for v in vocab], 1)
    d = data.normal(size=(n, dense))
    logit = sum(eff[f][cats[:, f]] for f in range(len(vocab)))
    logit = logit + ((cats[:, 0] % 3) == (cats[:, 1] % 3)) * 1.5 * sign[cats[:, 0], cats[:, 1]]
    logit = logit + 0.8 * np.tanh(d @ w) + 0.5 * d[:, 0] * d[:, 1] - 1.3
    y = (data.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return ClickData(cats.astype(np.int64), d.astype(np.float32), y, tuple(vocab))

"""Field arithmetic of offload mode: exact limb products against Python big-integer references."""

from __future__ import annotations

import numpy as np
import pytest

from veil.offload.backend import NumpyBackend, TorchBackend, select_backend
from veil.offload.field import WEIGHT_BITS, P, centered, limbs_f64, mul_full, to_field, uniform_field
from veil.plain import kernels as K

BACKENDS = [NumpyBackend(), TorchBackend("cpu")]


def exact_matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a @ b.T) mod p with Python integers (object arrays): the reference."""
    return (a.astype(object) @ b.T.astype(object)) % P


def test_uniform_field_is_deterministic_in_range_and_seed_dependent() -> None:
    a, b = uniform_field(b"\x01" * 32, 10_000), uniform_field(b"\x01" * 32, 10_000)
    c = uniform_field(b"\x02" * 32, 10_000)
    assert (a == b).all() and not (a == c).all()
    assert a.min() >= 0 and a.max() < P


def test_uniform_field_passes_chi_square_on_64_bins() -> None:
    # 64 equal bins of [0, p); chi-square with 63 dof: mean 63, sd ~11.2; 63 + 6 sd = 130
    z = uniform_field(b"\x07" * 32, 200_000)
    counts = np.bincount((z * 64) // P, minlength=64)
    exp = len(z) / 64
    assert ((counts - exp) ** 2 / exp).sum() < 130


def test_centered_inverts_to_field() -> None:
    v = np.array([-(P // 2), -5, -1, 0, 1, 7, P // 2], dtype=np.int64)
    assert (centered(to_field(v)) == v).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_linear_small_weights_exact(backend, rng) -> None:
    z = rng.integers(0, P, size=(7, 3000))
    w = rng.integers(-(2**WEIGHT_BITS), 2**WEIGHT_BITS + 1, size=(11, 3000))
    got = backend.linear(z, backend.prepare(w, full=False))
    assert (got.astype(object) == exact_matmul_t(z, to_field(w))).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_linear_full_field_weights_exact(backend, rng) -> None:
    z = rng.integers(0, P, size=(5, 4096))
    w = rng.integers(0, P, size=(9, 4096))
    got = backend.linear(z, backend.prepare(w, full=True))
    assert (got.astype(object) == exact_matmul_t(z, w)).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("full", [False, True])
def test_conv_exact_with_stride_and_asymmetric_pads(backend, full, rng) -> None:
    z = rng.integers(0, P, size=(2, 3, 9, 8))
    w = rng.integers(0, P, size=(4, 3, 3, 3)) if full else rng.integers(-4096, 4097, size=(4, 3, 3, 3))
    strides, pads = (2, 1), (1, 0, 2, 1)
    got = backend.conv2d(z, backend.prepare(w, full=full), strides, pads)
    cols = K.im2col(z, (3, 3), strides, pads)
    ref = exact_matmul_t(cols, to_field(w).reshape(4, -1))
    oh, ow = K.conv_out_hw(9, 8, (3, 3), strides, pads)
    ref = ref.reshape(2, oh, ow, 4).transpose(0, 3, 1, 2)
    assert got.shape == ref.shape and (got.astype(object) == ref).all()


def test_batched_full_products_for_freivalds(rng) -> None:
    y = rng.integers(0, P, size=(3, 6, 500))
    s = rng.integers(0, P, size=(3, 500, 2))
    hi, lo = limbs_f64(s)
    got = mul_full(NumpyBackend(), y, hi, lo, np.matmul)
    ref = np.stack([(y[i].astype(object) @ s[i].astype(object)) % P for i in range(3)])
    assert (got.astype(object) == ref).all()


def test_auto_backend_without_gpu_is_numpy_or_cuda() -> None:
    import torch

    assert select_backend("auto").name == ("torch-cuda" if torch.cuda.is_available() else "numpy")

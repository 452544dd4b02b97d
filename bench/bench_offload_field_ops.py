"""Per-element cost of the offload-training enclave's field kernels, before and after
``veil.offload.training.field_ops`` (one CPU thread, network C's operand sizes at batch 128).

Usage: ``OMP_NUM_THREADS=1 python bench/bench_offload_field_ops.py [--reps N]``

"before" is the previous int64/float64 implementation of each kernel (copied below, unchanged); "after"
is the kernel the protocol now calls (rows marked [new split]: before = the new masks_u32 and masked,
after = the fused mask_pair). Each row checks that both give identical arrays, then prints the
best of ``reps`` timings in ns per element and the ratio, all measured in this run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from veil.offload.field import HALF, P  # noqa: E402
from veil.offload.training import field_ops as F  # noqa: E402
from veil.offload.training import protocol  # noqa: E402
from veil.offload.training.conv_field import ConvSpec, conv_norms  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

_Z = np.zeros(0, np.uint8)


# --- the previous implementations (reference timings) ------------------------------------------------
def old_masks_u32(seed: bytes, count: int) -> np.ndarray:
    global _Z
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    if _Z.size < 4 * count:
        _Z = np.zeros(max(4 * count, 2 * _Z.size), np.uint8)
    buf = np.empty(count + 4, np.uint32)
    enc.update_into(_Z.data[:4 * count], buf.data.cast("B"))
    out = buf[:count]
    np.bitwise_and(out, np.uint32(0x7FFFFFFF), out=out)
    if count and int(out.max()) == P:
        bad = np.flatnonzero(out == P)
        while bad.size:
            fresh = np.frombuffer(enc.update(bytes(4 * bad.size)), dtype="<u4") & np.uint32(0x7FFFFFFF)
            out[bad] = fresh
            bad = bad[fresh == P]
    return out


def old_masked(q: np.ndarray, m0: np.ndarray, m1: np.ndarray) -> np.ndarray:
    x = q.astype(np.int64)
    x -= m0
    x -= m1
    x %= P
    return x.astype(np.uint32)


def old_lift(zs: list[np.ndarray]) -> np.ndarray:
    z = zs[0].astype(np.float64)
    for zj in zs[1:]:
        z += zj
    k = z * (1.0 / P)
    np.rint(k, out=k)
    k *= P
    z -= k
    return z


def old_rint_scaled(x: np.ndarray, f: int) -> np.ndarray:
    q = np.multiply(x, 2.0**f, dtype=np.float64)
    return np.rint(q, out=q)


def old_maxabs(x: np.ndarray) -> float:
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def old_exact_matvec(a: np.ndarray, amax: float, x: np.ndarray) -> np.ndarray:
    rows, cols = a.shape
    t = x.shape[1]
    bound = max(cols * max(amax, 1.0), 1.0)
    b = min(31, math.floor(53 - math.log2(bound) - 1e-9))
    nl = -(-31 // b)
    mask = (1 << b) - 1
    limbs = np.concatenate([(x >> (b * j)) & mask for j in range(nl)], axis=1).astype(np.float64)
    y = (a @ limbs).astype(np.int64) % P
    out = np.zeros((rows, t), np.int64)
    for j in range(nl):
        out = (out + y[:, j * t:(j + 1) * t] * pow(2, b * j, P)) % P
    return out


def old_choose_conv_scales(spec: ConvSpec, u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    ru, cv, length = conv_norms(spec, u, v)
    return protocol._scale_rule(ru, cv, old_maxabs(u), old_maxabs(v), length)


def conv_cases(g: np.random.Generator) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any]]]:
    """choose_conv_scales on network C's five convolution items at batch 128 (operands as sent)."""
    c1 = ((128, 1, 28, 28), (5, 5), (1, 1), (0, 0, 0, 0))
    c2 = ((128, 20, 12, 12), (5, 5), (1, 1), (0, 0, 0, 0))
    items = [("conv1 fwd", ConvSpec("fwd", *c1), g.random(c1[0]), g.standard_normal((25, 20))),
             ("conv2 fwd", ConvSpec("fwd", *c2), g.random(c2[0]), g.standard_normal((500, 50))),
             ("conv1 dW", ConvSpec("dw", *c1), g.standard_normal((20, 73728)), g.random(c1[0])),
             ("conv2 dW", ConvSpec("dw", *c2), g.standard_normal((50, 8192)), g.random(c2[0])),
             ("conv2 dX", ConvSpec("dx", *c2), g.standard_normal((8192, 50)), g.standard_normal((50, 500)))]
    return [(label, u.size + v.size, lambda sp=sp, u=u, v=v: old_choose_conv_scales(sp, u, v),
             lambda sp=sp, u=u, v=v: protocol.choose_conv_scales(sp, u, v)) for label, sp, u, v in items]


def old_mask_pair(uq: np.ndarray, vq: np.ndarray, s0: bytes, s1: bytes) -> tuple[np.ndarray, np.ndarray]:
    """What the enclave did per product: two mask streams, then E and F."""
    r0, r1 = old_masks_u32(s0, uq.size + vq.size), old_masks_u32(s1, uq.size + vq.size)
    nu = uq.size
    return (old_masked(uq, r0[:nu].reshape(uq.shape), r1[:nu].reshape(uq.shape)),
            old_masked(vq, r0[nu:].reshape(vq.shape), r1[nu:].reshape(vq.shape)))


def pair_cases(g: np.random.Generator) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any]]]:
    """Masks and masking of both operands of conv1's dW item and of fc1's forward product."""
    out: list[tuple[str, int, Callable[[], Any], Callable[[], Any]]] = []
    for label, su, sv in [("conv1 dW (U, X)", (20, 73728), (128, 1, 28, 28)), ("fc1 fwd (X, W^T)", (128, 800), (800, 500))]:
        uq, vq = np.rint(g.standard_normal(su) * 2.0**20), np.rint(g.standard_normal(sv) * 2.0**9)
        s0, s1 = bytes(range(32)), bytes(range(1, 33))
        out.append((label, uq.size + vq.size, lambda uq=uq, vq=vq, s0=s0, s1=s1: old_mask_pair(uq, vq, s0, s1),
                    lambda uq=uq, vq=vq, s0=s0, s1=s1: F.mask_pair(uq, vq, s0, s1)))
        out.append((label + " [new split]", uq.size + vq.size,
                    lambda uq=uq, vq=vq, s0=s0, s1=s1: new_split_pair(uq, vq, s0, s1),
                    lambda uq=uq, vq=vq, s0=s0, s1=s1: F.mask_pair(uq, vq, s0, s1)))
    return out


def new_split_pair(uq: np.ndarray, vq: np.ndarray, s0: bytes, s1: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The same with the new kernels, masks materialised (what protocol._offload does)."""
    r0, r1 = F.masks_u32(s0, uq.size + vq.size), F.masks_u32(s1, uq.size + vq.size)
    nu = uq.size
    return (F.masked(uq, r0[:nu].reshape(uq.shape), r1[:nu].reshape(uq.shape)),
            F.masked(vq, r0[nu:].reshape(vq.shape), r1[nu:].reshape(vq.shape)))


# --- timing --------------------------------------------------------------------------------------------
def best(fn: Callable[[], Any], reps: int) -> float:
    return best_time(fn, reps)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == np.ascontiguousarray(b).tobytes()
    return bool(a == b)


def kernel_cases(g: np.random.Generator, shape: tuple[int, int]) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(kernel, previous implementation, fast kernel) on random operands of ``shape``."""
    n = math.prod(shape)
    x = g.standard_normal(shape)
    q = np.rint(x * 2.0**26)
    m0, m1 = (g.integers(0, P, shape).astype(np.uint32) for _ in range(2))
    zs = [g.integers(0, P, shape).astype(np.uint32) for _ in range(3)]
    seed = bytes(range(32))
    s = g.integers(0, P, (shape[1], 1))
    return [
        ("masks_u32", lambda: old_masks_u32(seed, n), lambda: F.masks_u32(seed, n)),
        ("_masked", lambda: old_masked(q, m0, m1), lambda: F.masked(q, m0, m1)),
        ("_lift", lambda: old_lift(zs), lambda: F.lift(zs)),
        ("_rint_scaled", lambda: old_rint_scaled(x, 26), lambda: F.rint_scaled(x, 26)),
        ("_maxabs", lambda: old_maxabs(x), lambda: F.maxabs(x)),
        ("exact_matvec (result, HALF)", lambda: old_exact_matvec(q, HALF, s), lambda: F.exact_matvec(q, HALF, s)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    g = np.random.default_rng(0)
    sizes = {"conv1 dW  U (20 x 73728)": (20, 73728), "conv2 X (128x20x12x12)": (128, 2880),
             "fc1 W (500 x 800)": (500, 800)}
    rows = []
    for label, shape in sizes.items():
        n = math.prod(shape)
        cases = kernel_cases(g, shape)
        for name, before, after in cases:
            if not same(after(), before()):
                raise SystemExit(f"{name} on {label}: the fast kernel differs from the previous one")
            tb, ta = best(before, args.reps), best(after, args.reps)
            rows.append((name, label, tb * 1e9 / n, ta * 1e9 / n, tb / ta))
    for label, n, before, after in pair_cases(g):
        if not all(same(a, b) for a, b in zip(after(), before(), strict=True)):
            raise SystemExit(f"mask_pair on {label}: E or F differs")
        tb, ta = best(before, args.reps), best(after, args.reps)
        rows.append(("2 masks_u32 + 2 _masked -> mask_pair", label, tb * 1e9 / n, ta * 1e9 / n, tb / ta))
    for label, n, before, after in conv_cases(g):
        if after() != before():
            raise SystemExit(f"choose_conv_scales on {label}: the scales differ")
        tb, ta = best(before, args.reps), best(after, args.reps)
        rows.append(("choose_conv_scales", label + " (u+v elements)", tb * 1e9 / n, ta * 1e9 / n, tb / ta))
    print(f"{'kernel':38s} {'operand':30s} {'before ns/el':>12s} {'after ns/el':>12s} {'speed-up':>9s}")
    for name, label, b, a, r in rows:
        print(f"{name:38s} {label:30s} {b:12.2f} {a:12.2f} {r:8.1f}x")


if __name__ == "__main__":
    main()

"""Fixed-point encoding of reals into the ring Z_2^64 (two's complement, ``frac_bits`` fractional bits).

A real ``v`` is stored as ``round(v * 2**f) mod 2**64``. Products of two encodings carry ``2f``
fractional bits until truncated. The bounds below are derived from the configuration, not implicit:

* ``ring_limit = 2**62``: every secret value (at any scale) must satisfy ``|z| < 2**62`` so that the
  truncation and comparison protocols are exact (see :mod:`veil.mpc.kernels.trunc`).
* ``max_abs(scale)``: the largest real magnitude representable at ``scale`` fractional bits under
  that limit, i.e. ``2**(62 - scale)``. For the default ``f = 16``, a product (scale 32) may reach
  ``2**30`` and an activation (scale 16) ``2**46``.
* ``resolution = 2**-f``: encoding error is at most half of it; each truncation adds at most one ulp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from veil.errors import InputRangeError

__all__ = ["FixedPoint", "RING_BITS", "RING_LIMIT_BITS"]

RING_BITS = 64
RING_LIMIT_BITS = 62


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point format: ``frac_bits`` fractional bits in Z_2^64."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 4 <= self.frac_bits <= 28:
            raise ValueError(f"frac_bits must be in [4, 28] so that a product (2f bits) leaves integer headroom; got {self.frac_bits}")

    @property
    def resolution(self) -> float:
        return 2.0 ** -self.frac_bits

    def max_abs(self, scale: int | None = None) -> float:
        """Largest magnitude a value with ``scale`` fractional bits may take (default: 2f, a product)."""
        s = 2 * self.frac_bits if scale is None else scale
        return 2.0 ** (RING_LIMIT_BITS - s)

    def encode(self, x: np.ndarray, scale: int | None = None, what: str = "value") -> np.ndarray:
        """Encode reals at ``scale`` fractional bits (default f); :class:`InputRangeError` if out of range."""
        s = self.frac_bits if scale is None else scale
        x = np.asarray(x, dtype=np.float64)
        if x.size and not np.isfinite(x).all():
            raise InputRangeError(f"{what} contains NaN or infinite values; fixed point needs finite reals")
        lim = self.max_abs(s)
        if x.size and np.abs(x).max() >= lim:
            raise InputRangeError(
                f"{what} has magnitude {np.abs(x).max():.3g} but fixed point with {self.frac_bits} fractional bits "
                f"holds at most {lim:.3g} at scale 2^-{s}")
        return np.round(x * 2.0 ** s).astype(np.int64).view(np.uint64)

    def decode(self, z: np.ndarray, scale: int | None = None) -> np.ndarray:
        """Decode ring elements at ``scale`` fractional bits into float64."""
        s = self.frac_bits if scale is None else scale
        return np.asarray(z, dtype=np.uint64).view(np.int64).astype(np.float64) * 2.0 ** -s

"""Pseudo-random generation with explicit seeds and labels: AES-128 in counter mode.

Every stream is named: ``Prg(seed).words(label, shape)`` derives a fresh AES key from
``BLAKE2b(seed, label)`` and returns the keystream as uint64 words. A :class:`Prg` refuses to
produce the same label twice (:class:`~veil.errors.ProtocolError`), so correlated randomness
can never be reused by accident; ``labels`` lists what was drawn (tests check that two inferences
draw disjoint labels). There is no global generator anywhere in the mpc mode.

Seeds are 32 random bytes from ``os.urandom`` (:func:`new_seed`). Two parties holding the same
seed derive identical streams for the same labels: this is how the dealer's material is
seed-compressed (the dealer shares one seed with each server).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.errors import ProtocolError

__all__ = ["Prg", "new_seed"]


def new_seed() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return os.urandom(32)


class Prg:
    """A labelled stream generator over one seed (never reuses a label)."""

    def __init__(self, seed: bytes, check_reuse: bool = True):
        if not isinstance(seed, bytes | bytearray) or len(seed) < 16:
            raise ValueError("a Prg seed must be at least 16 bytes")
        self._seed = bytes(seed)
        self._check = check_reuse
        self.labels: set[str] = set()

    def __repr__(self) -> str:  # never print the seed
        return f"Prg(<seed>, {len(self.labels)} labels drawn)"

    def raw(self, label: str, nbytes: int) -> bytes:
        if self._check:
            if label in self.labels:
                raise ProtocolError(f"randomness label {label!r} drawn twice: correlated randomness is never reused")
            self.labels.add(label)
        key = hashlib.blake2b(label.encode(), key=self._seed, digest_size=16).digest()
        enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
        return enc.update(bytes(nbytes))

    def words(self, label: str, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform uint64 array."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.raw(label, 8 * n), np.uint64).reshape(shape).copy()

    def bytes_(self, label: str, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform uint8 array (packed random bits)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.raw(label, n), np.uint8).reshape(shape).copy()

"""The STIP weight transform, generic over families (see :mod:`veil.permute.families`).

Convention. A permutation is an index array ``p``; permuting a vector means ``x' = x[..., p]``
(as a matrix, ``x' = x P`` with ``P[p[j], j] = 1``). Un-permuting is indexing with ``argsort(p)``.

* hidden permutation ``pi`` (size d): the developer replaces every residual-stream axis of every
  weight by that axis indexed with ``pi``. Then ``f'(x[..., pi]) = f(x)[..., pi]`` for every layer:
  linear maps see ``x' W'^T = x W^T`` on their input side and produce permuted outputs on their
  output side; LayerNorm/RMSNorm statistics (mean, variance, mean square) are permutation invariant,
  and their gains and biases are permuted with the stream; attention, RoPE, GQA and the
  feed-forward hidden layer work on other axes and are untouched.
* vocabulary permutation ``sigma`` (size V, optional): the token embedding rows and the head rows
  are indexed with ``sigma``. Row ``s`` of the new table is the row of token ``sigma[s]``, so the user
  sends ``s = argsort(sigma)[t]`` for token ``t``, and logit ``j`` coming back belongs to token
  ``sigma[j]``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.permute.errors import KeyBundleError, UnsupportedFamilyError
from veil.permute.families import FamilyAdapter, supported_families

__all__ = ["PermutationKey", "generate_key", "transform_state_dict", "inverse", "check_permutation"]


def inverse(perm: np.ndarray) -> np.ndarray:
    """The inverse permutation (``x[..., p][..., inverse(p)] == x``)."""
    return np.argsort(perm, kind="stable").astype(np.int64)


def check_permutation(perm: np.ndarray, size: int, what: str) -> np.ndarray:
    """``perm`` as int64 if it is a permutation of ``range(size)``, else :class:`KeyBundleError`."""
    arr = np.asarray(perm)
    if arr.ndim != 1 or arr.shape[0] != size or arr.dtype.kind not in "iu":
        raise KeyBundleError(f"{what} permutation has shape {arr.shape} and dtype {arr.dtype}; expected ({size},) integers")
    arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(size, dtype=np.int64)):
        raise KeyBundleError(f"{what} permutation is not a permutation of 0..{size - 1}")
    return arr


@dataclass(frozen=True)
class PermutationKey:
    """The developer's secret: the hidden permutation, an optional vocabulary permutation, and a
    random public identifier that ties a key bundle to the transformed model made with it."""

    hidden: np.ndarray
    vocab: np.ndarray | None
    key_id: str

    @property
    def hidden_inverse(self) -> np.ndarray:
        return inverse(self.hidden)

    @property
    def vocab_inverse(self) -> np.ndarray | None:
        return None if self.vocab is None else inverse(self.vocab)


def generate_key(hidden_size: int, vocab_size: int | None = None, seed: int | None = None) -> PermutationKey:
    """Draw ``pi`` (and ``sigma`` when ``vocab_size`` is given) uniformly at random.

    Without ``seed`` the randomness comes from the OS (``secrets``); a seed is for tests only."""
    entropy = secrets.randbits(128) if seed is None else seed
    rng = np.random.default_rng(entropy)
    hidden = rng.permutation(hidden_size).astype(np.int64)
    vocab = rng.permutation(vocab_size).astype(np.int64) if vocab_size else None
    key_id = secrets.token_hex(16) if seed is None else f"seed-{seed:x}-{hidden_size}-{vocab_size or 0}"
    return PermutationKey(hidden=hidden, vocab=vocab, key_id=key_id)


def transform_state_dict(
    adapter: FamilyAdapter,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    key: PermutationKey,
    *,
    drop_roles: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The transformed weights: every residual axis indexed with ``key.hidden``, every vocabulary
    axis with ``key.vocab`` (when present). Parameters whose role is in ``drop_roles`` (``"embedding"``,
    ``"head"``) are left out, for the mode where the user holds them. A tied head is left out too
    (the model re-ties it on load).
    """
    d, vocab_size = adapter.hidden_size(config), adapter.vocab_size(config)
    hidden = torch.from_numpy(check_permutation(key.hidden, d, "hidden"))
    vocab = None if key.vocab is None else torch.from_numpy(check_permutation(key.vocab, vocab_size, "vocabulary"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if adapter.is_ignored(name):
            continue
        rule = adapter.rule_for(name)
        if rule.role in drop_roles or (rule.role == "head" and adapter.tied(config)):
            continue
        t = tensor.detach()
        for axis in rule.hidden:
            _check_axis(adapter, name, t, axis, d, "hidden size")
            t = t.index_select(axis, hidden)
        if vocab is not None:
            for axis in rule.vocab:
                _check_axis(adapter, name, t, axis, vocab_size, "vocabulary size")
                t = t.index_select(axis, vocab)
        out[name] = t.contiguous().clone()
    return out


def _check_axis(adapter: FamilyAdapter, name: str, t: torch.Tensor, axis: int, size: int, what: str) -> None:
    if t.dim() <= axis or t.shape[axis] != size:
        raise UnsupportedFamilyError(
            adapter.family, supported_families(),
            f"parameter {name!r} has shape {tuple(t.shape)}; expected axis {axis} to be the {what} {size}",
        )

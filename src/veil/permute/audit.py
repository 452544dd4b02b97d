"""Leakage audit: the attacks a careful reviewer runs against the permute mode, with recovery rates.

All attacks are run by the cloud (it holds the transformed weights and sees the traffic). The
developer's key is used only to score them.

1. ``column matching`` (knows: the public base model). Each hidden index of the transformed model
   owns one slice of every residual weight (a column of W_q, a row of W_o, a norm gain, ...). Matching
   those feature vectors against the base model's by correlation recovers ``pi``. With a privately
   fine-tuned model the attacker only has the base it started from; ``noise`` simulates that by
   adding Gaussian noise of ``noise`` times each tensor's standard deviation to the developer's
   weights before the transform.
2. ``frequency analysis`` (knows: which language / a sample of ordinary traffic). In ``vocab`` mode the
   cloud sees ``sigma``-permuted token ids: a substitution cipher. Mapping ids by frequency rank to a
   reference distribution recovers the frequent tokens; hill climbing on bigram likelihood, the
   classic way to break substitution ciphers, recovers more.
3. ``input inversion`` (knows: the public base model). In ``embed`` mode the cloud receives
   ``E[t][pi]``; with ``pi`` from attack 1 it un-permutes and finds the nearest row of the public
   embedding table: the user's tokens.
4. ``sorted-row matching`` (knows: the public embedding table only). A permutation does not change
   the multiset of values in a row, so sorting each received ``embed``-mode input row and finding the
   nearest sorted row of the public embedding table gives the user's tokens without ``pi`` at all.
5. ``embedding-row matching`` (knows: the public base model). In ``vocab`` mode the cloud holds
   ``E[sigma][:, pi]``; with ``pi`` from attack 1, nearest rows recover ``sigma`` without any traffic.

Not run here, but published: hidden states themselves can be inverted to tokens ("Hidden No More",
arXiv 2505.18332), which also holds for permuted hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.permute.families import FamilyAdapter
from veil.permute.transform import PermutationKey, transform_state_dict

__all__ = [
    "AuditResult",
    "hidden_features",
    "match_columns",
    "frequency_attack",
    "bigram_attack",
    "nearest_rows",
    "sorted_row_attack",
    "perturb",
    "run_audit",
    "public_checkpoint_verdict",
]


@dataclass(frozen=True)
class AuditResult:
    attack: str
    attacker_knows: str
    recovered: float  # fraction recovered, 0..1
    detail: str


def hidden_features(adapter: FamilyAdapter, state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """One feature row per hidden index: that index's slice of every single-hidden-axis parameter
    that has no vocabulary axis (those are reordered in ``vocab`` mode)."""
    parts = []
    for name in sorted(state_dict):
        if adapter.is_ignored(name):
            continue
        rule = adapter.rule_for(name)
        if len(rule.hidden) != 1 or rule.vocab:
            continue
        t = state_dict[name].detach().float()
        parts.append(t.movedim(rule.hidden[0], 0).reshape(t.shape[rule.hidden[0]], -1))
    return torch.cat(parts, dim=1).numpy().astype(np.float64)


def match_columns(base: np.ndarray, transformed: np.ndarray) -> np.ndarray:
    """Estimated ``pi``: for each transformed hidden index, the base index with the most correlated
    features (one-to-one by the Hungarian method when SciPy is present, else greedy argmax)."""
    def standardise(f):
        f = f - f.mean(axis=1, keepdims=True)
        return f / np.clip(np.linalg.norm(f, axis=1, keepdims=True), 1e-12, None)

    corr = standardise(transformed) @ standardise(base).T  # (d', d)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return corr.argmax(axis=1).astype(np.int64)
    rows, cols = linear_sum_assignment(-corr)
    est = np.empty(corr.shape[0], dtype=np.int64)
    est[rows] = cols
    return est


def frequency_attack(observed: np.ndarray, reference: np.ndarray, vocab_size: int) -> np.ndarray:
    """Estimated token for each permuted id: the i-th most frequent observed id is taken to be the
    i-th most frequent token of the reference sample (ties broken by id)."""
    obs = np.bincount(observed.ravel(), minlength=vocab_size)
    ref = np.bincount(reference.ravel(), minlength=vocab_size)
    obs_rank = np.lexsort((np.arange(vocab_size), -obs))
    ref_rank = np.lexsort((np.arange(vocab_size), -ref))
    guess = np.empty(vocab_size, dtype=np.int64)
    guess[obs_rank] = ref_rank
    return guess


def bigram_attack(observed: np.ndarray, reference: np.ndarray, vocab_size: int, top: int = 100,
                  sweeps: int = 4) -> np.ndarray:
    """Frequency analysis refined by bigrams, as for a substitution cipher: start from
    :func:`frequency_attack`, then hill-climb over swaps among the ``top`` most frequent ids to
    maximise the likelihood of the observed id bigrams under the reference bigram statistics.

    ``observed``/``reference``: (sequences, length) id arrays (bigrams never cross sequences)."""
    guess = frequency_attack(observed, reference, vocab_size)
    ocount = np.bincount(observed.ravel(), minlength=vocab_size)
    rcount = np.bincount(reference.ravel(), minlength=vocab_size)
    k = int(min(top, (ocount > 0).sum(), (rcount > 0).sum()))
    o_top = np.lexsort((np.arange(vocab_size), -ocount))[:k]
    r_top = np.lexsort((np.arange(vocab_size), -rcount))[:k]

    def bigrams(seqs: np.ndarray, top_ids: np.ndarray) -> np.ndarray:
        index = np.full(vocab_size, k)  # every other id shares bucket k
        index[top_ids] = np.arange(k)
        counts = np.zeros((k + 1, k + 1))
        for seq in np.atleast_2d(seqs):
            a = index[seq]
            np.add.at(counts, (a[:-1], a[1:]), 1)
        return counts

    c = bigrams(observed, o_top)
    r = bigrams(reference, r_top)
    log_p = np.log((r + 0.1) / (r.sum() + 0.1 * r.size))
    m = np.arange(k + 1)  # observed rank i -> reference rank m[i]; the shared bucket stays put
    best = float((c * log_p[np.ix_(m, m)]).sum())
    for _ in range(sweeps):
        improved = False
        for a in range(k):
            for b in range(a + 1, k):
                m[a], m[b] = m[b], m[a]
                score = float((c * log_p[np.ix_(m, m)]).sum())
                if score > best + 1e-9:
                    best, improved = score, True
                else:
                    m[a], m[b] = m[b], m[a]
        if not improved:
            break
    guess[o_top] = r_top[m[:k]]
    return guess


def nearest_rows(observed: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest (L2) row of ``table`` for each row of ``observed``."""
    obs = observed.astype(np.float64)
    tab = table.astype(np.float64)
    out = np.empty(len(obs), dtype=np.int64)
    tab_sq = (tab ** 2).sum(1)[None, :]
    for i in range(0, len(obs), 4096):
        chunk = obs[i:i + 4096]
        out[i:i + 4096] = ((chunk ** 2).sum(1)[:, None] - 2 * chunk @ tab.T + tab_sq).argmin(axis=1)
    return out


def sorted_row_attack(received: np.ndarray, public_table: np.ndarray) -> np.ndarray:
    """Token guesses for ``embed``-mode inputs without knowing ``pi``: each received row, sorted, is
    matched to the nearest sorted row of the public embedding table (a permutation keeps a row's
    values, only their order changes). A scale the model applies to its embeddings (Gemma's sqrt(d))
    is removed by normalising rows to unit length first."""
    def unit_sorted(rows: np.ndarray) -> np.ndarray:
        r = np.sort(rows.astype(np.float64), axis=-1)
        return r / np.clip(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12, None)

    return nearest_rows(unit_sorted(received), unit_sorted(public_table))


def public_checkpoint_verdict(source: Any, key: PermutationKey) -> list[AuditResult]:
    """What the cloud recovers if the original checkpoint is public (no fine-tuning): column matching
    for ``pi`` and, for an ``embed``-mode key, sorted-row matching of 256 random input tokens."""
    a, c = source.adapter, source.config
    base_sd = source.state_dict()
    transformed = transform_state_dict(a, c, base_sd, key)
    pi_hat = match_columns(hidden_features(a, base_sd), hidden_features(a, transformed))
    out = [AuditResult("column matching", "the public checkpoint", float(np.mean(pi_hat == key.hidden)),
                       f"pi entries of {len(key.hidden)}")]
    if key.vocab is None:
        emb = base_sd[a.embedding_name].float().numpy()
        tokens = np.random.default_rng(0).integers(0, emb.shape[0], 256)
        seen = emb[tokens][:, key.hidden] * np.float32(a.embedding_scale)
        guess = sorted_row_attack(seen, emb)
        out.append(AuditResult("sorted-row matching (embed mode)", "the public embedding table; inputs seen",
                               float(np.mean(guess == tokens)), "token positions of 256 random tokens"))
    return out


def perturb(state_dict: dict[str, torch.Tensor], noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Simulated private fine-tuning: each tensor plus noise * its std * N(0, 1)."""
    if noise == 0:
        return dict(state_dict)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state_dict.items():
        if t.is_floating_point() and t.numel() > 1:
            out[name] = t + noise * t.std() * torch.randn(t.shape, generator=g)
        else:
            out[name] = t
    return out


def _sample_traffic(source: Any, n_seq: int, length: int, seed: int) -> np.ndarray:
    """Token streams sampled from a decoder (temperature 1), standing in for ordinary traffic."""
    torch.manual_seed(seed)
    bos = source.config.bos_token_id if source.config.bos_token_id is not None else 0
    with torch.no_grad():
        out = source.model.generate(torch.full((n_seq, 1), bos), max_new_tokens=length, min_new_tokens=length,
                                    do_sample=True, top_k=0, temperature=1.0, eos_token_id=None, pad_token_id=0)
    return out[:, 1:].numpy()


def run_audit(
    source: Any,
    key: PermutationKey,
    noises: tuple[float, ...] = (0.0, 0.1, 1.0),
    traffic: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    n_seq: int = 16,
    length: int = 64,
) -> list[AuditResult]:
    """Run every attack that applies to ``source`` and this key; score against the key.

    ``traffic``/``reference``: token id arrays (user traffic and the attacker's reference sample);
    for decoders they are sampled from the model when not given."""
    a, c = source.adapter, source.config
    results = []
    base_sd = source.state_dict()
    base_f = hidden_features(a, base_sd)
    public_emb = base_sd[a.embedding_name].float().numpy()
    if traffic is None and a.is_decoder:
        traffic = _sample_traffic(source, n_seq, length, seed=123)
        reference = _sample_traffic(source, n_seq, length, seed=456)
    for noise in noises:
        private = perturb(base_sd, noise, seed=1)
        transformed = transform_state_dict(a, c, private, key)
        pi_hat = match_columns(base_f, hidden_features(a, transformed))
        results.append(AuditResult(
            "column matching", f"public base; noise {noise:g}",
            float(np.mean(pi_hat == key.hidden)), f"pi entries of {len(key.hidden)}",
        ))
        undo = np.argsort(pi_hat)
        if key.vocab is not None:
            cloud_rows = transformed[a.embedding_name].float().numpy()[:, undo]
            sigma_hat = nearest_rows(cloud_rows, public_emb)
            results.append(AuditResult(
                "embedding-row matching (vocab mode)",
                f"public base; noise {noise:g}; own embedding table; pi from column matching",
                float(np.mean(sigma_hat == key.vocab)), f"sigma entries of {len(key.vocab)}",
            ))
        if traffic is not None:
            private_emb = private[a.embedding_name].float().numpy()
            seen = private_emb[traffic.ravel()][:, key.hidden]  # what the cloud receives in embed mode
            tokens = nearest_rows(seen[:, undo], public_emb)
            results.append(AuditResult(
                "input inversion (embed mode)",
                f"public base; noise {noise:g}; inputs seen; pi from column matching",
                float(np.mean(tokens == traffic.ravel())), f"token positions of {traffic.size}",
            ))
            guess = sorted_row_attack(seen * np.float32(a.embedding_scale), public_emb)
            results.append(AuditResult(
                "sorted-row matching (embed mode)",
                f"public embedding table; noise {noise:g}; inputs seen; no pi needed",
                float(np.mean(guess == traffic.ravel())), f"token positions of {traffic.size}",
            ))
    if traffic is not None and reference is not None and (sigma_inv := key.vocab_inverse) is not None:
        observed = sigma_inv[traffic]
        guess = frequency_attack(observed, reference, a.vocab_size(c))
        decoded = guess[observed]
        distinct = np.unique(traffic)
        results.append(AuditResult(
            "frequency analysis (vocab mode)", f"{reference.size} reference tokens only (no weights)",
            float(np.mean(decoded == traffic)),
            f"token positions of {traffic.size}; distinct tokens right: "
            f"{int(np.sum(guess[sigma_inv[distinct]] == distinct))}/{len(distinct)}",
        ))
        guess2 = bigram_attack(observed, reference, a.vocab_size(c))
        results.append(AuditResult(
            "frequency + bigram hill climbing (vocab mode)", f"{reference.size} reference tokens only (no weights)",
            float(np.mean(guess2[observed] == traffic)),
            f"token positions of {traffic.size}; distinct tokens right: "
            f"{int(np.sum(guess2[sigma_inv[distinct]] == distinct))}/{len(distinct)}",
        ))
    return results

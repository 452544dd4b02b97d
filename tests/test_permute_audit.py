"""The leakage audit: the attacks must actually work where the mode is weak (and only there)."""

from __future__ import annotations

import numpy as np
import pytest

from veil.permute.audit import frequency_attack, hidden_features, match_columns, run_audit
from veil.permute.testing import random_gpt2, random_llama
from veil.permute.transform import generate_key, transform_state_dict


@pytest.fixture(scope="module")
def llama():
    return random_llama(seed=21, layers=2)


@pytest.mark.parametrize("make", [random_llama, random_gpt2])
def test_column_matching_recovers_pi_from_public_base(make):
    src = make(seed=4)
    a, c = src.adapter, src.config
    key = generate_key(a.hidden_size(c), seed=8)
    t = transform_state_dict(a, c, src.state_dict(), key)
    est = match_columns(hidden_features(a, src.state_dict()), hidden_features(a, t))
    assert np.array_equal(est, key.hidden)


def test_column_matching_against_an_unrelated_model_is_chance(llama):
    """Control: without the right base the attack finds nothing (expected 1/d right; bound 20%)."""
    a, c = llama.adapter, llama.config
    other = random_llama(seed=99, layers=2)
    key = generate_key(a.hidden_size(c), seed=8)
    t = transform_state_dict(a, c, llama.state_dict(), key)
    est = match_columns(hidden_features(a, other.state_dict()), hidden_features(a, t))
    assert np.mean(est == key.hidden) < 0.2


def zipf_recovery(p: np.ndarray, rng: np.random.Generator, n: int = 20_000) -> float:
    v = len(p)
    sigma = rng.permutation(v)
    traffic, reference = rng.choice(v, n, p=p), rng.choice(v, n, p=p)
    observed = np.argsort(sigma)[traffic]
    return float(np.mean(frequency_attack(observed, reference, v)[observed] == traffic))


def test_frequency_attack_breaks_skewed_token_streams_but_not_uniform_ones():
    """Over 10 trials each: Zipf(1.1) traffic over 197 tokens is mostly recovered (measured mean about
    0.63, minimum 0.57 over 20 trials), uniform traffic is not (mean about 0.006 = chance)."""
    rng = np.random.default_rng(2024)
    v = 197
    zipf = 1 / np.arange(1, v + 1) ** 1.1
    skewed = [zipf_recovery(zipf / zipf.sum(), rng) for _ in range(10)]
    uniform = [zipf_recovery(np.full(v, 1 / v), rng) for _ in range(10)]
    assert min(skewed) > 0.45
    assert max(uniform) < 0.05


def test_run_audit_reports_every_attack_with_rates(llama):
    a, c = llama.adapter, llama.config
    key = generate_key(a.hidden_size(c), a.vocab_size(c), seed=3)
    rng = np.random.default_rng(0)
    traffic = rng.integers(0, a.vocab_size(c), size=(4, 32))
    results = run_audit(llama, key, noises=(0.0, 5.0), traffic=traffic, reference=traffic[::-1].copy())
    names = [r.attack for r in results]
    assert names.count("column matching") == 2
    assert "frequency analysis (vocab mode)" in names
    by = {(r.attack, r.attacker_knows.split(",")[0]): r.recovered for r in results}
    assert all(0.0 <= r.recovered <= 1.0 for r in results)
    exact = [r for r in results if "noise 0" in r.attacker_knows or "+ 0 std" in r.attacker_knows]
    assert exact and all(r.recovered == 1.0 for r in exact), by


def test_bigram_hill_climbing_beats_plain_frequency_on_model_text():
    """On text sampled from stories260K (2048 tokens of traffic, 2048 of reference; seeds fixed), the
    bigram refinement recovers more positions than rank matching (measured here 0.18 -> 0.22; with
    4096 tokens each, 0.09 -> 0.32). It is a search, not a guarantee: on synthetic Markov chains it can
    also do worse than rank matching."""
    from veil.assets import stories260k_path
    from veil.permute import load_source
    from veil.permute.audit import _sample_traffic, bigram_attack

    src = load_source(stories260k_path())
    traffic, reference = _sample_traffic(src, 32, 64, seed=123), _sample_traffic(src, 32, 64, seed=456)
    sigma = np.random.default_rng(5).permutation(512)
    observed = np.argsort(sigma)[traffic]
    plain = np.mean(frequency_attack(observed, reference, 512)[observed] == traffic)
    refined = np.mean(bigram_attack(observed, reference, 512)[observed] == traffic)
    assert refined > plain, (plain, refined)


def test_sorted_row_attack_recovers_embed_mode_tokens_without_pi():
    """Sorting a received row undoes any permutation of it: every token of stories260K's table is
    recovered from E[t][pi] (rows are distinct). Control: rows permuted *differently* per token
    (which no exact transform can do) are not."""
    from veil.assets import stories260k_path
    from veil.permute import load_source
    from veil.permute.audit import sorted_row_attack

    src = load_source(stories260k_path())
    emb = src.state_dict()["model.embed_tokens.weight"].numpy()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, emb.shape[0], 200)
    pi = rng.permutation(emb.shape[1])
    assert np.mean(sorted_row_attack(emb[tokens][:, pi], emb) == tokens) == 1.0
    scaled = emb[tokens][:, pi] * 8.0  # an embedding scale (Gemma's sqrt(d)) does not help
    assert np.mean(sorted_row_attack(scaled, emb) == tokens) == 1.0
    # control: add noise of the size of the values themselves; recovery collapses towards chance
    noisy = emb[tokens][:, pi] + rng.normal(0, 3 * emb.std(), size=(200, emb.shape[1]))
    assert np.mean(sorted_row_attack(noisy, emb) == tokens) < 0.2


def test_run_audit_includes_sorted_row_matching(llama):
    a, c = llama.adapter, llama.config
    key = generate_key(a.hidden_size(c), seed=3)  # embed-mode key
    traffic = np.random.default_rng(1).integers(0, a.vocab_size(c), size=(2, 16))
    results = run_audit(llama, key, noises=(0.0,), traffic=traffic, reference=traffic.copy())
    sorted_rows = [r for r in results if r.attack == "sorted-row matching (embed mode)"]
    assert len(sorted_rows) == 1 and sorted_rows[0].recovered == 1.0

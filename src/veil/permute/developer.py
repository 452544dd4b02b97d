"""The model developer's role: draw the key, transform the model, hand out the two packages.

Steps (STIP initialisation):
1. ``make_key``: draw ``pi`` (hidden) and, in ``vocab`` mode, ``sigma`` (vocabulary) from the OS RNG.
2. ``make_packages``: permute every residual axis of the weights with ``pi`` (and the vocabulary
   axes with ``sigma``). In ``embed`` mode the token embedding and the head are removed from the
   cloud's weights and put in the user's bundle instead.
3. ``write_*``: the cloud gets ``veil-permute-cloud/1``, the user ``veil-permute-user/1``; both carry
   the same random ``key_id`` so a mismatched pair is detected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.permute.bundle import CloudPackage, UserBundle
from veil.permute.errors import KeyBundleError, UnsupportedFamilyError
from veil.permute.families import supported_families
from veil.permute.models import SourceModel
from veil.permute.sentence import read_sentence_config
from veil.permute.transform import PermutationKey, generate_key, transform_state_dict

__all__ = ["MODES", "public_meta", "make_key", "make_packages"]

MODES = ("embed", "vocab")


def public_meta(source: SourceModel, mode: str) -> dict[str, Any]:
    """Facts about the model both the user and the cloud may know (no weights, no keys)."""
    a, c = source.adapter, source.config
    return {
        "family": a.family,
        "mode": mode,
        "hidden_size": a.hidden_size(c),
        "vocab_size": a.vocab_size(c),
        "max_positions": a.max_positions(c),
        "is_decoder": a.is_decoder,
        "tied": a.tied(c),
        "bos_token_id": getattr(c, "bos_token_id", None),
        "eos_token_id": getattr(c, "eos_token_id", None),
        "embedding_scale": a.embedding_scale,
        "logit_softcap": a.logit_softcap,
        "logit_scale": a.logit_scale,
        "type_vocab_size": int(getattr(c, "type_vocab_size", 0) or 0),
    }


def make_key(source: SourceModel, mode: str = "embed", seed: int | None = None) -> tuple[PermutationKey, dict[str, Any]]:
    """Step 1: a fresh key for ``source`` (``seed`` only for tests and reproducible benchmarks)."""
    if mode not in MODES:
        raise KeyBundleError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "embed" and source.adapter.embed_problem:
        raise UnsupportedFamilyError(source.adapter.family, supported_families(),
                                     f"embed mode: {source.adapter.embed_problem}; use --mode vocab")
    meta = public_meta(source, mode)
    vocab = meta["vocab_size"] if mode == "vocab" else None
    return generate_key(meta["hidden_size"], vocab, seed=seed), meta


def make_packages(
    source: SourceModel, key: PermutationKey, key_meta: dict[str, Any], tokenizer_dir: str | Path | None = None
) -> tuple[CloudPackage, UserBundle]:
    """Step 2: the cloud's transformed model and the user's bundle."""
    mode = key_meta.get("mode")
    meta = public_meta(source, str(mode))
    for name in ("family", "hidden_size", "vocab_size"):
        if key_meta.get(name) != meta[name]:
            raise KeyBundleError(
                f"the key was made for a model with {name}={key_meta.get(name)!r}; this model has {meta[name]!r}"
            )
    if (mode == "vocab") != (key.vocab is not None):
        raise KeyBundleError(f"key mode {mode!r} does not match its content (vocabulary permutation present: "
                             f"{key.vocab is not None})")
    meta["key_id"] = key.key_id
    a, c = source.adapter, source.config
    drop = ("embedding", "head") if mode == "embed" else ()
    cloud_sd = transform_state_dict(a, c, source.state_dict(), key, drop_roles=drop)
    cloud = CloudPackage(state_dict=cloud_sd, config=c.to_dict(), meta=meta)
    user = UserBundle(key=key, meta=dict(meta))
    if mode == "embed":
        sd = source.state_dict()
        user.embedding = sd[a.embedding_name].detach().clone()
        if a.head_name is not None and not a.tied(c):
            user.head = sd[a.head_name].detach().clone()
    if tokenizer_dir is not None:
        sentence = read_sentence_config(tokenizer_dir)  # sentence-transformers' truncation, pooling, normalisation
        if sentence is not None:
            user.meta["sentence_transformers"] = sentence
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            p = Path(tokenizer_dir) / name
            if p.is_file():
                user.tokenizer_files[name] = p.read_bytes()
    return cloud, user

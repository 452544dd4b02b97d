"""Sentence-embedding settings of a sentence-transformers model, carried into the user bundle.

A sentence-transformers model directory says how it turns token states into one vector:
``sentence_bert_config.json`` (``max_seq_length``: texts are truncated to that many tokens, often
fewer than the model's positions, e.g. 256 of 512 for all-MiniLM-L6-v2; ``do_lower_case``),
``modules.json`` (the module list: a ``Normalize`` module means L2-normalised vectors) and the
pooling module's ``config.json`` (``pooling_mode_*``). :func:`read_sentence_config` reads them when
the developer transforms the model; the user's ``encode`` then tokenises, pools and normalises as
sentence-transformers does. Only these public settings travel: no weights, nothing secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ModelFormatError

__all__ = ["POOLING_MODES", "read_sentence_config", "pool", "mean_pool"]

# sentence-transformers' Pooling concatenates the enabled modes in this order
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
# the pooling module's config flag of each mode (the last two are recorded, and refused by `pool`)
_POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                  "mean": "pooling_mode_mean_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
                  "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not a readable JSON file ({exc})") from None


def read_sentence_config(model_dir: str | Path) -> dict[str, Any] | None:
    """``{"max_seq_length", "do_lower_case", "pooling", "normalize"}`` of the sentence-transformers
    model in ``model_dir``, or None when the directory is not one (no ``sentence_bert_config.json``
    and no ``modules.json``)."""
    d = Path(model_dir)
    st_path, modules_path = d / "sentence_bert_config.json", d / "modules.json"
    if not st_path.is_file() and not modules_path.is_file():
        return None
    st = _json(st_path) if st_path.is_file() else {}
    modules = _json(modules_path) if modules_path.is_file() else []
    if not isinstance(st, dict) or not isinstance(modules, list):
        raise ModelFormatError(f"{d}: sentence_bert_config.json must be an object and modules.json a list")
    max_len = st.get("max_seq_length")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ModelFormatError(f"{st_path}: max_seq_length must be a positive whole number; got {max_len!r}")
    pooling: list[str] = []
    normalize = False
    for m in modules:
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            cfg_path = d / str(m.get("path", "")) / "config.json"
            cfg = _json(cfg_path) if cfg_path.is_file() else {"pooling_mode_mean_tokens": True}
            modes = [name for name, flag in _POOLING_FLAGS.items() if cfg.get(flag)]
            pooling = modes
    return {"max_seq_length": max_len, "do_lower_case": bool(st.get("do_lower_case", False)),
            "pooling": pooling or ["mean"], "normalize": normalize}


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence-transformers mean pooling over the positions the mask keeps."""
    m = attention_mask.astype(np.float32)[..., None]
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def pool(hidden: np.ndarray, attention_mask: np.ndarray, modes: list[str] | tuple[str, ...] = ("mean",)
         ) -> np.ndarray:
    """Sentence vectors from ``hidden`` (batch, seq, d) over the positions ``attention_mask`` keeps,
    one block per mode in ``modes`` (concatenated in sentence-transformers' order)."""
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelFormatError(f"pooling mode {unknown[0]!r} is not supported by veil's encode; supported: "
                               f"{', '.join(POOLING_MODES)}")
    m = attention_mask.astype(np.float32)[..., None]
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    parts = []
    for mode in POOLING_MODES:
        if mode not in modes:
            continue
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1))
        elif mode == "mean":
            parts.append(mean_pool(hidden, attention_mask))
        else:
            parts.append((hidden * m).sum(axis=1) / np.sqrt(counts))
    return np.concatenate(parts, axis=-1).astype(hidden.dtype, copy=False)

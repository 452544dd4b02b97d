"""The model frontends under mpc, as the ``veil mpc encode`` / ``veil mpc generate`` commands run them.

:func:`encode_local`: the user tokenizes locally; the owner process loads MiniLM with the public
attention mask bound into the graph (:func:`veil.graph.onnx_import.bind_inputs`); the five parties
run as processes over mutual TLS on loopback (:func:`veil.mpc.demo.run_local_deployment`). The
result carries the secure embeddings, their cosine with the plaintext graph, time, bytes and rounds.

:func:`generate_local`: a llama2.c decoder generating greedily under mpc with the same five
processes; the owner reads the checkpoint, the key/value cache stays as shares on the servers
(:mod:`veil.mpc.generate`), and the ids are compared with plaintext decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import InputError

__all__ = ["encode_local", "generate_local", "cosine"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))


def encode_local(texts: Sequence[str], workdir: str | Path, seq_len: int = 16, frac_bits: int = 16,
                 timeout: float = 600.0) -> dict[str, Any]:
    """MiniLM sentence embeddings under mpc with five local processes (see the module docstring)."""
    from veil.graph.onnx_import import bind_inputs
    from veil.models import minilm
    from veil.mpc.demo import run_local_deployment
    from veil.plain import run_plain

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("encode needs one or more non-empty texts")
    ids, mask = minilm.tokenize(texts, seq_len)
    wd = Path(workdir)
    model = wd / "minilm.onnx"
    model.write_bytes(bind_inputs(minilm.minilm_onnx(*mask.shape), {"attention_mask": mask}).SerializeToString())
    res = run_local_deployment(model, ids, wd, frac_bits=frac_bits, timeout=timeout)
    secure = np.asarray(res["outputs"]["embedding"], np.float32)
    plain = run_plain(minilm.minilm_graph(mask), {"input_ids": ids})["embedding"]
    return {"texts": texts, "tokens": mask.sum(1).tolist(), "seq_len": seq_len, "embedding": secure, "plain": plain,
            "cosine": cosine(secure, plain), "report": res["report"], "wall_s": res["wall_s"]}


def generate_local(checkpoint: str | Path, steps: int, workdir: str | Path, prompt: Sequence[int] = (1,),
                   frac_bits: int = 16, timeout: float = 900.0) -> dict[str, Any]:
    """Greedy generation under mpc with five local processes; ids, the plaintext ids and the report."""
    from veil.models.llama import generate_plain, load_llama2c
    from veil.mpc.demo import run_local_deployment
    from veil.options import check_int

    steps = check_int(steps, "steps", 1)
    model = load_llama2c(checkpoint)  # fails here, before any process starts, on a bad checkpoint
    if len(prompt) != 1:
        raise InputError("generation starts from one token (the prompt is a single id, e.g. BOS = 1)")
    if not 0 <= int(prompt[0]) < model.config.vocab_size or int(steps) > model.config.seq_len:
        raise InputError(f"prompt id must be in [0, {model.config.vocab_size}) and steps at most {model.config.seq_len}")
    opts = {"llama2c": str(Path(checkpoint).resolve()), "steps": int(steps), "prompt": [int(t) for t in prompt]}
    res = run_local_deployment(Path(checkpoint), np.asarray(prompt, np.int64), workdir, frac_bits=frac_bits,
                               timeout=timeout, options=opts)
    ids = [int(t) for t in np.asarray(res["outputs"]["ids"]).reshape(-1)]
    plain = generate_plain(model, int(steps), bos=int(prompt[0]))
    return {"ids": ids, "plain_ids": plain, "report": res["report"], "wall_s": res["wall_s"], "model": model.name}

"""The model frontends under mpc, as the ``veil mpc encode`` / ``veil mpc generate`` commands run them.

:func:`encode_local`: the user tokenizes locally; the owner process loads MiniLM whose padding mask
is a public input (:mod:`veil.models.minilm_public_mask`: one graph for any sentence lengths up to
``seq_len``; the owner never sees the texts); the five parties run as processes over mutual TLS on
loopback (:func:`veil.mpc.demo.run_local_deployment`, deployment options ``encode``, ``seq_len``,
``batch_size``, ``texts``). :func:`encode_deployment` is the user of a deployment whose other four
parties run ``veil party``. The result carries the secure embeddings, their cosine with the plaintext
graph, time, bytes and rounds.

:func:`generate_local`: a llama2.c decoder generating greedily under mpc with the same five
processes; the owner reads the checkpoint, the key/value cache stays as shares on the servers
(:mod:`veil.mpc.generate`), and the ids are compared with plaintext decoding;
:func:`generate_deployment` is the user of such a deployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import InputError

__all__ = ["encode_local", "encode_deployment", "encode_user", "encode_inputs", "encode_owner_graph", "encode_options",
           "generate_local", "generate_deployment", "cosine", "plain_embeddings", "ENCODERS"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))


ENCODERS = ("all-MiniLM-L6-v2",)


def encode_options(opts: dict[str, Any]) -> tuple[int, int]:
    """``(seq_len, batch)`` of an encode deployment (options ``encode``, ``seq_len`` (default 16),
    ``batch_size`` (sentences per query, default 1)), checked."""
    from veil.errors import DeploymentError
    from veil.options import check_int

    if str(opts.get("encode")) not in ENCODERS:
        raise DeploymentError(f"option encode = {opts.get('encode')!r}: expected one of {list(ENCODERS)}")
    return (check_int(opts.get("seq_len", 16), "option seq_len", 2, 512),
            check_int(opts.get("batch_size", 1) or 1, "option batch_size", 1))


def encode_owner_graph(opts: dict[str, Any]) -> Any:
    """The owner's graph of an encode deployment: MiniLM whose padding mask is a public input
    (:mod:`veil.models.minilm_public_mask`), for ``batch`` sentences of ``seq_len`` tokens per query."""
    from veil.models.minilm_public_mask import minilm_public_mask_graph

    seq_len, batch = encode_options(opts)
    return minilm_public_mask_graph(batch, seq_len)


def _texts(texts: Sequence[str] | str) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("encode needs one or more non-empty texts")
    return texts


def encode_inputs(texts: Sequence[str], seq_len: int, batch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The user's inputs for ``texts`` (token ids, secret; attention bias and pooling weights, public),
    padded to a multiple of ``batch`` sentences by repeating the last one; and the real tokens per text."""
    from veil.models import minilm
    from veil.models.minilm_public_mask import public_inputs

    texts = _texts(texts)
    padded = texts + [texts[-1]] * (-len(texts) % batch)
    ids, mask = minilm.tokenize(padded, seq_len)
    return {"input_ids": ids, **public_inputs(mask)}, mask[: len(texts)].sum(1)


def encode_user(channel: Any, texts: Sequence[str], seq_len: int, batch: int) -> dict[str, Any]:
    """The user of an encode session on ``channel``: tokenizes locally, sends the ids as shares and
    the padding as public inputs, returns the embeddings (``embedding``), tokens and the report."""
    from veil.mpc.roles.user import user_role

    texts = _texts(texts)
    x, tokens = encode_inputs(texts, seq_len, batch)
    res = user_role(channel, x, batch)
    emb = np.asarray(res["outputs"]["embedding"], np.float32)[: len(texts)]
    return {"texts": texts, "tokens": tokens.tolist(), "embedding": emb, "report": res["report"]}


def plain_embeddings(texts: Sequence[str], seq_len: int) -> np.ndarray | None:
    """The plaintext embeddings of the same graph (the model is public: needs veil[hf]); None without it."""
    from veil.errors import ModelError
    from veil.models import minilm
    from veil.plain import run_plain

    try:
        ids, mask = minilm.tokenize(list(texts), seq_len)
        return np.asarray(run_plain(minilm.minilm_graph(mask), {"input_ids": ids})["embedding"])
    except (ModelError, ImportError):
        return None


def encode_local(texts: Sequence[str], workdir: str | Path, seq_len: int = 16, frac_bits: int = 16,
                 timeout: float = 600.0, batch: int | None = None, compare: bool = True) -> dict[str, Any]:
    """MiniLM sentence embeddings under mpc with five local processes (see the module docstring);
    ``batch`` sentences per query (default: all in one query)."""
    from veil.mpc.demo import run_local_deployment

    texts = _texts(texts)
    batch = batch or len(texts)
    opts = {"encode": ENCODERS[0], "seq_len": seq_len, "batch_size": batch, "texts": texts}
    encode_options(opts)  # bad options fail here, before any process starts
    wd = Path(workdir)
    res = run_local_deployment(wd, np.zeros(1), wd, frac_bits=frac_bits, timeout=timeout, options=opts)
    secure = np.asarray(res["outputs"]["embedding"], np.float32)
    plain = plain_embeddings(texts, seq_len) if compare else None
    tokens = res["outputs"].get("tokens")
    return {"texts": texts, "tokens": [int(t) for t in np.asarray(tokens).reshape(-1)], "seq_len": seq_len,
            "embedding": secure, "plain": plain, "cosine": None if plain is None else cosine(secure, plain),
            "report": res["report"], "wall_s": res["wall_s"]}


def encode_deployment(deployment: str | Path, texts: Sequence[str], timeout: float | None = None,
                      compare: bool = True, seq_len: int | None = None) -> dict[str, Any]:
    """Be the user of a running encode deployment (the other four parties started with ``veil party``);
    ``compare``: also run the public model in plaintext here (``plain``, ``cosine``; None otherwise);
    ``seq_len``, if given, must be the deployment's."""
    import time

    from veil.mpc.party import blas_single_thread, peers_of
    from veil.net import connect_tls, load_deployment

    dep = load_deployment(deployment)
    want = seq_len
    seq_len, batch = encode_options(dep.options)
    if want is not None and want != seq_len:
        raise InputError(f"--seq-len {want} differs from the deployment's seq_len = {seq_len} (the owner's model is built "
                         "for that length)")
    texts = _texts(texts)
    t0 = time.perf_counter()
    ch = connect_tls(dep, "user", peers_of(dep, "user"), timeout=timeout)
    try:
        with ch.aborting(), blas_single_thread():
            res = encode_user(ch, texts, seq_len, batch)
    finally:
        ch.close()
    plain = plain_embeddings(texts, seq_len) if compare else None
    return {**res, "seq_len": seq_len, "plain": plain, "report": res["report"].as_dict(),
            "cosine": None if plain is None else cosine(res["embedding"], plain), "wall_s": time.perf_counter() - t0}


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


def generate_deployment(deployment: str | Path, steps: int, prompt: Sequence[int] = (1,),
                        checkpoint: str | Path | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Be the user of a running generation deployment (the owner's ``llama2c`` and ``steps`` options set
    how many positions it offers); ids, report and, with ``checkpoint`` (the public model), the
    plaintext ids to compare with."""
    import time

    from veil.mpc.party import blas_single_thread, peers_of
    from veil.mpc.roles.user import user_generate_role
    from veil.net import connect_tls, load_deployment
    from veil.options import check_int

    steps = check_int(steps, "steps", 1)
    dep = load_deployment(deployment)
    plain = None
    if checkpoint is not None:
        from veil.models.llama import generate_plain, load_llama2c

        plain = generate_plain(load_llama2c(checkpoint), steps, bos=int(prompt[0]))
    t0 = time.perf_counter()
    ch = connect_tls(dep, "user", peers_of(dep, "user"), timeout=timeout)
    try:
        with ch.aborting(), blas_single_thread():
            res = user_generate_role(ch, [int(t) for t in prompt], steps)
    finally:
        ch.close()
    return {"ids": [int(t) for t in res["ids"]], "plain_ids": plain, "report": res["report"].as_dict(),
            "wall_s": time.perf_counter() - t0, "model": Path(str(dep.options.get("llama2c", "llama2c"))).name}

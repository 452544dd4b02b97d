"""Deployment entry point: ``veil party --deployment FILE --as NAME`` runs one mpc role.

Parties: ``owner``, ``user``, ``server0``, ``server1``, ``dealer`` (all connected pairwise by mutual
TLS). Options read from the deployment's ``[options]`` table (paths relative to the file):

* owner: ``model`` (ONNX file), ``frac_bits`` (default 16);
* generation instead (a llama2c decoder, key/value cache kept on the servers): ``llama2c`` (checkpoint,
  read by the owner), ``steps`` (default 20), ``prompt`` (token ids, default [1]); the user writes the
  generated ``ids`` to ``outputs``;
* sentence embeddings instead (``veil mpc encode``): ``encode = "all-MiniLM-L6-v2"``, ``seq_len``
  (default 16), ``batch_size`` (sentences per query, default 1), read by the owner and the user;
  ``texts`` (a list of strings, read by the user; ``veil mpc encode --deployment`` passes its own); the
  padding mask is a public input, so the owner's graph does not depend on the texts; the user writes
  ``embedding`` and ``tokens`` to ``outputs``;
* user: ``inputs`` (.npy for a single-input model, .npz with named inputs), ``batch_size``
  (default: all at once), ``outputs`` (.npz written with the outputs; the report goes next to it
  as JSON).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import DeploymentError, InputError
from veil.graph import load_model
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.roles import PARTIES, dealer_role, owner_role, server_role, user_role
from veil.mpc.roles.user import user_generate_role
from veil.net.channel import Channel
from veil.net.deployment import Deployment
from veil.options import check_int

__all__ = ["run_party", "run_user", "peers_of", "load_inputs", "report_path", "blas_single_thread"]


def peers_of(deployment: Deployment, name: str) -> list[str]:
    if name not in PARTIES:
        raise DeploymentError(f"mpc deployments have parties {list(PARTIES)}; {name!r} is not one of them")
    missing = [p for p in PARTIES if p not in deployment.parties]
    if missing:
        raise DeploymentError(f"mpc deployment {deployment.name!r} lacks parties {missing}")
    return [p for p in PARTIES if p != name]


def _path(deployment: Deployment, key: str) -> Path:
    if key not in deployment.options:
        raise DeploymentError(f"mpc deployment {deployment.name!r}: option {key!r} is required")
    p = Path(str(deployment.options[key]))
    if not p.is_absolute() and deployment.path is not None:
        p = deployment.path.parent / p
    return p


def load_inputs(path: Path) -> Any:
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        return np.load(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read input file {path.name!r}: expected .npy or .npz ({e})") from None


def report_path(outputs: Path) -> Path:
    return outputs.with_suffix(".report.json")


def blas_single_thread() -> Any:
    """A context limiting BLAS to one thread per process (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1)
    except ImportError:  # optional: the demo sets OPENBLAS_NUM_THREADS instead
        return contextlib.nullcontext()


def run_party(deployment: Deployment, name: str, channel: Channel, console: Any = None) -> Any:
    peers_of(deployment, name)
    opts = deployment.options
    with blas_single_thread():
        generating = "llama2c" in opts
        encoding = "encode" in opts
        prompt = [int(t) for t in opts.get("prompt", [1])]
        steps = int(opts.get("steps", 20))
        if name == "owner":
            fp = FixedPoint(int(opts.get("frac_bits", 16)))
            if generating:  # a decoder: one graph per position, the cache stays on the servers
                from veil.models.llama import load_llama2c
                from veil.mpc.generate import step_graphs

                graphs = step_graphs(load_llama2c(_path(deployment, "llama2c")), len(prompt) + steps - 1)
                return owner_role(channel, graphs[0], fp, graphs[1:])
            if encoding:  # MiniLM with the padding mask as a public input: independent of the user's texts
                from veil.models.secure import encode_owner_graph

                return owner_role(channel, encode_owner_graph(opts), fp)
            return owner_role(channel, load_model(_path(deployment, "model")), fp)
        if name == "dealer":
            return dealer_role(channel)
        if name in ("server0", "server1"):
            return server_role(channel, int(name[-1]))
        if generating:
            res = user_generate_role(channel, prompt, steps)
            if "outputs" in opts:
                out = _path(deployment, "outputs")
                np.savez(out, ids=np.asarray(res["ids"], np.int64))
                report_path(out).write_text(json.dumps(res["report"].as_dict(), indent=1))
            if console is not None:
                console.print(f"user: ids {res['ids']}; {res['report'].summary()}")
            return res
        if encoding:
            from veil.models.secure import encode_options, encode_user

            seq_len, batch = encode_options(opts)
            if "texts" not in opts:
                raise DeploymentError(f"mpc deployment {deployment.name!r}: the user needs option 'texts' (a list of strings)")
            res = encode_user(channel, list(opts["texts"]), seq_len, batch)
            if "outputs" in opts:
                out = _path(deployment, "outputs")
                np.savez(out, embedding=res["embedding"], tokens=np.asarray(res["tokens"], np.int64))
                report_path(out).write_text(json.dumps(res["report"].as_dict(), indent=1))
            if console is not None:
                console.print(f"user: {len(res['texts'])} embeddings; {res['report'].summary()}")
            return res
        x = load_inputs(_path(deployment, "inputs"))
        bs = opts.get("batch_size")
        seg = opts.get("segment_bytes")  # dealer material per program segment (default SEGMENT_BYTES)
        seg = None if seg is None else check_int(seg, "option segment_bytes", 0, 2**62, why="bytes; 0: one segment")
        res = user_role(channel, x, int(bs) if bs else None, seg)
        if "outputs" in opts:
            out = _path(deployment, "outputs")
            np.savez(out, **res["outputs"])
            report_path(out).write_text(json.dumps(res["report"].as_dict(), indent=1))
        if console is not None:
            console.print(f"user: {res['report'].summary()}")
        return res


def run_user(deployment: str | Path | Deployment, x: Any, batch_size: int | None = None,
             timeout: float | None = None) -> tuple[Any, Any]:
    """Python entry point for the user of a running deployment: connect as ``user`` over mutual TLS,
    run the queries, return (outputs, :class:`~veil.mpc.report.Report`)."""
    from veil.net import connect_tls, load_deployment

    dep = deployment if isinstance(deployment, Deployment) else load_deployment(deployment)
    ch = connect_tls(dep, "user", peers_of(dep, "user"), timeout=timeout)
    try:
        with blas_single_thread():
            res = user_role(ch, x, batch_size)
    finally:
        ch.close()
    outs = res["outputs"]
    return (next(iter(outs.values())) if len(outs) == 1 else outs), res["report"]

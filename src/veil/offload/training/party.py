"""Offload-training roles for ``veil party --deployment FILE --as NAME`` (``mode = "offload"``,
``task = "train"`` in ``[options]``), over the foundation's mutual-TLS channels.

Parties:

* ``owner`` (the data owner): loads its model (initial weights) and training data, sends them with
  the chosen optimizer, epochs and batch size to the enclave, shows progress, and receives the
  trained model as an ONNX file. (In a real deployment it would first verify the enclave's
  attestation; the simulated enclave has none, see docs/offload.md.)
* ``enclave``: trusted (SIMULATED here). Trains, every product through the three accelerators;
  seals a checkpoint every ``checkpoint_every`` steps and resumes from it when ``resume = true``.
* ``accelerator0``, ``accelerator1`` (share holders), ``accelerator2`` (triple helper): untrusted,
  pairwise non-colluding.

``[options]``: ``task = "train"``; owner: ``model`` (an .onnx file with initial weights, or A-D: that
SecureNN architecture with seeded random initial weights), ``data`` (``mnist``: images 0..7999 of
the shared MNIST file, ``mnist-slice``: the shipped 256 held-out images, ``clicks``: the synthetic
click set, or an .npz file with one array per model input and ``y``), ``n`` (use the first n
samples), ``optimizer`` (sgd/adam), ``lr``, ``momentum``, ``epochs``, ``batch_size``, ``seed``,
``loss`` (cross_entropy/bce), ``max_steps``, ``precision`` (``single``: one secure field product per
product, ``double`` (default): two, see :mod:`veil.offload.training.precision`), ``output`` (trained
.onnx, default ``trained.onnx``);
enclave: ``hazmat_allow_simulation`` (required; ``hazmat_simulate`` is the old name), ``sealing_key``
(simulated sealing-key file, so a restarted enclave can unseal), ``checkpoint`` (file), ``checkpoint_every``, ``resume``, ``freivalds_reps``,
``min_intensity`` (default 16: a product with ``nkm / (nk + km + nm)`` below it is computed inside the
enclave, where masking and checking it would cost more than the product; 0 offloads every product);
accelerators: ``backend`` (auto, numpy, torch, torch-cpu, torch-cuda).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ChannelError, DeploymentError, VeilError
from veil.net.channel import Channel
from veil.net.deployment import Deployment
from veil.offload.runtime import SimulatedEnclaveRuntime
from veil.offload.training.accelerator import serve_train_accelerator
from veil.offload.training.precision import DEFAULT_PRECISION
from veil.offload.training.protocol import TRAIN_ACCELERATORS, SecureMatmul
from veil.offload.training.trainer import TrainConfig, Trainer

__all__ = ["run_train_party", "owner_request", "train_config", "run_owner", "TRAIN_PARTIES"]

TRAIN_PARTIES = ("enclave", *TRAIN_ACCELERATORS, "owner")
DEFAULT_MIN_INTENSITY = 16.0  #: deployments: products below this arithmetic intensity stay in the enclave


def _resolve(dep: Deployment, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() or dep.path is None else dep.path.parent / q


def run_train_party(dep: Deployment, name: str, channel: Channel, console: Any = None) -> Any:
    missing = [p for p in TRAIN_PARTIES if p not in dep.parties]
    if missing:
        raise DeploymentError(f"an offload training deployment needs the parties {', '.join(TRAIN_PARTIES)}; "
                              f"missing {', '.join(missing)}")
    say = console.print if console is not None else (lambda *a, **k: None)
    if name == "enclave":
        return _enclave(dep, channel, say)
    if name in TRAIN_ACCELERATORS:
        say(f"offload train: {name}: computing masked products for the enclave (untrusted role)")
        s = serve_train_accelerator(channel, "enclave", backend=str(dep.options.get("backend", "auto")),
                                    idle_timeout=dep.timeout * 20)
        say(f"offload train: {name}: done, backend {s['backend']}, {s['requests']} rounds")
        return s
    if name == "owner":
        req = owner_request(dep.options, base=dep.path.parent if dep.path else None)
        res = run_owner(channel, req, timeout=dep.timeout * 20, on_progress=lambda m: say(
            f"offload train: step {m['step']}/{m['total']} epoch {m['epoch']} loss {m['loss']:.4f} "
            f"{m['samples_per_s']:.1f} samples/s"))
        out = _resolve(dep, str(dep.options.get("output", "trained.onnx")))
        out.write_bytes(res["onnx"])
        report = {k: v for k, v in res.items() if k != "onnx"}
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        say(f"offload train: owner: trained model written to {out.name} ({len(res['onnx']):,} bytes)")
        return report
    raise DeploymentError(f"offload training deployments know the parties {', '.join(TRAIN_PARTIES)}; not {name!r}")


# --- owner ------------------------------------------------------------------------------------------
def owner_request(opts: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """The data owner's training request (model bytes, data, settings) from deployment/CLI options."""
    from veil.offload.training.data import load_mnist, synthetic_clicks
    from veil.offload.training.export import graph_to_onnx

    config = train_config(opts)  # bad settings fail here, before any data is read
    spec = str(opts.get("model", "C"))
    data = str(opts.get("data", "mnist-slice"))
    seed = int(opts.get("seed", 0))
    n = opts.get("n")
    feeds: dict[str, np.ndarray]
    if data in ("mnist", "mnist-slice"):
        if data == "mnist":
            x, y = load_mnist("train")
        else:
            from veil.assets import load_slice

            x, y = load_slice()
        feeds = {"x": x}
    elif data == "clicks":
        cd = synthetic_clicks(int(n or 4000), seed=int(opts.get("data_seed", 0)))
        feeds, y = cd.feeds(), cd.y
    else:
        p = Path(data) if base is None or Path(data).is_absolute() else base / data
        if not p.is_file():
            raise VeilError(f"training data file {data!r} not found (or use mnist, mnist-slice, clicks)")
        with np.load(p, allow_pickle=False) as f:
            if "y" not in f.files:
                raise VeilError(f"training data file {p.name!r} needs an array 'y' of labels")
            feeds = {k: f[k] for k in f.files if k != "y"}
            y = f["y"]
    if n is not None:
        feeds, y = {k: v[: int(n)] for k, v in feeds.items()}, y[: int(n)]
    if spec.upper() in ("A", "B", "C", "D") and not Path(spec).exists():
        import torch

        from veil.offload.examples import mnist_module
        from veil.offload.training.models import torch_to_graph

        torch.manual_seed(seed)
        model = graph_to_onnx(torch_to_graph(mnist_module(spec.upper()), torch.zeros(1, 1, 28, 28))).SerializeToString()
    elif spec == "deep-crossing":
        import torch

        from veil.offload.training.data import synthetic_clicks as sc
        from veil.offload.training.models import click_inputs, deep_crossing, torch_to_graph

        vocab = sc(1).vocab
        mod = deep_crossing(vocab, feeds["dense"].shape[1], seed=seed)
        ex = tuple(torch.zeros(1, v) for v in vocab) + (torch.zeros(1, feeds["dense"].shape[1]),)
        model = graph_to_onnx(torch_to_graph(mod, ex, click_inputs(vocab), "p")).SerializeToString()
    else:
        p = Path(spec) if base is None or Path(spec).is_absolute() else base / spec
        if not p.is_file():
            raise VeilError(f"model {spec!r}: not an .onnx file, A-D or deep-crossing")
        model = p.read_bytes()
    return {"type": "train", "model": model, "feeds": feeds, "labels": np.asarray(y), "config": config.as_dict()}


def train_config(opts: dict[str, Any]) -> TrainConfig:
    """The training settings of deployment/CLI options, every one checked (:class:`VeilError` naming the bad
    one); cheap, so callers run it before starting anything."""
    data = str(opts.get("data", "mnist-slice"))
    try:
        opt: dict[str, Any] = {"name": str(opts.get("optimizer", "adam")), "lr": float(opts.get("lr", 1e-3))}
        if opt["name"] == "sgd":
            opt["momentum"] = float(opts.get("momentum", 0.9))
        d = {"optimizer": opt, "epochs": int(opts.get("epochs", 1)), "batch_size": int(opts.get("batch_size", 64)),
             "seed": int(opts.get("seed", 0)), "loss": str(opts.get("loss", "bce" if data == "clicks" else "cross_entropy")),
             "max_steps": None if opts.get("max_steps") is None else int(opts["max_steps"]),
             "precision": str(opts.get("precision", DEFAULT_PRECISION))}
        for key in ("min_intensity", "freivalds_reps", "n"):
            if opts.get(key) is not None and not float(opts[key]) >= (1 if key != "min_intensity" else 0):
                raise VeilError(f"{key} must be >= {1 if key != 'min_intensity' else 0}, got {opts[key]!r}")
    except (TypeError, ValueError) as e:
        raise VeilError(f"bad training settings: {e}") from None
    return TrainConfig.from_dict(d)


def run_owner(ch: Channel, request: dict[str, Any], timeout: float = 600.0,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send the request to the enclave, follow its progress, return ``{"onnx": bytes, ...report}``."""
    ch.send("enclave", request)
    while True:
        try:
            msg = ch.recv("enclave", timeout=timeout)
        except ChannelError as e:
            raise VeilError(f"the enclave went away during training: {type(e).__name__}: {e}") from None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "progress":
            if on_progress:
                on_progress(msg)
        elif kind == "model":
            return {k: v for k, v in msg.items() if k != "type"}
        elif kind == "error":
            raise VeilError(f"training failed in the enclave: {msg.get('message')}")
        else:
            raise VeilError(f"unexpected message from the enclave: {kind!r}")


# --- enclave ----------------------------------------------------------------------------------------
def _enclave(dep: Deployment, ch: Channel, say: Any) -> dict[str, Any]:
    opts = dep.options
    key = opts.get("sealing_key")
    allow = bool(opts.get("hazmat_allow_simulation", opts.get("hazmat_simulate", False)))
    runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=allow,
                                      key_file=_resolve(dep, str(key)) if key else None)
    say(f"offload train: enclave: {runtime.describe()}")
    eng = SecureMatmul(ch, runtime, freivalds_reps=int(opts.get("freivalds_reps", 1)), timeout=dep.timeout,
                       min_intensity=float(opts.get("min_intensity", DEFAULT_MIN_INTENSITY)))
    try:
        req = ch.recv("owner", timeout=dep.timeout * 20)
        try:
            if not isinstance(req, dict) or req.get("type") != "train":
                raise VeilError("expected a training request from the owner")
            tr = Trainer(req["model"], dict(req["feeds"]), req["labels"], TrainConfig.from_dict(req["config"]))
            ck = _resolve(dep, str(opts["checkpoint"])) if opts.get("checkpoint") else None
            if ck is not None and bool(opts.get("resume", False)) and ck.is_file():
                tr.resume(ck, runtime)
                say(f"offload train: enclave: resumed from the sealed checkpoint at step {tr.step_count}")
            t0, s0 = time.perf_counter(), tr.step_count
            seen = [0]

            def progress(t: Trainer, loss: float) -> None:
                seen[0] += min(t.config.batch_size, t.n)
                dt = time.perf_counter() - t0
                ch.send("owner", {"type": "progress", "step": t.step_count, "total": t.total_steps, "epoch": t.epoch,
                                  "loss": loss, "samples_per_s": seen[0] / dt if dt > 0 else 0.0})

            tr.train(eng, on_step=progress, checkpoint=ck, checkpoint_every=int(opts.get("checkpoint_every", 0)),
                     runtime=runtime)
            wall = time.perf_counter() - t0
            stats = ch.stats.as_dict()
            counters = {k: float(v) for k, v in eng.counters.items()}
            report = {"steps": tr.step_count, "steps_this_run": tr.step_count - s0, "history": tr.history,
                      "wall_s": wall, "counters": counters, "bytes_sent": stats["bytes_sent"],
                      "bytes_recv": stats["bytes_recv"], "timing": dict(tr.timing),
                      "soundness_error_per_row": eng.soundness_error, "enclave": runtime.describe()}
            ch.send("owner", {"type": "model", "onnx": tr.onnx_bytes(), **report})
        except VeilError as e:
            try:
                ch.send("owner", {"type": "error", "message": f"{type(e).__name__}: {e}"})
            except ChannelError:
                pass
            raise
    finally:
        eng.close()
    say(f"offload train: enclave: {tr.step_count} steps done")
    return report

"""Offload-mode roles for ``veil party --deployment FILE --as NAME`` (mutual-TLS channels).

Parties of an offload deployment (``mode = "offload"``):

* ``enclave``: trusted. Loads the model, runs the offline phase, deals weights (or weight shares) to
  the accelerators, then answers the user's queries until the user says bye.
* ``accelerator`` (or ``accelerator0`` and ``accelerator1`` with ``weight_privacy = "shares"``):
  untrusted. Runs linear layers on blinded data (torch on a GPU when present, else NumPy).
* ``user``: sends its inputs to the enclave and prints the predictions. (In a real deployment the
  user would first check the enclave's attestation; the simulated enclave has none, so the enclave
  refuses to start without ``hazmat_simulate = true``.)

``[options]``: ``model`` (path to an .onnx file, or A/B/C/D for a shipped network), ``weight_privacy``
("none" or "shares"), ``backend`` (accelerator: auto, numpy, torch, torch-cpu, torch-cuda),
``precompute`` (samples of offline material, default 256), ``freivalds_reps`` (default 1),
``hazmat_simulate`` (must be true on machines without SGX), ``inputs`` (user: a .npy file; default
the shipped MNIST slice), ``n`` (user: images from the slice, default 64), ``batch`` (default 64).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ChannelError, DeploymentError, IntegrityError, VeilError
from veil.net.channel import Channel
from veil.net.deployment import Deployment
from veil.offload.accelerator import serve_accelerator
from veil.offload.enclave import OffloadEnclave
from veil.offload.errors import AcceleratorProtocolError
from veil.offload.runtime import SimulatedEnclaveRuntime

__all__ = ["peers_of", "run_party", "load_offload_model"]


def _accelerators(dep: Deployment) -> list[str]:
    return sorted(p for p in dep.parties if p.startswith("accelerator"))


def peers_of(dep: Deployment, name: str) -> list[str]:
    """Who talks to whom: the enclave to everyone; accelerators and the user only to the enclave."""
    if "enclave" not in dep.parties:
        raise DeploymentError("an offload deployment needs a party named 'enclave'")
    if name == "enclave":
        return [p for p in dep.parties if p != "enclave"]
    return ["enclave"]


def load_offload_model(spec: str) -> Any:
    """A shipped network name (A-D) or a path to an ONNX file -> veil graph."""
    from veil.graph import load_model

    if spec.upper() in ("A", "B", "C", "D") and not Path(spec).exists():
        from veil.assets import model_path

        return load_model(model_path(spec))
    return load_model(spec)


def run_party(dep: Deployment, name: str, channel: Channel, console: Any = None) -> Any:
    """Play party ``name`` of an offload deployment over ``channel`` (see module docstring); return a summary."""
    opts = dep.options
    if opts.get("task") == "train":  # offload training (veil.offload.training.party)
        from veil.offload.training.party import run_train_party

        return run_train_party(dep, name, channel, console)
    say = console.print if console is not None else (lambda *a, **k: None)
    if name == "enclave":
        return _enclave(dep, channel, say)
    if name.startswith("accelerator"):
        say(f"[offload] {name}: serving linear layers for the enclave (untrusted role)")
        summary = serve_accelerator(channel, "enclave", backend=str(opts.get("backend", "auto")),
                                    idle_timeout=dep.timeout * 20)
        say(f"[offload] {name}: done, backend {summary['backend']}, {summary['requests']} rounds")
        return summary
    if name == "user":
        return _user(dep, channel, say)
    raise DeploymentError(f"offload deployments know the parties enclave, accelerator*, user; not {name!r}")


def _enclave(dep: Deployment, ch: Channel, say: Any) -> dict[str, Any]:
    opts = dep.options
    runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=bool(opts.get("hazmat_simulate", False)))
    say(f"[offload] enclave: {runtime.describe()}")
    enc = OffloadEnclave(load_offload_model(str(opts.get("model", "C"))), runtime,
                         weight_privacy=str(opts.get("weight_privacy", "none")), accelerators=_accelerators(dep),
                         freivalds_reps=int(opts.get("freivalds_reps", 1)), timeout=dep.timeout)
    say(enc.plan.describe())
    dt = enc.precompute(int(opts.get("precompute", 256)))
    say(f"[offload] enclave: offline phase {dt:.2f} s, {enc.material.available} samples of sealed material")
    backends = enc.connect(ch)
    say(f"[offload] enclave: accelerators ready: {backends}")
    try:
        while True:
            msg = ch.recv("user", timeout=dep.timeout * 20)
            if not isinstance(msg, dict) or msg.get("type") == "bye":
                break
            try:
                out = enc.infer(ch, msg.get("x"))
                ch.send("user", {"type": "outputs", "outputs": out})
            except VeilError as e:  # input errors etc.: tell the user, keep serving unless an accelerator failed
                ch.send("user", {"type": "error", "message": str(e)})
                if isinstance(e, IntegrityError | ChannelError | AcceleratorProtocolError):
                    raise  # a lying or lost accelerator ends the session
    finally:
        enc.close(ch)
    return {"counters": enc.counters, "timing": enc.timing, "material_left": enc.material.available}


def _user(dep: Deployment, ch: Channel, say: Any) -> dict[str, Any]:
    opts = dep.options
    labels = None
    if "inputs" in opts:
        x = np.load(str(opts["inputs"]), allow_pickle=False)
    else:
        from veil.assets import load_slice

        x, labels = load_slice(int(opts.get("n", 64)))
    batch = int(opts.get("batch", 64))
    preds = []
    t0 = time.perf_counter()
    try:
        for i in range(0, len(x), batch):
            ch.send("enclave", {"type": "infer", "x": x[i:i + batch]})
            reply = ch.recv("enclave", timeout=dep.timeout * 20)
            if not isinstance(reply, dict) or reply.get("type") != "outputs":
                raise VeilError(f"the enclave refused the query: {reply.get('message') if isinstance(reply, dict) else reply}")
            out = next(iter(reply["outputs"].values()))
            preds.append(np.asarray(out).reshape(len(x[i:i + batch]), -1).argmax(-1))
    finally:
        ch.send("enclave", {"type": "bye"})
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    result: dict[str, Any] = {"n": int(len(pred)), "seconds": time.perf_counter() - t0, "predictions": pred.tolist()}
    if labels is not None:
        result["accuracy"] = float((pred == labels[: len(pred)]).mean())
    say(f"[offload] user: {result['n']} predictions in {result['seconds']:.2f} s"
        + (f", accuracy {result['accuracy']:.2%} (held-out slice)" if "accuracy" in result else ""))
    return result

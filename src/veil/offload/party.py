"""Offload-mode roles for ``veil party --deployment FILE --as NAME`` (mutual-TLS channels).

Parties of an offload deployment (``mode = "offload"``):

* ``enclave``: trusted. Loads the model, runs the offline phase, deals weights (or weight shares) to
  the accelerators, then answers the user's queries until the user says bye.
* ``accelerator`` (or ``accelerator0`` and ``accelerator1`` with ``weight_privacy = "shares"``):
  untrusted. Runs linear layers on blinded data (torch on a GPU when present, else NumPy).
* ``user``: sends its inputs to the enclave and prints the predictions. (In a real deployment the
  user would first check the enclave's attestation; the simulated enclave has none, so the enclave
  refuses to start without ``hazmat_allow_simulation = true``.)

``[options]``: ``model`` (path to an .onnx file, or A/B/C/D for a shipped network), ``weight_privacy``
("none" or "shares"), ``backend`` (accelerator: auto, numpy, torch, torch-cpu, torch-cuda),
``precompute`` (samples of offline material, default 256), ``freivalds_reps`` (default 1),
``hazmat_allow_simulation`` (must be true on machines without SGX; ``hazmat_simulate`` is the old
name), ``inputs`` (user: a .npy file, or .npz with named inputs; default the shipped MNIST held-out
images), ``n`` (user: images from them, default 64), ``batch_size`` (default 64; ``batch`` is the old
name), ``outputs`` (user: an .npz file that receives every output of every query; paths are relative
to the deployment file). The user prints a summary and the predicted class of each sample; when the
enclave refuses a query, the user stops with the enclave's reason.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ChannelError, DeploymentError, IntegrityError, ProtocolError, VeilError
from veil.net.channel import Channel
from veil.net.deployment import Deployment
from veil.offload.accelerator import serve_accelerator
from veil.offload.enclave import OffloadEnclave
from veil.offload.errors import AcceleratorProtocolError
from veil.offload.runtime import SimulatedEnclaveRuntime
from veil.options import check_batch_size, check_int, read_inputs

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
    runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=_allow_simulation(opts))
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


def _allow_simulation(opts: dict[str, Any]) -> bool:
    return bool(opts.get("hazmat_allow_simulation", opts.get("hazmat_simulate", False)))


def _option_path(dep: Deployment, key: str) -> Path:
    p = Path(str(dep.options[key]))
    return p if p.is_absolute() or dep.path is None else dep.path.parent / p


def _user_inputs(dep: Deployment) -> tuple[dict[str, np.ndarray] | np.ndarray, np.ndarray | None]:
    opts = dep.options
    if "inputs" not in opts:
        from veil.assets import load_slice

        return load_slice(check_int(opts.get("n", 64), "option n", 1))
    return read_inputs(_option_path(dep, "inputs")), None


def _user(dep: Deployment, ch: Channel, say: Any) -> dict[str, Any]:
    opts = dep.options
    x, labels = _user_inputs(dep)
    xs = x if isinstance(x, dict) else {"": x}
    n = len(next(iter(xs.values())))
    batch = check_batch_size(opts.get("batch_size", opts.get("batch", 64)), "option batch_size") or n
    outs: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    try:
        for i in range(0, n, batch):
            part = {k: v[i:i + batch] for k, v in xs.items()}
            ch.send("enclave", {"type": "infer", "x": part[""] if "" in part else part})
            reply = ch.recv("enclave", timeout=dep.timeout * 20)
            if not isinstance(reply, dict) or reply.get("type") != "outputs":
                why = reply.get("message") if isinstance(reply, dict) else None
                raise ProtocolError(f"offload user: the enclave refused query {i // batch} (samples {i}..."
                                    f"{min(i + batch, n) - 1}): {why or 'no reason given'}")
            for k, v in reply["outputs"].items():
                outs.setdefault(k, []).append(np.asarray(v))
    finally:
        with contextlib.suppress(ChannelError):  # the enclave may be gone: keep the error that says why
            ch.send("enclave", {"type": "bye"})
    outputs = {k: np.concatenate(v) for k, v in outs.items()}
    first = next(iter(outputs.values())) if outputs else np.zeros((0, 1))
    pred = first.reshape(len(first), -1).argmax(-1) if first.size else np.zeros(0, np.int64)
    result: dict[str, Any] = {"n": int(len(pred)), "seconds": time.perf_counter() - t0, "predictions": pred.tolist(),
                              "outputs": outputs}
    if labels is not None:
        result["accuracy"] = float((pred == labels[: len(pred)]).mean())
    if "outputs" in opts:
        out_path = _option_path(dep, "outputs")
        np.savez(out_path, **outputs)  # type: ignore[arg-type]  # numpy stubs check **kwds against allow_pickle
        result["saved"] = str(out_path)
    say(f"\\[offload] user: {result['n']} predictions in {result['seconds']:.2f} s; outputs "
        + ", ".join(f"{k} {v.shape}" for k, v in outputs.items())
        + (f", accuracy {result['accuracy']:.2%} (held-out MNIST test images 8000..{8000 + len(pred) - 1})"
           if "accuracy" in result else ""))
    shown = " ".join(map(str, result["predictions"][:32])) + (" ..." if n > 32 else "")
    say(f"\\[offload] user: predicted class per sample: {shown}")
    say(f"\\[offload] user: every output saved to {result['saved']}" if "saved" in result
        else "\\[offload] user: set options.outputs = \"out.npz\" to save every output")
    return result

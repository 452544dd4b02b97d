"""The enclave's training loop: data order, steps, losses, optimizer, checkpoints, evaluation.

One step on a batch: forward through the graph (products via the engine), loss and its gradient in
the enclave, backward (products via the engine), optimizer update in the enclave. The data order of
epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(N)`` (:func:`epoch_order`), batches
are consecutive slices of it (the last one may be smaller), so a run is reproducible from its seed and
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import InputError, VeilError
from veil.graph import Graph, load_model
from veil.offload.runtime import EnclaveRuntime
from veil.offload.training.checkpoint import load_checkpoint, save_checkpoint
from veil.offload.training.layers import LOSSES, TrainGraph
from veil.offload.training.optimizers import Optimizer, make_optimizer
from veil.offload.training.precision import DEFAULT_PRECISION, PrecisionMatmul, check_precision
from veil.offload.training.protocol import (
    MatmulEngine,
    PlainMatmul,
    _conv_intensity,
    _conv_spec,
    product_intensity,
)

__all__ = ["TrainConfig", "Trainer", "epoch_order", "TrainingDataError"]


class TrainingDataError(InputError):
    """Training data that does not fit the model (missing inputs, wrong sample shapes, count mismatch)."""


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Sample order of one epoch."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


@dataclass
class TrainConfig:
    """What the data owner chooses besides model and data."""

    optimizer: dict[str, Any]
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    loss: str = "cross_entropy"
    max_steps: int | None = None  #: stop after this many steps in total (None: all epochs)
    #: secure field products per product: "single" (one) or "double" (two, ~eps^2 error; see
    #: :mod:`veil.offload.training.precision`)
    precision: str = DEFAULT_PRECISION

    def as_dict(self) -> dict[str, Any]:
        return {"optimizer": dict(self.optimizer), "epochs": self.epochs, "batch_size": self.batch_size,
                "seed": self.seed, "loss": self.loss, "max_steps": self.max_steps, "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        try:
            cfg = cls(optimizer=dict(d["optimizer"]), epochs=int(d.get("epochs", 1)), batch_size=int(d.get("batch_size", 64)),
                      seed=int(d.get("seed", 0)), loss=str(d.get("loss", "cross_entropy")),
                      max_steps=None if d.get("max_steps") is None else int(d["max_steps"]),
                      precision=str(d.get("precision", DEFAULT_PRECISION)))
        except (KeyError, TypeError, ValueError) as e:
            raise VeilError(f"bad training settings: {type(e).__name__}: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every setting, the optimizer's included, before anything starts (:class:`VeilError` naming
        the bad setting and what is accepted)."""
        if self.loss not in LOSSES:
            raise VeilError(f"unknown loss {self.loss!r}; choose {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise VeilError(f"epochs and batch_size must be >= 1 (got epochs {self.epochs}, batch_size {self.batch_size})")
        if self.max_steps is not None and self.max_steps < 1:
            raise VeilError(f"max_steps must be >= 1 or unset (got {self.max_steps})")
        check_precision(self.precision)
        for key in ("lr", "momentum", "weight_decay", "eps"):
            val = self.optimizer.get(key)
            if val is not None and (not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0):
                raise VeilError(f"optimizer setting {key} must be a finite number >= 0, got {val!r}")
        make_optimizer(self.optimizer)  # unknown name, unknown keys or lr <= 0: VeilError


class _ShapeRecorder(PlainMatmul):
    """Float64 products that record, in order, each product's ``(n, k, m)``, the arithmetic intensity the
    secure engine's rule compares with ``min_intensity``, and whether it sends the product to the accelerators
    (:class:`~veil.offload.training.protocol.SecureMatmul`, wrapped by
    :class:`~veil.offload.training.precision.PrecisionMatmul` at ``precision``; for
    :meth:`Trainer.product_plan`). The engines' rules: a matrix product goes when its intensity
    ``nkm/(nk+km+nm)`` reaches ``min_intensity``; a convolution product goes as a tensor item when
    :func:`~veil.offload.training.protocol._conv_intensity` (operands as tensors, no im2col) reaches it, else
    by the matrix rule on its im2col product (recorded: the larger of the two intensities). At ``double`` a
    backward's dW and dX take the tensor path only together (both pass), else both the matrix rule."""

    def __init__(self, min_intensity: float, precision: str) -> None:
        super().__init__()
        self.min_intensity = float(min_intensity)
        self.precision = precision
        self.plan: list[tuple[tuple[int, int, int], float, bool]] = []
        self._plain = PlainMatmul()  # the values of tensor items (its matmul records nothing)

    def _record(self, shape: tuple[int, int, int], tensor_intensity: float = 0.0, tensor: bool = False) -> None:
        """One product: sent as a tensor item (``tensor``), else by the matrix rule on ``shape``."""
        intensity = max(tensor_intensity, product_intensity(*shape))
        self.plan.append((shape, intensity, tensor or product_intensity(*shape) >= self.min_intensity))

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        self._record((u.shape[0], u.shape[1], v.shape[1]))
        return super().matmul(u, v)

    def conv_forward(self, x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                     pads: tuple[int, int, int, int]) -> tuple[np.ndarray, Any]:
        spec = _conv_spec("fwd", x, w, strides, pads)
        o = w.shape[0]
        ti = _conv_intensity(spec, x, w.reshape(o, -1).T, o)
        self._record(spec.matrix_shape(o), ti, ti >= self.min_intensity)
        return self._plain.conv_forward(x, w, strides, pads)

    def conv_backward(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, strides: tuple[int, int],
                      pads: tuple[int, int, int, int], ctx: Any, need_dx: bool) -> tuple[np.ndarray | None, np.ndarray]:
        o = w.shape[0]
        g2 = g.transpose(0, 2, 3, 1).reshape(-1, o)
        wm = w.reshape(o, -1)
        sdw, sdx = _conv_spec("dw", x, w, strides, pads), _conv_spec("dx", x, w, strides, pads)
        ti_dw, ti_dx = _conv_intensity(sdw, g2.T, x, o), _conv_intensity(sdx, g2, wm, o)
        dw_tensor = ti_dw >= self.min_intensity
        dx_tensor = need_dx and ti_dx >= self.min_intensity
        if self.precision == "double" and not (dw_tensor and (dx_tensor or not need_dx)):
            dw_tensor = dx_tensor = False  # PrecisionMatmul: the tensor path for both or for neither
        if need_dx:  # the order of MatmulEngine.conv_backward's round: dX, then dW
            self._record(sdx.matrix_shape(o), ti_dx, dx_tensor)
        self._record(sdw.matrix_shape(o), ti_dw, dw_tensor)
        return self._plain.conv_backward(x, w, g, strides, pads, ctx, need_dx)


class Trainer:
    """Trains ``model`` on ``feeds`` (dict input name -> array, sample-major) and ``labels``."""

    def __init__(self, model: Any, feeds: dict[str, np.ndarray], labels: np.ndarray, config: TrainConfig):
        self.graph: Graph = load_model(model)
        self.net = TrainGraph(self.graph)
        self.config = TrainConfig.from_dict(config.as_dict())
        names = [s.name for s in self.graph.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise TrainingDataError(f"training data lacks model input(s) {missing}; it has {sorted(feeds)}")
        self.feeds = {n: np.asarray(feeds[n]) for n in names}
        self.labels = np.asarray(labels)
        sizes = {len(v) for v in self.feeds.values()} | {len(self.labels)}
        if len(sizes) != 1:
            raise TrainingDataError(f"training inputs and labels disagree on the number of samples: {sorted(sizes)}")
        for spec in self.graph.inputs:
            got = self.feeds[spec.name].shape[1:]
            want = tuple(spec.shape[1:])
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
                raise TrainingDataError(f"training input {spec.name!r} has sample shape {got}, the model expects {want}")
        self.n = sizes.pop()
        self.opt: Optimizer = make_optimizer(self.config.optimizer)
        self.loss_fn: Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]] = LOSSES[self.config.loss]
        self.epoch, self.pos, self.step_count = 0, 0, 0
        self.history: list[float] = []
        self.timing = {"enclave_s": 0.0, "products_s": 0.0}
        self._wrapped: tuple[MatmulEngine, MatmulEngine] | None = None

    def engine(self, engine: MatmulEngine) -> MatmulEngine:
        """``engine`` at the configured product precision (a :class:`PrecisionMatmul` around it, made once)."""
        if isinstance(engine, (PlainMatmul, PrecisionMatmul)):
            return engine
        if self._wrapped is None or self._wrapped[0] is not engine:
            self._wrapped = (engine, PrecisionMatmul(engine, self.config.precision))
        return self._wrapped[1]

    # --- identity ---------------------------------------------------------------------------------
    @property
    def job(self) -> str:
        """Fingerprint of model structure, initial weights and settings (binds checkpoints to the job)."""
        h = hashlib.sha256()
        h.update(repr(self.config.as_dict()).encode())
        for nd in self.graph.nodes:
            h.update(f"{nd.name}|{nd.op}|{nd.inputs}|{sorted(nd.attrs.items())}".encode())
        h.update(str(self.n).encode())
        return h.hexdigest()[:32]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.config.batch_size)

    @property
    def total_steps(self) -> int:
        t = self.steps_per_epoch * self.config.epochs
        return min(t, self.config.max_steps) if self.config.max_steps is not None else t

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    # --- steps ------------------------------------------------------------------------------------
    def batch(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        order = epoch_order(self.config.seed, self.epoch, self.n)
        idx = order[self.pos * self.config.batch_size:(self.pos + 1) * self.config.batch_size]
        return {k: v[idx] for k, v in self.feeds.items()}, self.labels[idx]

    def step(self, engine: MatmulEngine) -> float:
        """One optimizer step on the next batch; returns its loss."""
        t0 = time.perf_counter()
        before = engine.counters["enclave_s"] + engine.counters.get("wait_s", 0.0)
        engine = self.engine(engine)
        feeds, y = self.batch()
        out, cache = self.net.forward(feeds, engine)
        loss, dout = self.loss_fn(out, y)
        grads = self.net.backward(dout, cache, engine)
        self.opt.step(self.net.params, grads)
        self.history.append(loss)
        self.step_count += 1
        self.pos += 1
        if self.pos >= self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        dt = time.perf_counter() - t0
        prod = engine.counters["enclave_s"] + engine.counters.get("wait_s", 0.0) - before
        self.timing["products_s"] += prod
        self.timing["enclave_s"] += dt - prod
        return loss

    def train(self, engine: MatmulEngine, on_step: Callable[[Trainer, float], None] | None = None,
              checkpoint: str | Path | None = None, checkpoint_every: int = 0, runtime: EnclaveRuntime | None = None,
              stop_after: int | None = None) -> list[float]:
        """Run until done (or ``stop_after`` more steps), sealing a checkpoint every ``checkpoint_every`` steps."""
        done_here = 0
        while not self.done and (stop_after is None or done_here < stop_after):
            loss = self.step(engine)
            done_here += 1
            if checkpoint and checkpoint_every and runtime and (self.step_count % checkpoint_every == 0 or self.done):
                self.save(checkpoint, runtime)
            if on_step:
                on_step(self, loss)
        return self.history

    def product_plan(self, min_intensity: float) -> list[tuple[tuple[int, int, int], float, bool]]:
        """The products ``(n, k, m)`` of one training step on the next batch (forward and backward, in
        order), the arithmetic intensity the engine's rule compares, and whether each goes to the accelerators
        (``True``) or stays in the enclave because that intensity is below ``min_intensity``, by the rules of
        :class:`~veil.offload.training.protocol.SecureMatmul` and, at this trainer's precision,
        :class:`~veil.offload.training.precision.PrecisionMatmul` (a convolution by its tensor operands' sizes,
        see :class:`_ShapeRecorder`). Computed in float64 here; nothing changes."""
        rec = _ShapeRecorder(min_intensity, self.config.precision)
        feeds, y = self.batch()
        out, cache = self.net.forward(feeds, rec)
        _, dout = self.loss_fn(out, y)
        self.net.backward(dout, cache, rec)
        return rec.plan

    # --- evaluation and export --------------------------------------------------------------------
    def predict(self, feeds: dict[str, np.ndarray], batch: int = 500) -> np.ndarray:
        """Outputs of the current parameters (plain float64 in the enclave)."""
        n = len(next(iter(feeds.values())))
        eng = PlainMatmul()
        outs = [self.net.forward({k: v[i:i + batch] for k, v in feeds.items()}, eng)[0] for i in range(0, n, batch)]
        return np.concatenate(outs)

    def trained_graph(self) -> Graph:
        """A copy of the graph holding the current parameters (float32, as ONNX stores them)."""
        import copy

        g = copy.deepcopy(self.graph)
        for nd in g.nodes:
            for key in ("W", "b"):
                k = f"{nd.name}/{key}"
                if k in self.net.params:
                    nd.params[key] = self.net.params[k].astype(np.float32)
        return g

    def onnx_bytes(self) -> bytes:
        from veil.offload.training.export import graph_to_onnx

        return graph_to_onnx(self.graph, {k: v for k, v in self.net.params.items()}).SerializeToString()

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"job": self.job, "epoch": self.epoch, "pos": self.pos, "step": self.step_count,
                "history": list(self.history), "params": {k: v.copy() for k, v in self.net.params.items()},
                "optimizer": self.opt.state_dict()}

    def load_state(self, st: dict[str, Any]) -> None:
        if st.get("job") != self.job:
            raise VeilError("the checkpoint belongs to another training job (model, data size or settings differ)")
        self.epoch, self.pos, self.step_count = int(st["epoch"]), int(st["pos"]), int(st["step"])
        self.history = [float(v) for v in st["history"]]
        for k in self.net.params:
            self.net.params[k] = np.array(st["params"][k], dtype=np.float64)
        self.opt.load_state_dict(st["optimizer"])

    def save(self, path: str | Path, runtime: EnclaveRuntime) -> int:
        return save_checkpoint(path, self.state(), runtime, self.job)

    def resume(self, path: str | Path, runtime: EnclaveRuntime) -> None:
        self.load_state(load_checkpoint(path, runtime, self.job))

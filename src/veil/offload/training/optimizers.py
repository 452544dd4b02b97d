"""Optimizers run inside the enclave (float64), with torch's update rules so runs compare with torch.

* :class:`SGD`: ``buf = momentum * buf + g`` (``buf = g`` at the first step), ``p -= lr * buf``
  (``torch.optim.SGD`` with dampening 0, no Nesterov); optional L2 ``weight_decay`` added to ``g``.
* :class:`Adam`: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` (``torch.optim.Adam``).

State is a dict of arrays (``state_dict``/``load_state_dict``) so checkpoints restore it exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.errors import VeilError

__all__ = ["Optimizer", "SGD", "Adam", "make_optimizer"]


class Optimizer:
    """Base: ``step(params, grads)`` updates ``params`` in place."""

    name = "abstract"

    def __init__(self, lr: float):
        if not lr > 0:
            raise VeilError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)
        self.t = 0
        self.state: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "state": {k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t = int(sd["t"])
        self.state = {k: np.asarray(v, dtype=np.float64).copy() for k, v in sd["state"].items()}


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.momentum, "weight_decay": self.weight_decay}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, p in params.items():
            g = grads[k] + self.weight_decay * p if self.weight_decay else grads[k]
            if self.momentum:
                buf = self.state.get(f"{k}/momentum")
                buf = g.copy() if buf is None else self.momentum * buf + g
                self.state[f"{k}/momentum"] = buf
                g = buf
            p -= self.lr * g


class Adam(Optimizer):
    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr)
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "betas": [self.b1, self.b2], "eps": self.eps, "weight_decay": self.weight_decay}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for k, p in params.items():
            g = grads[k] + self.weight_decay * p if self.weight_decay else grads[k]
            m = self.state.get(f"{k}/m", np.zeros_like(p))
            v = self.state.get(f"{k}/v", np.zeros_like(p))
            m = self.b1 * m + (1.0 - self.b1) * g
            v = self.b2 * v + (1.0 - self.b2) * g * g
            self.state[f"{k}/m"], self.state[f"{k}/v"] = m, v
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def make_optimizer(spec: dict[str, Any]) -> Optimizer:
    """``{"name": "sgd"|"adam", "lr": ..., ...}`` -> optimizer (unknown names or keys: VeilError)."""
    spec = dict(spec)
    name = str(spec.pop("name", "sgd")).lower()
    try:
        if name == "sgd":
            return SGD(**spec)
        if name == "adam":
            if "betas" in spec:
                spec["betas"] = tuple(spec["betas"])
            return Adam(**spec)
    except TypeError as e:
        raise VeilError(f"bad optimizer settings for {name}: {e}") from None
    raise VeilError(f"unknown optimizer {name!r}; choose sgd or adam")

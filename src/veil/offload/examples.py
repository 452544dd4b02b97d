"""Example models for tests, benchmarks and demos of offload mode (needs torch).

* :func:`mnist_graph`: SecureNN's MNIST networks A-D; the shipped trained ONNX file when present,
  otherwise the same architecture with random weights (seeded), exported through ``load_model``.
* :func:`encoder_graph`: a BERT-style encoder layer (multi-head self-attention, residuals, LayerNorm,
  GELU feed-forward) with a fixed sequence length, exported at ONNX opset 20 so that GELU and
  LayerNormalization stay single ops that veil's importer knows.
"""

from __future__ import annotations

from typing import Any

from veil.errors import ModelError
from veil.graph import Graph, load_model

__all__ = ["mnist_module", "mnist_graph", "EncoderLayer", "encoder_graph"]


def mnist_module(name: str) -> Any:
    """Untrained torch module of SecureNN network ``name`` (A, B, C or D)."""
    from torch import nn

    if name == "A":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    if name == "B":
        return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(16, 16, 5), nn.ReLU(),
                             nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 10))
    if name == "C":
        return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                             nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    if name == "D":
        return nn.Sequential(nn.Conv2d(1, 5, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(980, 100),
                             nn.ReLU(), nn.Linear(100, 10))
    raise ModelError(f"unknown network {name!r}: expected one of A, B, C, D")


def mnist_graph(name: str, prefer_shipped: bool = True, seed: int = 0) -> tuple[Graph, str]:
    """(graph, source) where source is 'shipped' or 'random-weights'."""
    if prefer_shipped:
        try:
            from veil.assets import model_path

            return load_model(model_path(name)), "shipped"
        except ModelError:
            pass
    import torch

    torch.manual_seed(seed)
    return load_model(mnist_module(name), example=torch.zeros(1, 1, 28, 28)), "random-weights"


def _encoder_cls() -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class _Encoder(nn.Module):
        def __init__(self, hidden: int = 64, heads: int = 4, ff: int = 128, seq: int = 16):
            super().__init__()
            self.h, self.nh, self.seq, self.dh = hidden, heads, seq, hidden // heads
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.f1, self.f2, self.act = nn.Linear(hidden, ff), nn.Linear(ff, hidden), nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def split(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, self.seq, self.nh, self.dh).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = F.softmax(q @ k.transpose(-1, -2) * (1.0 / self.dh**0.5), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(-1, self.seq, self.h)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.f2(self.act(self.f1(x))))

    return _Encoder


def EncoderLayer(hidden: int = 64, heads: int = 4, ff: int = 128, seq: int = 16) -> Any:  # noqa: N802
    """A BERT-style encoder layer as a torch module (input (N, seq, hidden))."""
    return _encoder_cls()(hidden, heads, ff, seq)


def encoder_graph(hidden: int = 64, heads: int = 4, ff: int = 128, seq: int = 16, seed: int = 0) -> tuple[Graph, Any]:
    """(veil graph, torch module) of a random-weight encoder layer."""
    import torch

    from veil.graph.torch_import import torch_to_onnx_bytes

    torch.manual_seed(seed)
    mod = EncoderLayer(hidden, heads, ff, seq).eval()
    data = torch_to_onnx_bytes(mod, torch.zeros(1, seq, hidden), opset=20)
    g = load_model(data)
    g.name = "encoder"
    return g, mod

"""Model definitions for offload training examples, tests and benchmarks (need torch).

* :func:`deep_crossing`: a DeepCrossing-style click model (Shan et al., KDD 2016): one embedding per
  categorical field (a bias-free linear layer on the field's one-hot vector), a linear layer on the
  dense features, stacking (the embeddings live in one width ``d`` and are summed: concatenation
  followed by the first linear layer, with that layer folded into the tables), residual units
  ``relu(x + W2 relu(W1 x + b1) + b2)``, and a sigmoid scoring layer.
* :func:`torch_to_graph`: a torch module with its initial weights -> veil graph (via ONNX).
"""

from __future__ import annotations

from typing import Any

from veil.graph import Graph, load_model

__all__ = ["deep_crossing", "torch_to_graph", "click_inputs"]


def click_inputs(vocab: tuple[int, ...]) -> tuple[str, ...]:
    return (*[f"cat{f}" for f in range(len(vocab))], "dense")


def deep_crossing(vocab: tuple[int, ...], dense: int, d: int = 16, hidden: int = 32, units: int = 2, seed: int = 0) -> Any:
    """The DeepCrossing-style torch module (seeded initial weights); inputs ``cat0..``, ``dense``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

        def forward(self, x: Any) -> Any:
            return torch.relu(x + self.l2(torch.relu(self.l1(x))))

    class DeepCrossing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.ModuleList([nn.Linear(v, d, bias=False) for v in vocab])
            self.dense = nn.Linear(dense, d)
            self.res = nn.Sequential(*[Residual() for _ in range(units)])
            self.out = nn.Linear(d, 1)

        def forward(self, *xs: Any) -> Any:
            h = self.dense(xs[-1])
            for e, x in zip(self.emb, xs[:-1], strict=True):
                h = h + e(x)
            return torch.sigmoid(self.out(self.res(h)))

    return DeepCrossing()


def torch_to_graph(module: Any, example: Any, input_names: tuple[str, ...] = ("x",), output: str = "logits") -> Graph:
    """A torch module (its current weights) as a veil graph."""
    return load_model(module, example=example, input_names=input_names, output_names=(output,))

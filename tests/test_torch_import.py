"""PyTorch modules become veil graphs through torch.onnx; outputs match torch itself."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from veil.graph import load_model  # noqa: E402
from veil.plain import run_plain  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = self.avg(self.pool(torch.relu(self.bn(self.conv(x)))))
        h = torch.flatten(h, 1)
        return self.fc2(torch.relu(self.fc1(h)) - 0.5) / 2.0


def test_torch_module_matches_torch():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial batch-norm statistics so folding is exercised
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
        net.bn.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(5, 1, 12, 12)
    graph = load_model(net, example=x)
    assert "conv2d" in graph.ops and not any(n.op == "mul_const" and n.params["c"].ndim == 3 for n in graph.nodes)
    want = net(x).detach().numpy()
    got = next(iter(run_plain(graph, x.numpy()).values()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # dynamic batch: another batch size runs too
    x2 = torch.randn(2, 1, 12, 12)
    np.testing.assert_allclose(next(iter(run_plain(graph, x2).values())), net(x2).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_load_model_needs_example():
    from veil.errors import ModelError

    with pytest.raises(ModelError, match="example input"):
        load_model(Net())


class Encoderish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(self.ln(x))
        a = torch.softmax(h @ h.transpose(1, 2) / 2.0, dim=-1)
        return nn.functional.gelu(a @ h) + x


@pytest.mark.parametrize("opset", [17, 20])
def test_transformer_pieces_at_both_opsets(opset):
    """opset 17 exports GELU as Erf arithmetic (recognised at import), opset 20 as Gelu: both become `gelu`."""
    torch.manual_seed(1)
    net = Encoderish().eval()
    with torch.no_grad():
        net.ln.weight.uniform_(0.5, 2)
        net.ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 8)
    graph = load_model(net, example=x, opset=opset)
    assert "gelu" in graph.ops and "erf" not in graph.ops
    got = next(iter(run_plain(graph, x.numpy()).values()))
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` exports as Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, groups=3)
        self.bn = nn.BatchNorm1d(6 * 4 * 4)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(h.view(h.size(0), -1))
        return self.fc(self.bn(h))


def test_view_with_dynamic_batch_and_batchnorm1d_after_relu():
    torch.manual_seed(2)
    net = ViewNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    graph = load_model(net, example=torch.randn(2, 3, 6, 6))
    assert graph.inputs[0].shape[0] is None and "reshape" in graph.ops
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        got = next(iter(run_plain(graph, x.numpy()).values()))
        np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)

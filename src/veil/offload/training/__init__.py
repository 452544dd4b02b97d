"""Offload training: the enclave trains a model on private data; three untrusted accelerators compute
every product of the linear and convolution layers (forward and backward) on Beaver-masked field
elements, each product checked with Freivalds' test. See docs/offload.md ("Training").

Start with :class:`Trainer` (data, model, optimizer), :func:`train_offload_local` (enclave and
accelerators as threads) or ``veil offload train`` (processes over mutual TLS).
"""

from veil.offload.training.accelerator import TrainAccelerator, serve_train_accelerator
from veil.offload.training.checkpoint import load_checkpoint, save_checkpoint
from veil.offload.training.data import load_mnist, synthetic_clicks
from veil.offload.training.export import graph_to_onnx
from veil.offload.training.layers import TRAIN_OPS, TrainGraph
from veil.offload.training.local import TrainRun, train_offload_local
from veil.offload.training.optimizers import SGD, Adam, make_optimizer
from veil.offload.training.protocol import TRAIN_ACCELERATORS, PlainMatmul, SecureMatmul
from veil.offload.training.trainer import TrainConfig, Trainer, epoch_order

__all__ = [
    "Trainer", "TrainConfig", "epoch_order", "TrainGraph", "TRAIN_OPS", "SecureMatmul", "PlainMatmul",
    "TRAIN_ACCELERATORS", "TrainAccelerator", "serve_train_accelerator", "train_offload_local", "TrainRun",
    "SGD", "Adam", "make_optimizer", "save_checkpoint", "load_checkpoint", "graph_to_onnx", "load_mnist",
    "synthetic_clicks",
]

"""veil: confidential machine-learning inference.

One model graph (:mod:`veil.graph`), one reference executor (:mod:`veil.plain`), and four
protection modes: ``mpc``, ``permute``, ``offload`` and ``attested``.
"""

from veil.errors import (
    ChannelError,
    DeploymentError,
    InputError,
    ModelError,
    UnsupportedOpError,
    VeilError,
)
from veil.graph import Graph, Node, TensorSpec, load_model
from veil.plain import run_plain

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Graph",
    "Node",
    "TensorSpec",
    "load_model",
    "run_plain",
    "VeilError",
    "ModelError",
    "UnsupportedOpError",
    "InputError",
    "ChannelError",
    "DeploymentError",
]

"""Per-op compilers of the mpc program: ``COMPILERS[op](builder, node, inputs)``.

To support a new op: write ``compile_<op>(b, node, src)`` in the module of its family (or a new
module), using the builder's shapes/scales and the kernels of :mod:`veil.mpc.kernels`, and add it to
:data:`COMPILERS`. :data:`MPC_OPS` (what the loader accepts for mpc) is the registry's key set.
"""

from __future__ import annotations

from veil.mpc.compilers.base import (
           FIXED_OPS,
           Builder,
           Compiler,
           Instr,
           ServerState,
           fixed_matrix,
           fixed_spec,
           refuse,
)
from veil.mpc.compilers.compare import compile_relu, compile_tournament
from veil.mpc.compilers.elementwise import compile_add_const, compile_add_sub, compile_mul_const
from veil.mpc.compilers.embedding import compile_embedding
from veil.mpc.compilers.linear import DIRECT_INPUT, compile_linear
from veil.mpc.compilers.nonlinear import PIECEWISE_OPS, compile_elementwise, compile_norm, compile_softmax
from veil.mpc.compilers.pooling import compile_avgpool
from veil.mpc.compilers.products import compile_matmul, compile_mul
from veil.mpc.compilers.shape import compile_shape
from veil.mpc.compilers.tensor import compile_concat, compile_reduce, compile_tensor_op

__all__ = ["COMPILERS", "MPC_OPS", "Builder", "Compiler", "Instr", "ServerState", "fixed_spec", "refuse",
           "DIRECT_INPUT", "FIXED_OPS", "fixed_matrix"]

COMPILERS: dict[str, Compiler] = {
    "linear": compile_linear,
    "conv2d": compile_linear,
    "relu": compile_relu,
    "maxpool": compile_tournament,
    "argmax": compile_tournament,
    "avgpool": compile_avgpool,
    "global_avgpool": compile_avgpool,
    "flatten": compile_shape,
    "reshape": compile_shape,
    "transpose": compile_shape,
    "add": compile_add_sub,
    "sub": compile_add_sub,
    "add_const": compile_add_const,
    "mul_const": compile_mul_const,
    "mul": compile_mul,
    "matmul": compile_matmul,
    "softmax": compile_softmax,
    "unsqueeze": compile_tensor_op,
    "squeeze": compile_tensor_op,
    "slice": compile_tensor_op,
    "gather": compile_tensor_op,
    "concat": compile_concat,
    "reduce_sum": compile_reduce,
    "reduce_mean": compile_reduce,
    "layernorm": compile_norm,
    "rmsnorm": compile_norm,
    "reciprocal": compile_elementwise,
    "rsqrt": compile_elementwise,
    "sqrt": compile_elementwise,
    "embedding": compile_embedding,
    **{op: compile_elementwise for op in PIECEWISE_OPS},
}

MPC_OPS: frozenset[str] = frozenset(COMPILERS)

"""mpc kernels, named by the kinds of their inputs (a: arithmetic share, b: binary share, p: public,
w: fixed secret weight masked once at setup). Each module documents its protocol steps, its
paper reference, and declares its cost (``*_cost``), which the tests check against the channels."""

from veil.mpc.kernels.arith import add_ap, mul_ap, trunc_a, trunc_a_cost, upscale_a
from veil.mpc.kernels.base import Cost, Ctx
from veil.mpc.kernels.compare import and_bb, relu_a, select_a, select_a_cost
from veil.mpc.kernels.pool import argmax_a, argmax_a_cost, maxpool_a, maxpool_a_cost
from veil.mpc.kernels.products import (
    beaver_cost,
    conv_ap,
    conv_aw,
    linear_aw,
    matmul_aa,
    matmul_ap,
    mul_aa,
    product_aw_cost,
)

__all__ = [
    "Ctx", "Cost", "add_ap", "mul_ap", "upscale_a", "trunc_a", "trunc_a_cost", "and_bb", "select_a",
    "select_a_cost", "relu_a", "maxpool_a", "maxpool_a_cost", "argmax_a", "argmax_a_cost", "mul_aa",
    "matmul_aa", "matmul_ap", "conv_ap", "linear_aw", "conv_aw", "product_aw_cost", "beaver_cost",
]

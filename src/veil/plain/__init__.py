"""The plain (reference) executor and its NumPy kernels."""

from veil.plain.executor import PLAIN_OPS, check_inputs, run_plain, trace_shapes

__all__ = ["run_plain", "check_inputs", "trace_shapes", "PLAIN_OPS"]

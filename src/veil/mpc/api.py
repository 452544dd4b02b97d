"""In-process entry point: run a model under mpc with the five parties as threads.

>>> pred, report = veil.mpc.run("model.onnx", x)            # doctest: +SKIP

``pred`` holds the user's outputs (``{name: array}``; a bare array for single-output models);
``report`` (:class:`~veil.mpc.report.Report`) the time, bytes and rounds of the online, offline and
setup phases and, with ``compare=True``, the error against the plain executor on the same input.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from veil.graph import load_model
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.party import blas_single_thread
from veil.mpc.report import Report, compare_with_plain
from veil.mpc.roles import dealer_role, owner_role, server_role, user_role
from veil.net.local import run_local
from veil.options import check_batch_size, check_int, check_timeout
from veil.plain.executor import run_plain

__all__ = ["run", "run_session", "load"]


def check_options(frac_bits: Any, batch_size: Any, timeout: Any) -> tuple[int, int | None, float]:
    """The run options checked (one :class:`~veil.errors.OptionError` naming the bad one)."""
    return (check_int(frac_bits, "frac_bits", 4, 28, why="a product carries 2f fractional bits in a 62-bit range"),
            check_batch_size(batch_size), check_timeout(timeout))


def load(model: Any, x: Any) -> Any:
    """Load a model into veil's graph; a torch module is traced with (the first input of) ``x``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        ex = next(iter(x.values())) if isinstance(x, dict) else x
        return load_model(model, example=torch.as_tensor(np.asarray(ex)))
    return load_model(model)


def run_session(model: Any, x: Any, frac_bits: int = 16, batch_size: int | None = None,
                timeout: float = 60.0, segment_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the five roles as threads; return (results by party, channels by party). ``segment_bytes``:
    dealer material per program segment (default :data:`veil.mpc.program.SEGMENT_BYTES`; 0: one segment)."""
    frac_bits, batch_size, timeout = check_options(frac_bits, batch_size, timeout)
    if segment_bytes is not None:
        segment_bytes = check_int(segment_bytes, "segment_bytes", 0, 2**62, why="a byte count (0: one segment per query)")
    graph = load(model, x)
    fp = FixedPoint(frac_bits)
    parties = {
        "owner": lambda ch: owner_role(ch, graph, fp),
        "user": lambda ch: user_role(ch, x, batch_size, segment_bytes),
        "server0": lambda ch: server_role(ch, 0),
        "server1": lambda ch: server_role(ch, 1),
        "dealer": lambda ch: dealer_role(ch),
    }
    with blas_single_thread():  # several parties call BLAS at once: threaded BLAS would thrash
        return run_local(parties, timeout=timeout)


def run(model: Any, x: Any, frac_bits: int = 16, batch_size: int | None = None, compare: bool = True,
        timeout: float = 60.0, segment_bytes: int | None = None) -> tuple[Any, Report]:
    """Secure inference of ``model`` (ONNX path/bytes, torch module, or veil Graph) on ``x``.

    ``batch_size``: samples per query (``None``: all at once); ``frac_bits``: 4..28. Bad values are
    an :class:`~veil.errors.OptionError`. ``segment_bytes``: the dealer's material is made, sent and
    expanded one program segment of at most this many bytes (one server's view) at a time, right before
    the segment runs, so memory holds one segment (default :data:`veil.mpc.program.SEGMENT_BYTES`; 0: the
    whole query at once). Returns ``(outputs, report)`` like every mode's ``run``."""
    check_options(frac_bits, batch_size, timeout)
    graph = load(model, x)
    t0 = time.perf_counter()
    res, _ = run_session(graph, x, frac_bits, batch_size, timeout, segment_bytes)
    total = time.perf_counter() - t0
    user = res["user"]
    rep: Report = user["report"]
    rep.setup_s = max(total - rep.online_s - rep.offline_s, 0.0)
    outs = user["outputs"]
    pred: Any = next(iter(outs.values())) if len(outs) == 1 else outs
    if compare:
        t1 = time.perf_counter()
        ref = run_plain(graph, x)
        rep.plain_s = time.perf_counter() - t1
        o = graph.outputs[0]
        compare_with_plain(rep, outs[o], np.asarray(ref[o]))
    return pred, rep

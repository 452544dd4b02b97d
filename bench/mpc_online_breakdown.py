"""server0's online time per kind of node for all-MiniLM-L6-v2 under mpc (one in-process run: five
parties as threads, in-memory channels, one BLAS/torch thread each), and each server's thread CPU time
during its online phase (less sensitive than wall time to the other jobs of a shared host). Prints one line.

    python bench/mpc_online_breakdown.py [--seq 32] [--batch 2]

Before/after a change, on the same load: run it alternately on two checkouts, e.g.
``PYTHONPATH=<old checkout>/src python bench/mpc_online_breakdown.py`` then without PYTHONPATH.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import veil.mpc as M
import veil.mpc.program as P

_TIMES: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch (the ring's int64 products, when installed) on one thread, like the BLAS (threadpoolctl
    does not reach torch's pool in the party threads)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_RUN = P.Program.run_range


_CPU: collections.Counter[int] = collections.Counter()  # thread CPU seconds of each server's online phase


def _timed_run(self: P.Program, st: Any, env: dict[str, np.ndarray], store: Any, lo: int = 0,
               hi: int | None = None) -> None:
    c0 = time.thread_time()
    if st.ctx.party != 0:
        _RUN(self, st, env, store, lo, hi)
    else:
        for ins in self.instrs[lo:hi]:
            t = time.perf_counter()
            ins.run(st, env, store)
            _TIMES[ins.name] += time.perf_counter() - t
    _CPU[st.ctx.party] += time.thread_time() - c0


def _kind(name: str) -> str:
    for key, kind in (("intermediate_act_fn", "gelu"), ("word_embeddings", "embedding"), ("Softmax", "softmax"),
                      ("LayerNorm", "layernorm"), ("MatMul", "products")):
        if key in name and "trunc:" not in name:
            return kind
    return "other (truncations, adds, shape ops)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="sentences (1 or 2)")
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from veil.models import minilm as ML

    texts = ["A man is playing a guitar on the street.", "The weather is lovely today."][: a.batch]
    ids, mask = ML.tokenize(texts, a.seq)
    g = ML.minilm_graph(mask)
    ref = ML.reference_embeddings(texts, a.seq)
    P.Program.run_range = _timed_run  # type: ignore[method-assign]
    try:
        with threadpool_limits(1), one_torch_thread():
            out, rep = M.run(g, ids, compare=False)
    finally:
        P.Program.run_range = _RUN  # type: ignore[method-assign]
    emb = np.asarray(out)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    kinds: collections.Counter[str] = collections.Counter()
    for name, s in _TIMES.items():
        kinds[_kind(name)] += s
    load = open("/proc/loadavg").read().split()[0] if sys.platform.startswith("linux") else "?"
    print(f"{M.__file__.split('/src/')[0].split('/')[-1]}: batch {a.batch}, online {rep.online_s:.2f} s, "
          f"{rep.online_bytes / 1e6:.0f} MB, {rep.rounds} rounds, cosine min {cos.min():.6f}; servers' online CPU "
          f"{_CPU[0]:.2f} / {_CPU[1]:.2f} s; load {load}; server0 by kind: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in kinds.most_common()))


if __name__ == "__main__":
    main()

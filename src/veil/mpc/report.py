"""What an inference reports: time (online, offline, setup), bytes, rounds, and error vs plaintext."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Report", "compare_with_plain"]


@dataclass
class Report:
    """Totals over all queries of one session. Bytes are payload bytes sent by all parties.

    * ``online_*``: from the user sending its input shares to receiving both output shares
      (servers' traffic plus the user's input and the outputs).
    * ``offline_*``: the dealer producing and sending a query's material and the servers
      expanding it and precomputing (before the input exists; when the query runs in several
      segments, each later segment's material is made between the online parts, never during one).
    * ``setup_*``: once per session (weights shared, fixed weight masks opened).
    * ``rounds``: communication rounds of server0 in the online phase (all queries), counted by its
      channel, including the round that sends its output share to the user: the latency the
      protocol pays. ``declared_rounds`` is the same from the kernels' declarations (+1 per query).
    """

    images: int = 0
    queries: int = 0
    batch: int = 0
    frac_bits: int = 16
    online_s: float = 0.0
    offline_s: float = 0.0
    setup_s: float = 0.0
    online_bytes: int = 0
    offline_bytes: int = 0
    setup_bytes: int = 0
    rounds: int = 0
    declared_rounds: int = 0
    declared_server_bytes: int = 0
    server_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    plain_s: float | None = None
    agreement: float | None = None
    max_abs_error: float | None = None
    kl_divergence: float | None = None
    per_query: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.images} images in {self.queries} queries: online {self.online_s * 1e3:.1f} ms, offline "
             f"{self.offline_s * 1e3:.1f} ms, {self.online_bytes / 1e6:.2f} MB online + {self.offline_bytes / 1e6:.2f} MB "
             f"offline, {self.rounds} rounds")
        if self.agreement is not None:
            s += f", agreement {self.agreement:.2%}, max |error| {self.max_abs_error:.2e}"
        return s


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compare_with_plain(report: Report, secure: np.ndarray, plain: np.ndarray) -> Report:
    """Fill agreement (arg-max over the last axis), max |error| and mean KL(plain || secure)."""
    secure, plain = np.asarray(secure, np.float64), np.asarray(plain, np.float64)
    report.max_abs_error = float(np.abs(secure - plain).max()) if secure.size else 0.0
    if secure.ndim >= 2 and secure.shape[-1] > 1:
        report.agreement = float((secure.argmax(-1) == plain.argmax(-1)).mean())
        p, q = _softmax(plain), _softmax(secure)
        report.kl_divergence = float(np.mean(np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300)), -1)))
    else:
        report.agreement = float((np.round(secure) == np.round(plain)).mean())
    return report

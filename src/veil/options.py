"""Checks of the options every mode shares, so that a bad value is one clear :class:`OptionError`
(with the same words in every mode) instead of a silent default or a traceback from deep inside.

The same option has the same name everywhere: ``batch_size`` (``--batch-size``: samples per query;
``None`` means all at once), ``hazmat_allow_simulation`` (``--hazmat-allow-simulation``, see
:mod:`veil.simulation`), ``timeout`` (seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.errors import InputError, OptionError

__all__ = ["check_batch_size", "check_int", "check_choice", "check_timeout", "read_inputs"]


def _is_int(v: Any) -> bool:
    import numpy as np

    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None, why: str = "") -> int:
    """``value`` as an int in ``[lo, hi]``, else :class:`OptionError` naming ``name`` and the range."""
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = (f"from {lo} to {hi}" if lo is not None and hi is not None else
               f">= {lo}" if lo is not None else f"<= {hi}" if hi is not None else "")
        raise OptionError(f"{name} must be a whole number {rng}{f' ({why})' if why else ''}; got {value!r}")
    return int(value)


def check_batch_size(value: Any, name: str = "batch_size") -> int | None:
    """Samples per query: ``None`` (all at once) or a whole number >= 1 (0 and negatives are errors)."""
    if value is None:
        return None
    return check_int(value, name, 1, why="samples per query; leave it unset for all at once")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` if it is one of ``choices``, else :class:`OptionError` listing them."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return str(value)


def check_timeout(value: Any, name: str = "timeout") -> float:
    """A positive, finite number of seconds."""
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"{name} must be a positive number of seconds; got {value!r}")
    return float(value)


def read_inputs(path: str | Path) -> Any:
    """Inputs from a file: ``.npy`` (one array) or ``.npz`` (named arrays, as a dict); never unpickles.
    A missing or unreadable file is an :class:`~veil.errors.InputError` naming it."""
    import numpy as np

    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read inputs from {str(p)!r}: expected a .npy or .npz file ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {k: data[k] for k in data.files}
    return data

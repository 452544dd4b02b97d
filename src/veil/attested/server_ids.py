"""The model id syntax shared by server and client."""

from __future__ import annotations

import re

__all__ = ["MODEL_ID_PATTERN", "is_model_id"]

MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Match with ``fullmatch`` (see :func:`is_model_id`): ``$`` would also accept a trailing newline."""


def is_model_id(value: object) -> bool:
    """True if ``value`` is a model id: 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    return isinstance(value, str) and MODEL_ID_PATTERN.fullmatch(value) is not None

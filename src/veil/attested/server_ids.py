"""The model id syntax shared by server and client."""

from __future__ import annotations

import re

__all__ = ["MODEL_ID_PATTERN"]

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

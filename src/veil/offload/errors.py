"""Errors specific to the offload mode (all subclass veil's tree in :mod:`veil.errors`)."""

from __future__ import annotations

from veil.errors import ChannelError, InputRangeError, IntegrityError, ModelError, ProtocolError

__all__ = ["SealError", "AcceleratorUnavailableError", "AcceleratorProtocolError", "FieldRangeError",
           "OffloadModelError"]


class SealError(IntegrityError):
    """Sealed material did not authenticate (tampered, swapped between slots, or foreign)."""


class AcceleratorUnavailableError(ChannelError):
    """An accelerator died, disconnected or did not answer within the timeout."""


class AcceleratorProtocolError(ProtocolError):
    """An accelerator sent a malformed answer (wrong type, shape, dtype or out-of-field values)."""


class FieldRangeError(InputRangeError):
    """Activations are too large for the field to hold a linear layer's result exactly."""


class OffloadModelError(ModelError):
    """The model cannot be compiled into the offload split (e.g. a layer too wide for exact arithmetic)."""

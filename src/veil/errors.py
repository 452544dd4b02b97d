"""veil's exception tree. Every error a user can meet derives from :class:`VeilError`.

Messages name what was wrong and what was expected. They never contain secret values
(weights, inputs, shares, keys): only names, shapes, dtypes, counts and addresses.

Mode-specific errors live next to their mode and subclass the classes here
(e.g. ``veil.attested.errors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "VeilError",
    "OptionError",
    "ModelError",
    "ModelFormatError",
    "UnsupportedOpError",
    "InputError",
    "InputShapeError",
    "InputDtypeError",
    "InputRangeError",
    "DeploymentError",
    "ChannelError",
    "PeerTimeoutError",
    "PeerDisconnectedError",
    "PeerAuthError",
    "PeerAbortedError",
    "ProtocolError",
    "MaterialExhaustedError",
    "IntegrityError",
    "SimulationNotAllowedError",
]


class VeilError(Exception):
    """Base class of every error raised by veil."""


class OptionError(VeilError, ValueError):
    """An argument or option has a value veil cannot use (``batch_size=0``, ``frac_bits=40``, an
    unknown backend): the message names the option, the value and what is accepted."""


# --- models -----------------------------------------------------------------------------------
class ModelError(VeilError):
    """A model could not be loaded or converted into veil's graph."""


class ModelFormatError(ModelError):
    """The model file is not a valid model of the expected format."""


class UnsupportedOpError(ModelError):
    """A node uses an operator (or an attribute value) that veil cannot run."""

    def __init__(self, node: str, op: str, supported: Iterable[str], detail: str = "", where: str = "veil"):
        self.node, self.op, self.supported = node, op, sorted(set(supported))
        msg = f"node {node!r}: operator {op!r} is not supported by {where}"
        if detail:
            msg += f" ({detail})"
        msg += f"; supported operators: {', '.join(self.supported)}"
        super().__init__(msg)


# --- inputs -----------------------------------------------------------------------------------
class InputError(VeilError):
    """An input does not match what the model declares or what a mode can represent."""


class InputShapeError(InputError):
    """An input's shape differs from the model's declared input shape (both are in the message)."""

    def __init__(self, name: str, got: Sequence[int], expected: Sequence[int | None]):
        self.name, self.got, self.expected = name, tuple(got), tuple(expected)
        exp = "(" + ", ".join("?" if d is None else str(d) for d in expected) + ")"
        super().__init__(f"input {name!r} has shape {tuple(got)}, but the model expects {exp}")


class InputDtypeError(InputError):
    """An input's dtype differs from the model's declared input dtype."""

    def __init__(self, name: str, got: str, expected: str):
        self.name, self.got, self.expected = name, got, expected
        super().__init__(f"input {name!r} has dtype {got}, but the model expects {expected}")


class InputRangeError(InputError):
    """A value is outside the range a fixed-point or quantised format can hold."""


# --- deployments and channels -------------------------------------------------------------------
class DeploymentError(VeilError):
    """A deployment file or key directory is missing, malformed or inconsistent."""


class ChannelError(VeilError):
    """Communication with a peer party failed. ``peer`` names the party that went away, when known."""

    def __init__(self, message: str = "", *, peer: str | None = None):
        super().__init__(message)
        self.peer = peer


class PeerTimeoutError(ChannelError):
    """A peer sent nothing within the receive timeout."""


class PeerDisconnectedError(ChannelError):
    """A peer closed its connection or died."""


class PeerAuthError(ChannelError):
    """A peer could not prove it is the party it claims to be (mutual TLS refused)."""


class PeerAbortedError(ChannelError):
    """A peer stopped the session and said why (its own error, or a third party that died).

    ``sender`` is the peer that sent the notice; ``peer`` the party it blames (the one that died or
    was refused), which may be a third party; ``reason`` the sender's own error message."""

    def __init__(self, me: str, sender: str, reason: str, culprit: str | None = None):
        self.sender, self.reason = sender, reason
        if culprit and culprit != sender:
            msg = f"party {me!r}: {culprit!r} failed or went away (reported by {sender!r}: {reason})"
        else:
            msg = f"party {me!r}: {sender!r} stopped the session: {reason}"
        super().__init__(msg, peer=culprit or sender)


# --- protocols ----------------------------------------------------------------------------------
class ProtocolError(VeilError):
    """Parties disagree or a protocol invariant does not hold."""


class MaterialExhaustedError(ProtocolError):
    """Precomputed correlated randomness (triples, masks, unblinding factors) ran out.

    veil never reuses such material: running out is always this error."""


class IntegrityError(ProtocolError):
    """An untrusted party returned a result that failed a verification check."""


class SimulationNotAllowedError(VeilError):
    """A simulated enclave or attestation was met without the explicit hazmat opt-in."""


"""The one-line ``error: ...`` that veil's commands print for a :class:`~veil.errors.VeilError`.

A module of its own so that ``veil.cli.main`` and the mode modules it imports can share it."""

from __future__ import annotations

from rich.text import Text

__all__ = ["error_line"]


def error_line(message: str, style: str = "bold red") -> Text:
    """``error: MESSAGE`` as rich text: the message is printed as it is, never read as rich markup
    (a path like ``x[/a].npy`` stays intact)."""
    return Text.assemble(("error:", style), f" {message}")

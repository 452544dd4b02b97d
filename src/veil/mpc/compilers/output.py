"""``softmax`` as a graph output: the servers reveal its input (the logits) to the user, who applies
softmax after reconstruction (public post-processing of values the user is entitled to)."""

from __future__ import annotations

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder, refuse

__all__ = ["compile_softmax_output"]


def compile_softmax_output(b: Builder, node: Node, src: list[str]) -> None:
    if node.output not in b.graph.outputs or b.graph.consumers(node.output):
        raise refuse(node, "softmax is only supported as a final output; the user "
                                 "applies it after reconstruction")
    b.alias[node.output] = src[0]
    b.post[node.output] = ("softmax", node.attrs["axis"])

"""Exact graph rewrites that make secure execution cheaper.

``relu`` followed only by ``maxpool`` becomes ``maxpool`` then ``relu``: both are monotone and
``max(relu(a), relu(b)) = relu(max(a, b))`` exactly, so the result is identical while ReLU then
runs on the pooled (k-times smaller) tensor. For network C this cuts the comparisons of the first
ReLU layer by 4x.
"""

from __future__ import annotations

import copy

from veil.graph.ir import Graph

__all__ = ["pool_before_relu"]


def pool_before_relu(graph: Graph) -> Graph:
    g = copy.copy(graph)
    nodes = list(graph.nodes)
    i = 0
    while i < len(nodes) - 1:
        r, m = nodes[i], nodes[i + 1]
        users = [n for n in nodes if r.output in n.inputs]
        if (r.op == "relu" and m.op == "maxpool" and m.inputs == (r.output,) and users == [m]
                and r.output not in graph.outputs):
            mid = r.output + "/pooled"
            new_m = copy.copy(m)
            new_m.inputs, new_m.output = (r.inputs[0],), mid
            new_r = copy.copy(r)
            new_r.inputs, new_r.output = (mid,), m.output
            nodes[i], nodes[i + 1] = new_m, new_r
        i += 1
    g.nodes = nodes
    return g

"""A decoder's trace at any micro-batch size, from its traces at two sizes.

Every number a trace of a zoo decoder holds is affine in the micro-batch size b: op
FLOPs and activation bytes grow linearly with b, weight bytes and parameter counts do
not move, and shapes carry b (or b x heads) in one dimension. So from the traces at
b = 2 and b = 3 (not b = 1, where PyTorch may pick other ops for a batch of one),
value(b) = value(2) + (value(3) - value(2)) * (b - 2), field by field, is the trace
at b - without tracing it (tests/simulate/test_batch_scaling.py checks it equals a real trace,
field for field, for GPT and Llama blocks, SDPA and unfused attention with dropout).

That makes every micro-batch size cheap to price, so the planner can search all the
sizes that divide a rank's share of the batch rather than a few powers of two. A pair
of traces that do not line up (other ops, other structure) yields None, and the caller
traces for real.
"""
from __future__ import annotations

import dataclasses

import networkx as nx

from planner.ir import TracedModel

BASE_MICRO_BATCHES = (2, 3)


class _NotAffine(Exception):
    pass


def scaled_trace(at_2: TracedModel, at_3: TracedModel, micro_batch: int) -> TracedModel | None:
    """The trace at `micro_batch` (> 3), or None when the two traces do not line up."""
    if (at_2.micro_batch, at_3.micro_batch) != BASE_MICRO_BATCHES or len(at_2.layers) != len(at_3.layers):
        return None
    signatures = {}
    for a, b in zip(at_2.layers, at_3.layers):
        known = signatures.setdefault(a.signature, (b.signature, f"{a.signature}~b{micro_batch}"))
        if known[0] != b.signature:
            return None
    try:
        costs = {signatures[sig][1]: dataclasses.replace(
                     _affine(cost, at_3.costs[signatures[sig][0]], micro_batch), signature=signatures[sig][1])
                 for sig, cost in at_2.costs.items() if sig in signatures}
        layers = [dataclasses.replace(_affine(a, b, micro_batch), signature=signatures[a.signature][1])
                  for a, b in zip(at_2.layers, at_3.layers)]
        scalars = {f.name: _affine(getattr(at_2, f.name), getattr(at_3, f.name), micro_batch)
                   for f in dataclasses.fields(TracedModel)
                   if f.name not in ("layers", "costs", "micro_batch", "trace_seconds")}
    except _NotAffine:
        return None
    return TracedModel(**scalars, layers=layers, costs=costs, micro_batch=micro_batch, trace_seconds=0.0)


def _affine(at_2, at_3, micro_batch: int):
    """value(b) of a field whose values at b = 2 and 3 are given; equal structure required."""
    if type(at_2) is not type(at_3):
        raise _NotAffine(f"{type(at_2).__name__} vs {type(at_3).__name__}")
    if isinstance(at_2, bool) or at_2 is None or isinstance(at_2, str):
        if at_2 != at_3:
            raise _NotAffine(f"{at_2!r} vs {at_3!r}")
        return at_2
    if isinstance(at_2, (int, float)):
        return at_2 + (at_3 - at_2) * (micro_batch - 2)
    if isinstance(at_2, (tuple, list)):
        if len(at_2) != len(at_3):
            raise _NotAffine("lengths differ")
        return type(at_2)(_affine(a, b, micro_batch) for a, b in zip(at_2, at_3))
    if isinstance(at_2, dict):
        if at_2.keys() != at_3.keys():
            raise _NotAffine("keys differ")
        return {k: _affine(v, at_3[k], micro_batch) for k, v in at_2.items()}
    if isinstance(at_2, nx.DiGraph):   # the op graph: structure only, which must not move
        if not nx.utils.graphs_equal(at_2, at_3):
            raise _NotAffine("op graphs differ")
        return at_2
    if dataclasses.is_dataclass(at_2):   # signatures are renamed by the caller
        return dataclasses.replace(at_2, **{f.name: _affine(getattr(at_2, f.name), getattr(at_3, f.name), micro_batch)
                                            for f in dataclasses.fields(at_2) if f.init and f.name != "signature"})
    raise _NotAffine(f"cannot scale a {type(at_2).__name__}")

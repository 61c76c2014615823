"""The traces simulate() prices: a zoo decoder traced two blocks deep and expanded to its
depth, cached per (model, micro-batch, seq, precision, cast)."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from cost_models.errors import MeshplanError
from planner.ir import Layer, TracedModel
from planner.simulate.batch_scaling import BASE_MICRO_BATCHES, scaled_trace
from planner.zoo import ModelSpec

SHALLOW_BLOCKS = 2   # blocks traced for a zoo decoder (see trace_spec)


@lru_cache(maxsize=256)
def trace_cached(model_key: str, micro_batch: int, seq: int, precision: str, cast: str):
    """A zoo decoder beyond the base micro-batch sizes is scaled from its traces at them
    (planner.simulate.batch_scaling: exact, and milliseconds instead of a trace)."""
    spec = _SPECS[model_key]
    if spec.config is not None and micro_batch > max(BASE_MICRO_BATCHES):
        at_2, at_3 = (trace_cached(model_key, b, seq, precision, cast) for b in BASE_MICRO_BATCHES)
        scaled = scaled_trace(at_2, at_3, micro_batch)
        if scaled is not None:
            return scaled
    return trace_spec(spec, micro_batch, seq, precision, cast)


def trace_spec(spec: ModelSpec, micro_batch: int, seq: int, precision: str, cast: str = "autocast") -> TracedModel:
    """Trace a model; a zoo decoder is traced two blocks deep and expanded to its depth.

    Its blocks are identical (one signature), so the trace of a 2-block copy holds every
    distinct layer; expanding it gives what the full trace gives (a test checks they are
    equal) in a fraction of the time (0.3 s instead of 1.4 s for GPT-3 175B), which is
    what lets the planner trace once per micro-batch size.
    """
    from planner.trace import trace_model
    if spec.config is None or spec.config.layers <= SHALLOW_BLOCKS:
        return trace_model(spec, micro_batch, seq, precision, cast=cast)
    shallow = ModelSpec(spec.name, replace(spec.config, layers=SHALLOW_BLOCKS))
    return expand_blocks(trace_model(shallow, micro_batch, seq, precision, cast=cast), spec.config.layers)


def expand_blocks(traced: TracedModel, blocks: int) -> TracedModel:
    """Repeat the (identical) blocks of a shallow trace until there are `blocks` of them."""
    first = traced.blocks[0]
    template = traced.layers[first]
    if len({traced.layers[i].signature for i in traced.blocks}) != 1:
        raise MeshplanError("expand_blocks needs a trace whose blocks are identical")
    before = traced.layers[:first]
    after = traced.layers[traced.blocks[-1] + 1:]
    prefix = template.name + "."
    new_blocks = [Layer(f"blocks.{i}", "block", template.signature, 0,
                        tuple(f"blocks.{i}" + m[len(template.name):] if m == template.name or m.startswith(prefix)
                              else m for m in template.modules))
                  for i in range(blocks)]
    layers = [replace(layer, index=i) for i, layer in enumerate([*before, *new_blocks, *after])]
    extra = blocks - len(traced.blocks)
    block_cost = traced.costs[template.signature]
    return replace(traced, layers=layers, param_count=traced.param_count + extra * block_cost.param_count,
                   param_bytes=traced.param_bytes + extra * block_cost.param_bytes)


_SPECS: dict = {}


def model_key(spec: ModelSpec) -> str:
    key = spec.name + (repr(spec.config.to_dict()) if spec.config else f"@{id(spec.factory)}")
    _SPECS[key] = spec
    return key

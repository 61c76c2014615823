"""The traces simulate() prices: a zoo decoder traced two blocks deep and expanded to its
depth, cached per (model, micro-batch, seq, precision, cast).

An MoE block's routed experts are traced as one batched product per projection
(`batched_experts`): on fake tensors every expert gets the same rows, so the E products of
planner.arch.moe.Experts' loop are one bmm over the stacked weights - the same FLOPs, bytes
and saved activations, in one op instead of E (a 128-expert block traces in a fraction of
the time). planner.simulate.experts splits it back into the per-expert GEMMs the runtime runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from functools import lru_cache

import torch

from cost_models.errors import MeshplanError
from planner.ir import Layer, TracedModel
from planner.simulate.batch_scaling import BASE_MICRO_BATCHES, scaled_trace
from planner.zoo import ModelSpec

SHALLOW_BLOCKS = 2   # blocks traced for a zoo decoder (see trace_spec)


@lru_cache(maxsize=256)
def trace_cached(model_key: str, micro_batch: int, seq: int, precision: str, cast: str):
    """A zoo decoder beyond the base micro-batch sizes is scaled from its traces at them
    (planner.simulate.batch_scaling: exact, and milliseconds instead of a trace)."""
    if precision == "fp8":   # traced as bf16 (planner.trace.trace_model), cached once
        return trace_cached(model_key, micro_batch, seq, "bf16", cast)
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
    what lets the planner trace once per micro-batch size. An MoE decoder with leading
    dense blocks is traced with one dense block before the two.
    """
    with batched_experts():
        return _trace_spec(spec, micro_batch, seq, precision, cast)


@contextlib.contextmanager
def batched_experts():
    """While tracing, run planner.arch.moe.Experts as one bmm per projection when every expert
    has the same rows (the balanced split of fake tensors), then copy the outputs into one
    buffer as the loop's torch.cat does; otherwise (uneven rows) the loop itself."""
    from planner.arch.moe import Experts
    loop = Experts.forward

    def forward(self, tokens, counts):
        if not counts or len(set(counts)) != 1 or not counts[0]:
            return loop(self, tokens, counts)
        x = tokens.reshape(len(counts), counts[0], tokens.shape[-1])
        out = torch.bmm(self.act(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up), self.w_down)
        return torch.cat([out.reshape(-1, out.shape[-1])])

    Experts.forward = forward
    try:
        yield
    finally:
        Experts.forward = loop


def _trace_spec(spec: ModelSpec, micro_batch: int, seq: int, precision: str, cast: str) -> TracedModel:
    from planner.trace import trace_model
    cfg = spec.config
    leading = min(getattr(cfg, "dense_layers", 0), 1) if cfg is not None else 0
    if cfg is None or cfg.layers <= SHALLOW_BLOCKS + leading:
        return trace_model(spec, micro_batch, seq, precision, cast=cast)
    shallow_cfg = replace(cfg, layers=SHALLOW_BLOCKS + leading, dense_layers=leading) if leading else \
        replace(cfg, layers=SHALLOW_BLOCKS)
    shallow = ModelSpec(spec.name, shallow_cfg)
    runs = (cfg.dense_layers, cfg.layers - cfg.dense_layers) if leading else (cfg.layers,)
    return expand_blocks(trace_model(shallow, micro_batch, seq, precision, cast=cast), *runs)


def expand_blocks(traced: TracedModel, *runs: int) -> TracedModel:
    """Repeat the blocks of a shallow trace: its k-th distinct block signature (in order)
    becomes `runs[k]` blocks; one run (`expand_blocks(traced, 96)`) needs identical blocks."""
    blocks = [traced.layers[i] for i in traced.blocks]
    templates = []
    for layer in blocks:
        if not templates or templates[-1].signature != layer.signature:
            templates.append(layer)
    if len(templates) != len(runs):
        raise MeshplanError(f"expand_blocks: the trace has {len(templates)} runs of identical blocks, "
                            f"{len(runs)} lengths were given")
    first = traced.blocks[0]
    before = traced.layers[:first]
    after = traced.layers[traced.blocks[-1] + 1:]
    new_blocks = []
    for template, count in zip(templates, runs):
        prefix = template.name + "."
        for _ in range(count):
            i = len(new_blocks)
            new_blocks.append(Layer(f"blocks.{i}", "block", template.signature, 0, tuple(
                f"blocks.{i}" + m[len(template.name):] if m == template.name or m.startswith(prefix) else m
                for m in template.modules)))
    layers = [replace(layer, index=i) for i, layer in enumerate([*before, *new_blocks, *after])]
    extra = {t.signature: count - sum(b.signature == t.signature for b in blocks) for t, count in zip(templates, runs)}
    added_count = sum(n * traced.costs[sig].param_count for sig, n in extra.items())
    added_bytes = sum(n * traced.costs[sig].param_bytes for sig, n in extra.items())
    return replace(traced, layers=layers, param_count=traced.param_count + added_count,
                   param_bytes=traced.param_bytes + added_bytes)


_SPECS: dict = {}


_CONFIG_TEXT: dict = {}   # id(config) -> (config, its repr): a search asks thousands of times


def model_key(spec: ModelSpec) -> str:
    if spec.config is None:
        key = spec.name + f"@{id(spec.factory)}"
    else:
        known = _CONFIG_TEXT.get(id(spec.config))
        if known is None or known[0] is not spec.config or known[2] != spec.config:
            if len(_CONFIG_TEXT) > 1024:
                _CONFIG_TEXT.clear()
            known = _CONFIG_TEXT[id(spec.config)] = (spec.config, repr(spec.config.to_dict()), replace(spec.config))
        key = spec.name + known[1]
    _SPECS[key] = spec
    return key

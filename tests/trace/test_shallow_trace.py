"""A zoo decoder traced two blocks deep and expanded equals its full trace."""
import pytest

from planner.simulate import trace_spec
from planner.simulate.traces import batched_experts
from planner.trace import trace_model
from planner.zoo import PRESETS, load_model


def _comparable(traced):
    """Everything but the signature strings (digests that name graph nodes) and timing."""
    layers = [(l.name, l.kind, l.index, l.modules) for l in traced.layers]
    costs = []
    for layer in traced.layers:
        data = traced.cost_of(layer).to_dict()
        data.pop("signature")
        costs.append(data)
    return layers, costs, traced.param_count, traced.param_bytes, traced.fwd_flops, traced.bwd_flops


# moe-tiny with Qwen's options: q/k head norms (Qwen3-MoE) and a gated shared expert (Qwen2-MoE)
QWEN_MOE_TINY = {**PRESETS["moe-tiny"].to_dict(), "qk_norm": True, "shared_expert_gate": True, "name": "qwen-moe-tiny"}


@pytest.mark.parametrize("name,micro_batch,precision", [("gpt-tiny", 2, "bf16"), ("llama-tiny", 3, "fp32"),
                                                                ("moe-tiny", 2, "bf16"),
                                                                pytest.param(QWEN_MOE_TINY, 1, "bf16", id="qwen-moe-tiny")])
def test_expanded_shallow_trace_equals_full_trace(name, micro_batch, precision):
    spec = load_model(name)
    assert spec.config.layers > 2
    with batched_experts():   # what trace_spec traces an MoE block's experts as (test_expert_parallel.py)
        full = trace_model(spec, micro_batch, 64, precision)
    fast = trace_spec(spec, micro_batch, 64, precision)
    assert _comparable(fast) == _comparable(full)
    assert len(fast.blocks) == spec.config.layers
    distinct = 1 + (spec.config.dense_layers > 0)   # an MoE decoder's dense blocks differ
    assert len({fast.layers[i].signature for i in fast.blocks}) == distinct

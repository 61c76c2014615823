"""A trace scaled to a micro-batch size equals the real trace at that size, field for field."""
from __future__ import annotations

import pytest

from planner.simulate.batch_scaling import scaled_trace
from planner.models import ModelConfig
from planner.simulate import trace_spec
from planner.zoo import PRESETS, ModelSpec, load_model

SEQ = 64


def _comparable(traced) -> dict:
    """The trace as data, less what names it (signatures) and how long tracing took."""
    data = traced.to_dict()
    data.pop("trace_seconds")
    data["layers"] = [{k: v for k, v in layer.items() if k != "signature"} for layer in data["layers"]]
    data["costs"] = sorted(({k: v for k, v in cost.items() if k != "signature"} for cost in data["costs"].values()),
                           key=repr)
    return data


def _spec(name: str) -> ModelSpec:
    if name == "gpt-unfused-dropout":
        return ModelSpec(name, ModelConfig.from_dict({**PRESETS["gpt-tiny"].to_dict(), "attention": "unfused",
                                                      "dropout": 0.1}))
    return load_model(name)


@pytest.mark.parametrize("cast", ["autocast", "params"])
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "gpt-unfused-dropout"])
def test_scaled_trace_is_the_real_trace(name, cast):
    spec = _spec(name)
    at_2, at_3 = (trace_spec(spec, b, SEQ, "bf16", cast) for b in (2, 3))
    for micro_batch in (4, 7):
        scaled = scaled_trace(at_2, at_3, micro_batch)
        real = trace_spec(spec, micro_batch, SEQ, "bf16", cast)
        assert scaled.micro_batch == micro_batch
        assert _comparable(scaled) == _comparable(real)
        # identical blocks still share one signature, so the planner's per-signature caches hold
        assert len({scaled.layers[i].signature for i in scaled.blocks}) == 1


def test_traces_that_do_not_line_up_are_not_scaled():
    gpt, llama = (trace_spec(load_model(name), 2, SEQ, "bf16") for name in ("gpt-tiny", "llama-tiny"))
    llama_3 = trace_spec(load_model("llama-tiny"), 3, SEQ, "bf16")
    assert scaled_trace(gpt, llama_3, 5) is None          # other ops
    assert scaled_trace(llama, llama, 5) is None          # not the base sizes
    assert scaled_trace(llama, llama_3, 5) is not None

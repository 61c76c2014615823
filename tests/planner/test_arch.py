"""The architecture registry: a family's facts are declared once (planner/arch/) and the tracer,
the cost model and the runtime all read that one declaration; a new family is one
registration, which this file shows by adding one and running it through all three."""
from __future__ import annotations

import json

import pytest
import torch.nn as nn
import torch.nn.functional as F

from cost_models.errors import MeshplanError
from planner.arch import Architecture, arch_names, get_arch, register
from planner.arch import base
from planner.arch.layers import attention_core, dropped
from planner.simulate.costing import COLWISE, ROWWISE, VOCAB, top_level_layout
from planner.models import Decoder, ModelConfig
from planner.plan import Plan
from planner.simulate import simulate
from planner.zoo import PRESETS


class SwigluLayerNormBlock(nn.Module):
    """A family the zoo does not have: GPT's fused QKV and LayerNorm with Llama's SwiGLU MLP."""

    def __init__(self, cfg, device=None):
        super().__init__()
        h, kw = cfg.hidden, dict(device=device)
        self.head_dim, self.attention, self.dropout = cfg.head_dim, cfg.attention, cfg.dropout
        self.recompute_attention = False
        self.ln1, self.ln2 = nn.LayerNorm(h, **kw), nn.LayerNorm(h, **kw)
        self.qkv, self.proj = nn.Linear(h, 3 * h, **kw), nn.Linear(h, h, **kw)
        self.gate, self.up = nn.Linear(h, cfg.ffn, **kw), nn.Linear(h, cfg.ffn, **kw)
        self.down = nn.Linear(cfg.ffn, h, **kw)

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, -1, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        x = x + dropped(self.proj(attention_core(self, q, k, v).transpose(1, 2).reshape(B, T, -1)),
                        self.dropout, self.training)
        y = self.ln2(x)
        return x + dropped(self.down(F.silu(self.gate(y)) * self.up(y)), self.dropout, self.training)


NEW_FAMILY = Architecture(
    name="swiglu-ln", block=SwigluLayerNormBlock, final_norm=nn.LayerNorm,
    block_roles={"ln1": "norm", "qkv": "in", "proj": "out", "ln2": "norm", "gate": "in", "up": "in", "down": "out"},
    regions=(("attention", ("qkv",), "proj"), ("mlp", ("gate", "up"), "down")),
    region_norms={"attention": "ln1", "mlp": "ln2"},
    default_ffn=lambda hidden: 3 * hidden, learned_positions=True, ties_embeddings=False,
    grouped_query=False, even_head_dim=False)
NEW_MODEL = dict(arch="swiglu-ln", layers=2, hidden=64, heads=4, vocab=256, max_seq=64, name="swiglu-tiny")


def _register_new_family():
    """What a family's module does on import (a gloo worker is a fresh process)."""
    if NEW_FAMILY.name not in arch_names():
        register(NEW_FAMILY)


@pytest.fixture
def new_family(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, NEW_FAMILY.name, NEW_FAMILY)   # gone again after the test
    return NEW_FAMILY


@pytest.mark.parametrize("tp", [2, 3])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cost_model_and_runtime_read_one_layout(arch, tp):
    from runtime.parallelize import megatron_layout
    cfg = next(c for c in PRESETS.values() if c.arch == arch)
    for sp in (False, True):
        plan = Plan(tp=tp, seq=64, sequence_parallel=sp)
        runtime_layout = megatron_layout(cfg, plan)
        family = get_arch(arch)
        assert runtime_layout == family.default_layout(tp, cfg.vocab, sp)
        assert top_level_layout(cfg, plan) == {k: runtime_layout[k] for k in family.top_roles}
        assert runtime_layout["tok"] == ("vocab" if cfg.vocab % tp == 0 else "replicate")
    roles = get_arch(arch).block_roles
    assert {n for n, r in roles.items() if r == "in"} <= COLWISE
    assert {n for n, r in roles.items() if r == "out"} <= ROWWISE
    assert "tok" in VOCAB


def test_families_are_declared_once():
    with pytest.raises(MeshplanError, match="registered twice"):
        register(get_arch("gpt"))
    with pytest.raises(MeshplanError, match="unknown; use one of gpt, llama"):
        ModelConfig("mamba", 2, 64, 4, 128)
    with pytest.raises(MeshplanError, match="gpt models have no grouped-query attention.*use arch llama"):
        ModelConfig("gpt", 2, 64, 4, 128, kv_heads=2)
    with pytest.raises(MeshplanError, match="region mlp names a module outside the block"):
        Architecture(**{**NEW_FAMILY.__dict__, "regions": (("mlp", ("fc9",), "down"),)})


def test_a_new_family_builds_traces_and_plans(new_family):
    cfg = ModelConfig.from_dict(NEW_MODEL)
    assert cfg.ffn == 3 * 64 and not cfg.tie_embeddings   # the family's defaults
    model = Decoder(cfg, device="meta")
    assert isinstance(model.norm, nn.LayerNorm) and model.pos is not None
    assert set(model.blocks["0"]._modules) == set(new_family.block_roles)
    result = simulate(Plan(tp=2, micro_batch=2, global_batch=4, seq=64), NEW_MODEL, "cpu:1x2")
    assert result.step_time_s > 0 and result.fits


def _tp_rank(rank: int, out_dir: str, sp: bool):
    from parity.test_tp_collectives import _count_rank
    _register_new_family()
    _count_rank(rank, out_dir, NEW_MODEL, sp)


@pytest.mark.runtime
@pytest.mark.distributed
@pytest.mark.parametrize("sp", [False, True])
def test_a_new_family_runs_the_collectives_the_simulator_prices(tmp_path, new_family, sp):
    """Its two regions (one fused QKV; gate and up sharing one input) reduce once each way,
    in the runtime on 2 gloo ranks and in the simulator."""
    from runtime_helpers import run_ranks
    from parity.test_tp_collectives import simulated_counts
    run_ranks(2, _tp_rank, str(tmp_path), sp)
    counts = json.loads((tmp_path / "counts.json").read_text())["counts"]
    per_block = 2 * 2 * NEW_MODEL["layers"]
    reduced = counts["reduce_scatter_tensor"] if sp else counts["all_reduce"]
    assert per_block <= reduced <= per_block + 5
    assert simulated_counts(NEW_MODEL, sp) == counts

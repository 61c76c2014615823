"""Memory-bound kernels over an unfused attention's score tensor (softmax, mask, dropout on
batch x heads x seq x seq) stream at Calibration.score_bandwidth_fraction of the copy rate."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cost_models import MeshplanError, get_gpu
from cost_models.calibration import SCORE_FIT_GPU, Calibration, score_fraction_fallback, shipped_calibration
from cost_models.fitting import fit_score_fraction
from cost_models.profiling import score_bytes
from cost_models.compute import ComputeModel
from planner.simulate.costing import LayerCoster, score_key, score_shapes
from planner.trace import trace_model
from planner.zoo import load_model

A100 = get_gpu("a100-sxm-80gb")
B, HEADS = 2, 4


def a100_with(fraction) -> ComputeModel:
    data = {**shipped_calibration(A100.name).to_dict(), "score_bandwidth_fraction": fraction,
            "host_s_per_op": 0.0}
    return ComputeModel(A100, Calibration.from_dict(data))


def traced_gpt(attention: str, hidden: int = 64, seq: int = 64):
    spec = dict(arch="gpt", layers=2, hidden=hidden, heads=HEADS, vocab=128, max_seq=seq, attention=attention,
                dropout=0.1)
    return trace_model(load_model(spec), B, seq, "bf16", cast="params")


def kernels_on_scores(ops) -> set:
    scores = score_shapes(ops)
    return {op.target.split(".")[1] for op in ops
            if op.kind not in ("matmul", "view") and score_key(op.output_shape) in scores}


def test_score_shapes_are_the_attention_scores_even_when_hidden_equals_seq():
    traced = traced_gpt("unfused", hidden=64, seq=64)   # the residual stream is (2, 64, 64) too
    ops = traced.cost_of(traced.blocks[0]).ops
    assert score_shapes(ops) == {(B * HEADS * 64 * 64, 64, 64)}
    assert kernels_on_scores(ops) == {"masked_fill_", "_softmax", "native_dropout"}
    sdpa = traced_gpt("sdpa")
    assert score_shapes(sdpa.cost_of(sdpa.blocks[0]).ops) == frozenset()


class HandWrittenAttention(nn.Module):
    """Attention as users write it: 4-D q @ k^T (a bmm on batch x heads, viewed back to 4-D),
    a scale, the causal mask, softmax and dropout on (batch, heads, seq, seq)."""

    def __init__(self, hidden: int = 64, heads: int = HEADS):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(h // self.heads)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        probs = F.dropout(torch.softmax(scores, dim=-1), 0.1, self.training)
        return x + self.out((probs @ v).transpose(1, 2).reshape(b, t, h))


def test_hand_written_4d_attention_has_its_scores_found():
    model = nn.Sequential(*(HandWrittenAttention() for _ in range(2)))
    traced = trace_model(model, B, 64, "fp32", inputs=lambda batch, seq: (torch.randn(batch, seq, 64),))
    ops = traced.cost_of(traced.blocks[0]).ops
    assert score_shapes(ops) == {(B * HEADS * 64 * 64, 64, 64)}
    assert {"_softmax", "native_dropout"} <= kernels_on_scores(ops)


def test_score_kernels_run_at_the_score_bandwidth_and_nothing_else_does():
    elements = B * HEADS * 512 * 512
    moved = score_bytes("softmax", elements, 2)
    half, whole = a100_with(0.5), a100_with(1.0)
    overhead = whole.kernel_overhead_s
    assert half.op_time_s("reduction", 0, moved, "bf16", on_scores=True) - overhead == pytest.approx(
        2 * (whole.op_time_s("reduction", 0, moved, "bf16", on_scores=True) - overhead))
    assert half.op_time_s("reduction", 0, moved, "bf16") == whole.op_time_s("reduction", 0, moved, "bf16")

    unfused, sdpa = traced_gpt("unfused", seq=512), traced_gpt("sdpa", seq=512)
    for traced, changes in ((unfused, True), (sdpa, False)):
        slow, fast = (LayerCoster(traced, model, hidden=64).timing(traced.blocks[0]) for model in (half, whole))
        assert (slow.fwd_s > fast.fwd_s and slow.bwd_s > fast.bwd_s) is changes
        assert slow.fwd_s >= fast.fwd_s and slow.bwd_s >= fast.bwd_s


def test_gpus_without_their_own_fraction_use_the_fitted_one():
    fitted = shipped_calibration(SCORE_FIT_GPU).score_bandwidth_fraction
    assert fitted is not None and 0 < fitted < 1     # fitted by benchmarks/fit_a100.py
    assert score_fraction_fallback() == fitted
    h100 = ComputeModel(get_gpu("h100-sxm-80gb"))
    assert h100.calibration.score_bandwidth_fraction is None
    assert h100.score_bw_bytes_per_s == pytest.approx(fitted * h100.memory_bw_bytes_per_s)
    forty = ComputeModel(get_gpu("a100-sxm-40gb"))   # the A100 fit transferred keeps its fraction
    assert forty.calibration.score_bandwidth_fraction == fitted


def test_the_fraction_round_trips_and_bad_values_are_refused():
    data = shipped_calibration(SCORE_FIT_GPU).to_dict()
    assert Calibration.from_dict(json.loads(json.dumps(data))).score_bandwidth_fraction == \
        data["score_bandwidth_fraction"]
    for bad in (0, 1.5, -0.2):
        with pytest.raises(MeshplanError, match="score_bandwidth_fraction"):
            Calibration.from_dict({**data, "score_bandwidth_fraction": bad})
    del data["score_bandwidth_fraction"]   # files written before the field: not measured
    assert Calibration.from_dict(data).score_bandwidth_fraction is None


def test_fit_is_bytes_over_seconds_against_the_copy_rate():
    rows = [dict(kernel="softmax", bytes=score_bytes("softmax", 1000, 2), seconds=2e-6),
            dict(kernel="dropout", bytes=score_bytes("dropout", 1000, 2), seconds=3e-6)]
    assert score_bytes("softmax", 1000, 2) == 10_000 and score_bytes("dropout", 1000, 2) == 10_000
    assert fit_score_fraction(rows, 1e10) == pytest.approx(20_000 / 5e-6 / 1e10)
    assert fit_score_fraction(rows, 1e9) == 1.0        # never above a copy's rate
    assert fit_score_fraction([], 1e10) is None
    with pytest.raises(MeshplanError, match="unknown score kernel"):
        score_bytes("gelu", 10, 2)


def test_tp_layout_ilp_prices_the_score_kernels_as_the_simulator_does():
    from cost_models.cluster import parse_cluster
    from cost_models.comm import CommModel
    from planner.search.tp_ilp import solve_tp_layout
    traced = traced_gpt("unfused", seq=512)
    cost = traced.cost_of(traced.blocks[0])
    comm = CommModel(parse_cluster("a100-sxm-80gb:1x8"))
    slow, fast = (solve_tp_layout(cost, model, comm, comm.group({"tp": 2}, "tp"), traced.precision)
                  for model in (a100_with(0.5), a100_with(1.0)))
    assert slow.objective_s > fast.objective_s

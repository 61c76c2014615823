"""Megatron-style execution: unfused attention, dropout, parameters held in the low
precision (`cast="params"`), and how the cost model prices them."""
import math

import pytest
import torch

from cost_models.calibration import Calibration, shipped_calibration
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.hardware import get_gpu
from planner.simulate.costing import FUSED_DROPOUT_ADD, LayerCoster, _as_megatron_kernels, score_shapes
from planner.models import Decoder, ModelConfig
from planner.plan import Plan
from planner.trace import trace_model
from planner.zoo import load_model

B, T = 2, 16


def tiny(arch="gpt", **kw):
    extra = dict(kv_heads=2) if arch == "llama" else {}
    return ModelConfig(arch, layers=2, hidden=32, heads=4, vocab=64, max_seq=T, **extra, **kw)


def loss_of(cfg, seed=0, train=True):
    torch.manual_seed(seed)
    model = Decoder(cfg).init_weights(seed=1)
    model.train(train)
    idx = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(2))
    return model(idx, idx)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_unfused_attention_computes_what_sdpa_computes(arch):
    fused = loss_of(tiny(arch))
    unfused = loss_of(tiny(arch, attention="unfused"))
    assert unfused.item() == pytest.approx(fused.item(), rel=1e-5)


def test_dropout_acts_in_training_only():
    plain = loss_of(tiny()).item()
    assert loss_of(tiny(dropout=0.1)).item() != pytest.approx(plain, rel=1e-4)
    assert loss_of(tiny(dropout=0.1), train=False).item() == pytest.approx(
        loss_of(tiny(), train=False).item(), rel=1e-6)


@pytest.mark.parametrize("bad", [dict(attention="flash3"), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(dropout=True)])
def test_bad_attention_or_dropout_is_refused(bad):
    with pytest.raises(MeshplanError, match="attention|dropout"):
        tiny(**bad)


def block_ops(traced):
    return traced.cost_of(traced.blocks[0]).ops


def test_unfused_trace_has_megatrons_kernels_and_saves_the_scores():
    spec = dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=32)
    sdpa = trace_model(load_model(spec), B, 32, "bf16")
    unfused = trace_model(load_model({**spec, "attention": "unfused", "dropout": 0.1}), B, 32, "bf16")
    names = [op.target.split(".")[1] for op in block_ops(unfused) if op.kind != "view"]
    for kernel in ("baddbmm", "masked_fill_", "_softmax", "native_dropout", "bmm"):
        assert kernel in names
    scores = next(op for op in block_ops(unfused) if "baddbmm" in op.target)
    assert scores.gemm == (B * 4, 32, 16, 32) and scores.kind == "matmul"
    # torch.empty for baddbmm's output launches nothing and moves nothing
    empties = [op for op in block_ops(unfused) if "new_empty" in op.target]
    assert empties and all(op.kind == "view" and op.bytes_read + op.bytes_written == 0 for op in empties)
    # probabilities (bf16), the dropout mask (bool) and dropped probabilities are saved: >= 5 bytes per score
    extra = unfused.cost_of(unfused.blocks[0]).saved_bytes - sdpa.cost_of(sdpa.blocks[0]).saved_bytes
    assert extra >= 5 * B * 4 * 32 * 32


def test_params_cast_traces_low_precision_parameters_without_casts():
    spec = load_model(dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=32))
    autocast = trace_model(spec, B, 32, "bf16")
    params = trace_model(spec, B, 32, "bf16", cast="params")
    assert params.cast == "params" and autocast.cast == "autocast"
    assert autocast.cost_of(autocast.blocks[0]).saved_param_copy_bytes > 0
    assert params.cost_of(params.blocks[0]).saved_param_copy_bytes == 0
    casts = [op for op in block_ops(params) if "_to_copy" in op.target]
    assert not casts
    assert {op.dtype for op in block_ops(params) if op.kind in ("linear", "norm")} == {"bfloat16"}
    with pytest.raises(MeshplanError, match="cast"):
        trace_model(spec, B, 32, "bf16", cast="amp")


def test_plan_cast_follows_the_runtime():
    common = dict(micro_batch=1, global_batch=4, seq=32)
    assert Plan(dp=4, zero=2, precision="bf16", **common).cast == "params"
    assert Plan(dp=4, zero=3, precision="fp16", **common).cast == "params"
    assert Plan(dp=4, zero=1, precision="bf16", **common).cast == "params"
    assert Plan(dp=4, zero=0, precision="bf16", **common).cast == "autocast"
    assert Plan(dp=4, zero=3, precision="fp32", **common).cast == "autocast"


def coster(traced):
    return LayerCoster(traced, ComputeModel(get_gpu("a100-sxm-80gb")), hidden=64)


def test_tensor_parallelism_splits_the_attention_products_by_heads():
    traced = trace_model(load_model(dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=512,
                                         attention="unfused")), 8, 512, "bf16", cast="params")
    c = coster(traced)
    op = next(op for op in block_ops(traced) if "baddbmm" in op.target)
    one = c._op_time(op, 1, False, {}, "bf16")
    two = c._op_time(op, 2, False, {}, "bf16")
    assert two[0] < one[0] and two[1] < one[1]
    compute = c.compute
    assert one[0] == pytest.approx(compute.matmul_time_s(512, 16, 512, "bf16", batch=8 * 4))
    assert two[0] == pytest.approx(compute.matmul_time_s(512, 16, 512, "bf16", batch=8 * 2))
    # the probabilities @ V product: its output (batch*heads, seq, head_dim) has as many elements
    # as the residual stream (heads * head_dim = hidden) but is split by heads all the same
    pv = next(op for op in block_ops(traced) if "bmm" in op.target and "baddbmm" not in op.target)
    assert pv.output_shape == (8 * 4, 512, 16)
    assert c._op_time(pv, 2, False, {}, "bf16")[0] == pytest.approx(
        compute.matmul_time_s(512, 512, 16, "bf16", batch=8 * 2))


def test_backward_traffic_follows_the_gradient_kernels():
    spec = load_model(dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=256, dropout=0.1))
    params, autocast = (trace_model(spec, 4, 256, "bf16", cast=cast) for cast in ("params", "autocast"))
    for traced, add_bwd_is_free in ((params, True), (autocast, False)):
        c = coster(traced)
        add = next(op for op in block_ops(traced) if op.target.startswith("aten.add.Tensor"))
        fwd, bwd, _ = c._op_time(add, 1, False, {}, "bf16")
        assert (bwd == 0) == add_bwd_is_free and fwd > 0
    c = coster(params)
    drop = next(op for op in block_ops(params) if "native_dropout" in op.target)
    fwd, bwd, _ = c._op_time(drop, 1, False, {}, "bf16")
    assert bwd == pytest.approx(fwd)   # the saved mask applied to the gradient: the same traffic
    gelu = next(op for op in block_ops(params) if "gelu" in op.target)
    fwd, bwd, _ = c._op_time(gelu, 1, False, {}, "bf16")
    assert bwd > fwd


def test_host_and_device_time_combine_by_the_calibrated_exponent():
    gpu = get_gpu("a100-sxm-80gb")
    base = shipped_calibration("a100-sxm-80gb")
    plain = ComputeModel(gpu, Calibration.from_dict({**base.to_dict(), "host_overlap_exponent": 0.0}))
    smooth = ComputeModel(gpu, Calibration.from_dict({**base.to_dict(), "host_overlap_exponent": 4.0}))
    assert plain.host_bound_s(3.0, 2.0) == 3.0
    assert smooth.host_bound_s(3.0, 2.0) == pytest.approx((3.0 ** 4 + 2.0 ** 4) ** 0.25)
    assert 3.0 < smooth.host_bound_s(3.0, 2.0) < 5.0
    assert smooth.host_bound_s(2.0, 3.0) == pytest.approx(smooth.host_bound_s(3.0, 2.0))
    assert smooth.host_bound_s(1.0, 0.0) == 1.0 and smooth.host_bound_s(0.0, 1.0) == 1.0
    assert math.isclose(smooth.host_bound_s(1e3, 1.0), 1e3, rel_tol=1e-6)
    assert Calibration.from_dict(smooth.calibration.to_dict()).host_overlap_exponent == 4.0


def test_params_cast_all_reduces_16_bit_gradients_after_backward():
    """Megatron's fp16 DDP reduces .grad in the parameters' dtype (2 bytes), our runtime's
    DDP its fp32 gradients (4 bytes); both after backward here, so the whole all-reduce of a
    DP group of 32 (one rank per node) is exposed."""
    from cost_models.cluster import parse_cluster
    from planner.simulate import Execution, prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=512, heads=8, vocab=1024, max_seq=128))
    cluster = parse_cluster("dgx-a100:32")
    plan = Plan(dp=32, tp=8, micro_batch=1, global_batch=32, seq=128, precision="fp16")
    exposed = {}
    for cast in ("autocast", "params"):
        sim = prepare(plan, spec, cluster, execution=Execution(overlap_dp_comm=False, cast=cast))
        params = sum(sim.timing(layer.index).params_per_gpu for layer in sim.traced.layers)
        exposed[cast] = sim.run().phases["exposed_dp_comm_s"]
        bytes_per_grad = 2 if cast == "params" else 4
        assert exposed[cast] == pytest.approx(sim.comm.all_reduce_s(params * bytes_per_grad, sim.dp_group))
    assert exposed["params"] < 0.6 * exposed["autocast"]


def test_megatron_scatter_gather_sends_a_tp_share_then_gathers_it():
    """With tp 8 and no sequence parallelism the boundary activation is replicated on the
    TP group: Megatron sends 1/8 per rank across nodes and all-gathers it over NVLink;
    meshplan's runtime sends the whole tensor from each rank."""
    from cost_models.cluster import parse_cluster
    from planner.simulate import MEGATRON_2021, prepare
    spec = load_model(dict(arch="gpt", layers=4, hidden=1024, heads=16, vocab=1024, max_seq=512))
    plan = Plan(dp=1, tp=8, pp=2, micro_batch=1, global_batch=4, seq=512, precision="fp16")
    boundary = 512 * 1024 * 2
    ours = prepare(plan, spec, parse_cluster("dgx-a100:2"))
    megatron = prepare(plan, spec, parse_cluster("dgx-a100:2"), execution=MEGATRON_2021)
    assert ours.pp_cross_node and megatron.pp_cross_node
    assert ours.p2p_s(boundary) == pytest.approx(ours.comm.p2p_s(boundary, True))
    assert megatron.p2p_s(boundary) == pytest.approx(
        megatron.comm.p2p_s(boundary / 8, True) + megatron.comm.all_gather_s(boundary, megatron.tp_group))
    assert megatron.p2p_s(boundary) < ours.p2p_s(boundary)
    sends = [e for e in megatron.run().timeline.events if e.kind == "send"]
    assert sends and not [e for e in ours.run().timeline.events if e.kind == "send"]


def test_batch_host_ops_are_exposed_once_per_micro_batch():
    """Megatron synchronises around get_batch, so its launches add their host time to every
    micro-batch: on one stage the step grows by micro-batches x ops x host time per op."""
    from planner.simulate import Execution, prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=256, heads=4, vocab=1024, max_seq=128))
    plan = Plan(dp=1, micro_batch=1, global_batch=6, seq=128, precision="fp16")
    base = prepare(plan, spec, "a100-sxm-80gb:1x1", execution=Execution(cast="params"))
    loaded = prepare(plan, spec, "a100-sxm-80gb:1x1", execution=Execution(cast="params", batch_host_ops=12))
    grown = loaded.run().step_time_s - base.run().step_time_s
    assert grown == pytest.approx(6 * 12 * base.compute.host_s_per_op, rel=1e-9)


def _head_with_loss_ops(vocab: int, seq: int, loss_ops):
    from planner.simulate import Execution, prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=1024, heads=8, vocab=vocab, max_seq=seq))
    plan = Plan(dp=1, micro_batch=1, global_batch=1, seq=seq, precision="fp16")
    sim = prepare(plan, spec, "a100-sxm-80gb:1x1", execution=Execution(cast="params", loss_host_ops=loss_ops))
    head = next(layer.index for layer in sim.traced.layers if layer.kind == "head")
    return sim.timing(head), sim.compute.host_s_per_op


def test_loss_host_ops_hide_behind_a_device_bound_head():
    """The framework's extra loss launches join the head's host time: a small head is
    host-bound and pays nearly all of it, a head with a large logits GEMM hides it."""
    for vocab, seq, paid_share in ((256, 16, (0.8, 1.0)), (262144, 1024, (0.0, 0.05))):
        plain, host_s = _head_with_loss_ops(vocab, seq, (0, 0))
        extra, _ = _head_with_loss_ops(vocab, seq, (27, 10))
        share_fwd = (extra.fwd_s - plain.fwd_s) / (27 * host_s)
        assert paid_share[0] <= share_fwd <= paid_share[1], (vocab, share_fwd)
        assert extra.bwd_s >= plain.bwd_s


def _coster_with_host(traced, host_s_per_op: float) -> LayerCoster:
    """A coster on the A100 whose host time per launch is `host_s_per_op`, combined with the
    device time by a plain max (exponent 0)."""
    gpu = get_gpu("a100-sxm-80gb")
    calibration = Calibration.from_dict({**shipped_calibration(gpu.name).to_dict(),
                                         "host_s_per_op": host_s_per_op, "host_overlap_exponent": 0.0})
    return LayerCoster(traced, ComputeModel(gpu, calibration), hidden=64)


def _kernel_names(ops) -> list:
    return [op.target for op in ops if op.kind != "view"]


def test_megatron_kernels_rewrite_only_what_megatron_fuses():
    """Under megatron_kernels a block launches what Megatron-LM's GPT launches: no causal-mask
    building or fill (its softmax kernel masks), no copies of q, k, v before the batched
    products (strided views), each residual dropout + add as one kernel; every other op
    stays, and the attention-probability dropout (followed by a copy, not an add) too."""
    spec = dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=512, attention="unfused",
                dropout=0.1)
    traced = trace_model(load_model(spec), 8, 512, "bf16", cast="params")
    eager_ops = block_ops(traced)
    megatron_ops = _as_megatron_kernels(eager_ops)
    megatron = _kernel_names(megatron_ops)
    gone = [op.target for op in eager_ops if op.kind != "view" and all(op is not m for m in megatron_ops)]
    assert sorted(gone) == sorted(["aten.ones.default", "aten.triu.default", "aten.masked_fill_.Scalar",
                                   "aten.clone.default", "aten.clone.default", "aten.clone.default",   # q, k, v
                                   "aten.native_dropout.default", "aten.native_dropout.default",       # fused
                                   "aten.add.Tensor", "aten.add.Tensor"])
    assert megatron.count(FUSED_DROPOUT_ADD) == 2
    assert megatron.count("aten.clone.default") == 1          # the context's copy after the bmm
    assert megatron.count("aten.native_dropout.default") == 1  # on the attention probabilities
    # the fused kernel moves what it reads and writes: branch + residual in, sum + mask out
    fused = next(op for op in megatron_ops if op.target == FUSED_DROPOUT_ADD)
    residual = 8 * 512 * 64 * 2   # batch x seq x hidden bf16 elements, in bytes
    assert (fused.bytes_read, fused.bytes_written) == (2 * residual, residual + residual // 2)
    # SDPA blocks without dropout have none of these ops: nothing changes
    sdpa = trace_model(load_model({**spec, "attention": "sdpa", "dropout": 0.0}), 8, 512, "bf16", cast="params")
    assert _as_megatron_kernels(block_ops(sdpa)) == block_ops(sdpa)


def test_megatron_kernels_save_their_bytes_and_launches():
    """Priced: the fused dropout + add costs its own bytes forward and the dropout's gradient
    kernel backward (the add passes the gradient through); each op not launched saves one
    launch of host time forward and the model's two backward launches per forward launch."""
    spec = dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=512, attention="unfused",
                dropout=0.1)
    traced = trace_model(load_model(spec), 8, 512, "bf16", cast="params")
    block = traced.blocks[0]
    device_only = _coster_with_host(traced, 0.0)
    eager, megatron = device_only.timing(block), device_only.timing(block, megatron_kernels=True)
    assert megatron.fwd_s < eager.fwd_s and megatron.bwd_s <= eager.bwd_s
    assert megatron.saved_bytes == eager.saved_bytes and megatron.params_per_gpu == eager.params_per_gpu
    dropout = next(op for op in block_ops(traced) if "native_dropout" in op.target and op.output_shape[-1] == 64)
    fused = next(op for op in _as_megatron_kernels(block_ops(traced)) if op.target == FUSED_DROPOUT_ADD)
    _, dropout_bwd, _ = device_only._op_time(dropout, 1, False, {}, "bf16")
    fused_fwd, fused_bwd, _ = device_only._op_time(fused, 1, False, {}, "bf16")
    assert fused_bwd == pytest.approx(dropout_bwd)
    assert fused_fwd == pytest.approx(device_only.compute.op_time_s("elementwise", 0, 3.5 * 8 * 512 * 64 * 2, "bf16"))
    host_bound = _coster_with_host(traced, 1e-3)   # 1 ms a launch: only launches count
    eager, megatron = host_bound.timing(block), host_bound.timing(block, megatron_kernels=True)
    eager_launches = len(_kernel_names(block_ops(traced)))
    megatron_launches = len(_kernel_names(_as_megatron_kernels(block_ops(traced))))
    assert eager_launches - megatron_launches == 8   # mask (2), fill, three copies, two adds
    assert eager.fwd_s - megatron.fwd_s == pytest.approx(8e-3)
    assert eager.bwd_s - megatron.bwd_s == pytest.approx(16e-3)


def test_op_forward_times_add_up_to_the_layers_forward():
    """LayerCoster.op_forward_s prices one op as the layer's timing does: with no host time
    the ops' forward times sum to the block's forward time."""
    traced = trace_model(load_model(dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=512,
                                         attention="unfused", dropout=0.1)), 8, 512, "bf16", cast="params")
    c = _coster_with_host(traced, 0.0)
    block = traced.blocks[0]
    scores = score_shapes(block_ops(traced))
    assert scores   # the unfused attention's (batch x heads, seq, seq) scores
    assert sum(c.op_forward_s(op, scores=scores) for op in block_ops(traced)) == pytest.approx(c.timing(block).fwd_s)


def test_softmax_backward_reads_two_tensors_and_writes_one():
    traced = trace_model(load_model(dict(arch="gpt", layers=2, hidden=64, heads=4, vocab=128, max_seq=512,
                                         attention="unfused")), 8, 512, "bf16", cast="params")
    c = coster(traced)
    softmax = next(op for op in block_ops(traced) if "_softmax" in op.target)
    moved = softmax.bytes_read + softmax.bytes_written
    fwd, bwd, _ = c._op_time(softmax, 1, False, {}, "bf16")
    assert fwd == pytest.approx(c.compute.op_time_s("reduction", softmax.fwd_flops, moved, "bf16"))
    assert bwd == pytest.approx(c.compute.op_time_s("reduction", softmax.bwd_flops, 1.5 * moved, "bf16"))

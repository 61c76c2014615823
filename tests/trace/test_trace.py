"""The tracer (planner.trace): layers, dedup, FLOPs, measured activation memory, routes, errors.

Memory numbers are checked against REAL CPU training steps (tests/fixtures/real_runs.py),
FLOPs against torch's FlopCounterMode and closed forms; nothing is compared with a value
copied from the tracer's own output.
"""
import json

import networkx as nx
import pytest
import torch

from cost_models import MeshplanError
from fixtures.real_runs import retained_with_attention_recompute, retained_with_checkpoint, saved_per_layer
from planner import trace as tracer
from planner.arch.gpt import GPTBlock
from planner.models import Decoder, ModelConfig, count_parameters
from planner.plan import Plan
from planner.simulate import prepare
from planner.torch_compat import traces_attention_core
from planner.trace import flop_counter_reference, kernel_choices, trace_model
from planner.zoo import PRESETS, ModelSpec
from runtime.parallelize import selective_context

from helpers import FIXTURES  # noqa: E402
B, T = 2, 16
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def traced():
    """Traces shared by the tests of this file: (preset, precision, kernels) -> TracedModel."""
    cache = {}

    def get(name, precision="bf16", kernels="cuda"):
        key = (name, precision, kernels)
        if key not in cache:
            cache[key] = trace_model(name, B, T, precision, kernels=kernels)
        return cache[key]

    return get


def real_model(name):
    return Decoder(PRESETS[name]).init_weights(seed=0)


# ----------------------------------------------------------------------------- layers and dedup

def test_layers_in_execution_order_with_one_block_signature(traced):
    tm = traced("gpt-tiny")
    assert [layer.name for layer in tm.layers] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert [layer.kind for layer in tm.layers] == ["embedding"] + ["block"] * 4 + ["head"]
    assert tm.blocks == [1, 2, 3, 4]
    assert [layer.index for layer in tm.layers] == list(range(6))
    assert len({tm.layers[i].signature for i in tm.blocks}) == 1
    assert len(tm.costs) == 3
    assert tm.layers_with(tm.layers[1].signature) == [1, 2, 3, 4]
    assert set(tm.layers[0].modules) == {"tok", "pos"} and set(tm.layers[-1].modules) == {"norm", "head"}


def test_trace_work_does_not_grow_with_depth(monkeypatch):
    """96 blocks cost as much tracing work as 2: layers costed per signature, and the
    real block code runs a fixed number of times."""
    costed, block_runs = [], []
    original_cost = tracer._cost_program
    monkeypatch.setattr(tracer, "_cost_program", lambda *a, **k: costed.append(a[0]) or original_cost(*a, **k))
    forward = GPTBlock.forward
    monkeypatch.setattr(GPTBlock, "forward", lambda self, x: block_runs.append(1) or forward(self, x))
    counts = {}
    for layers in (2, 96):
        costed.clear()
        block_runs.clear()
        cfg = dict(arch="gpt", layers=layers, hidden=32, heads=2, vocab=64, max_seq=32, name=f"deep{layers}")
        tm = trace_model(cfg, 1, 8)
        assert len(tm.layers) == layers + 2 and len(tm.blocks) == layers
        assert len({tm.layers[i].signature for i in tm.blocks}) == 1
        counts[layers] = (len(costed), len(block_runs))
    assert counts[96] == counts[2]
    assert counts[96][0] == 3  # embed, the block, head


def test_blocks_that_differ_get_different_signatures():
    model = Decoder(ModelConfig("gpt", 3, 32, 2, 64, max_seq=32))
    with torch.device("meta"):
        model.blocks["1"].fc1 = torch.nn.Linear(32, 64)   # a wider MLP in one block
        model.blocks["1"].fc2 = torch.nn.Linear(64, 32)
    tm = trace_model(model.to("meta"), 1, 8)
    sigs = [tm.layers[i].signature for i in tm.blocks]
    assert sigs[0] == sigs[2] != sigs[1]
    assert tm.cost_of(tm.blocks[1]).fwd_flops < tm.cost_of(tm.blocks[0]).fwd_flops


class _Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + self.lin(x)


class _Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, x):
        return x + sum(e(x) for e in self.experts)


class _Hybrid(torch.nn.Module):
    """A stack mixing two block classes, as hybrid dense/MoE models do."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Dense(), _Experts(), _Dense(), _Experts(), _Dense()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_hybrid_stack_shares_signatures_per_class():
    with torch.device("meta"):
        model = _Hybrid()
    tm = trace_model(model, 2, 8, inputs=lambda b, s: torch.empty(b, s, 16))
    assert [layer.name for layer in tm.layers] == [f"layers.{i}" for i in range(5)] + ["head"]
    sig = [layer.signature for layer in tm.layers]
    # layers.0 sees data that needs no gradient: its backward differs from the later dense blocks'
    assert sig[2] == sig[4] != sig[0] and sig[1] == sig[3] and len(set(sig)) == 4
    assert tm.cost_of(0).bwd_flops == tm.cost_of(0).fwd_flops == tm.cost_of(2).bwd_flops / 2
    assert tm.cost_of(1).fwd_flops == 2 * tm.cost_of(2).fwd_flops  # two experts


def test_param_counts_add_up(traced):
    for name in ("gpt-tiny", "llama-tiny"):
        tm = traced(name)
        model = Decoder(PRESETS[name], device="meta")
        assert tm.param_count == count_parameters(model)
        per_layer = sum(tm.cost_of(layer).param_count for layer in tm.layers)
        tied = PRESETS[name].vocab * PRESETS[name].hidden if PRESETS[name].tie_embeddings else 0
        assert per_layer == tm.param_count + tied  # a tied weight belongs to both layers using it


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("name,seq", [("gpt-tiny", 16), ("llama-tiny", 16), ("gpt2-124m", 64), ("llama2-7b", 32)])
def test_flops_match_flop_counter_mode(name, seq):
    tm = trace_model(name, B, seq)
    fwd, bwd = tm.flop_counter_flops()
    ref_fwd, ref_bwd = flop_counter_reference(name, B, seq)
    assert fwd == pytest.approx(ref_fwd, rel=0.01)
    assert bwd == pytest.approx(ref_bwd, rel=0.01)


def test_gpt_block_flops_closed_form(traced):
    """Per block: 24*B*T*h^2 of linears (with a 4h MLP) + 4*B*T^2*h of attention; backward
    2x for linears and 2.5x (flash recompute) for attention."""
    c = traced("gpt-tiny").cost_of(1)
    h = PRESETS["gpt-tiny"].hidden
    linear, attention = 24 * B * T * h * h, 4 * B * T * T * h
    assert c.fwd_flops == linear + attention
    assert c.attn_fwd_flops == attention
    assert c.bwd_flops == 2 * linear + 2.5 * attention
    assert c.attn_causal_fwd_flops == 4 * B * (T * (T + 1) // 2) * h
    # selective keeps attention and every other linear (qkv 6, fc1 8 x B*T*h^2) and reruns the
    # output projection (2) and fc2 (8); the rest has no FLOPs
    assert c.recompute_fwd_flops_selective == 10 * B * T * h * h


def test_first_linear_of_an_mlp_has_no_input_gradient():
    """The data does not require grad: backward of the first layer computes only the weight
    gradient (1x forward), the others 2x."""
    tm = trace_model(f"{FIXTURES}/mlp_model.py:mlp", 4, 1)
    first, second = tm.cost_of(0), tm.cost_of(2)
    assert first.fwd_flops == 2 * 4 * 32 * 64 and first.bwd_flops == first.fwd_flops
    assert second.fwd_flops == 2 * 4 * 64 * 64 and second.bwd_flops == 2 * second.fwd_flops


# ----------------------------------------------------------------------------- measured memory vs real runs

@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_saved_bytes_equal_a_real_cpu_step(traced, name, precision, kernels):
    """Every layer's saved activations and saved parameter copies, to the byte, against a
    real step on CPU with the same kernel choices."""
    tm = traced(name, precision, kernels)
    model = real_model(name)
    idx = torch.randint(0, PRESETS[name].vocab, (B, T))
    blocks = {block: f"blocks.{i}" for i, block in enumerate(model.blocks.values())}
    with kernel_choices(kernels):
        real = saved_per_layer(model, blocks, lambda: model(idx, idx), DTYPES[precision])
    for layer in tm.layers:
        cost = tm.cost_of(layer)
        assert (cost.saved_bytes, cost.saved_param_copy_bytes) == real[layer.name], layer.name
    if precision == "bf16":
        assert tm.cost_of(1).saved_param_copy_bytes > 0  # autocast's bf16 weights, counted apart


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_checkpointed_bytes_equal_a_real_cpu_step(traced, name, precision, kernels):
    tm = traced(name, precision, kernels)
    block = real_model(name).blocks["1"]
    h = PRESETS[name].hidden
    context = lambda: kernel_choices(kernels)  # noqa: E731
    full = retained_with_checkpoint(block, torch.randn(B, T, h, requires_grad=True), DTYPES[precision],
                                    context=context)
    # the runtime's own policy: what it saves is what the trace must count
    selective = retained_with_checkpoint(block, torch.randn(B, T, h, requires_grad=True), DTYPES[precision],
                                         context_fn=selective_context, context=context)
    cost = tm.cost_of(tm.blocks[1])
    assert cost.saved_bytes_full_ckpt == full == B * T * h * 4  # the fp32 block input, nothing else
    assert cost.saved_bytes_selective == selective


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_selective_recomputes_an_unfused_attention_core_as_the_runtime_does(precision):
    """Megatron-style attention (baddbmm scores, softmax, bmm with the values): the runtime's
    selective policy keeps the linear layers' outputs and recomputes the s x s scores, as
    the trace counts - it must not save the batched products of the attention core."""
    cfg = ModelConfig.from_dict({**PRESETS["gpt-tiny"].to_dict(), "attention": "unfused"})
    tm = trace_model(ModelSpec("gpt-unfused", cfg), B, T, precision, kernels="cpu")
    block = Decoder(cfg).init_weights(seed=0).blocks["1"]
    selective = retained_with_checkpoint(block, torch.randn(B, T, cfg.hidden, requires_grad=True),
                                         DTYPES[precision], context_fn=selective_context)
    cost = tm.cost_of(tm.blocks[1])
    assert cost.saved_bytes_selective == selective
    scores = B * cfg.heads * T * T * (4 if precision == "fp32" else 2)
    assert cost.saved_bytes - cost.saved_bytes_selective > scores   # the scores are not kept


UNFUSED_DROPOUT = ModelConfig.from_dict({**PRESETS["gpt-tiny"].to_dict(), "attention": "unfused", "dropout": 0.1})


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "gpt-unfused-dropout"])
def test_attention_recompute_bytes_equal_a_real_cpu_step(traced, name, precision, kernels):
    """Attention-core recompute ("attention"): a real block with `recompute_attention` set,
    as the runtime runs it, keeps the trace's saved_bytes_attention (and autocast's weight
    copies, counted apart) - less than without recomputation: the attention kernel's
    logsumexp, or an unfused core's scores, probabilities and dropout mask are rerun."""
    if name == "gpt-unfused-dropout":
        cfg, tm = UNFUSED_DROPOUT, trace_model(ModelSpec(name, UNFUSED_DROPOUT), B, T, precision, kernels=kernels)
    else:
        cfg, tm = PRESETS[name], traced(name, precision, kernels)
    block = Decoder(cfg).init_weights(seed=0).blocks["1"]
    real = retained_with_attention_recompute(block, torch.randn(B, T, cfg.hidden, requires_grad=True),
                                             DTYPES[precision], context=lambda: kernel_choices(kernels))
    cost = tm.cost_of(tm.blocks[1])
    assert (cost.saved_bytes_attention, cost.saved_param_copy_bytes) == real
    assert cost.saved_bytes_full_ckpt < cost.saved_bytes_attention < cost.saved_bytes
    assert not block.recompute_attention


def test_attention_recompute_saves_korthikanti_5as2b():
    """Korthikanti et al. 2022, Sec. 4.1: a GPT layer keeps 34sbh + 5as^2b bytes (16-bit
    values, with dropout) and 34sbh when the attention core is recomputed. 5as^2b is the
    softmax output (2as^2b), the dropout mask (as^2b) and the dropout output (2as^2b). As
    Megatron-LM runs it - unfused attention, 16-bit parameters, fused dropout's bool mask -
    the trace differs from the formula only where our step truly does: the core builds its
    s x s bool causal mask (Megatron passes one in per micro-batch), and each LayerNorm keeps
    a 16-bit mean and rstd per token (the paper leaves both out)."""
    a, h, s, b = 8, 512, 128, 2
    cfg = ModelConfig(arch="gpt", layers=2, hidden=h, heads=a, vocab=512, max_seq=s, attention="unfused",
                      dropout=0.1)
    if not traces_attention_core():   # this torch cannot label the core: the simulator refuses the mode
        with pytest.raises(MeshplanError, match="torch.fx.traceback.annotate"):
            prepare(Plan(seq=s, global_batch=b, micro_batch=b, precision="fp16", checkpoint=["attention"] * 2),
                    ModelSpec("megatron-gpt", cfg), "a100-sxm-80gb:1x1")
        return
    cost = trace_model(ModelSpec("megatron-gpt", cfg), b, s, "fp16", cast="params").cost_of(1)
    norm_statistics = 2 * 2 * 2 * s * b   # two LayerNorms, mean and rstd, 2 bytes each per token
    causal_mask = s * s
    assert cost.saved_bytes_attention == 34 * s * b * h + norm_statistics
    assert cost.saved_bytes == 34 * s * b * h + 5 * a * s * s * b + norm_statistics + causal_mask
    assert cost.saved_bytes - cost.saved_bytes_attention == 5 * a * s * s * b + causal_mask
    assert cost.recompute_fwd_flops_attention == 2 * (2 * b * s * s * h)   # QK^T and the product with V


def test_selective_keeps_the_linear_outputs(traced):
    """gpt-tiny, bf16: the fp32 input plus the bf16 outputs of every other linear - qkv (3h) and
    fc1 (4h); proj and fc2 rerun, torchtitan's policy - and the attention kernel's output (h,
    bf16) and logsumexp (one fp32 per head and token)."""
    cfg = PRESETS["gpt-tiny"]
    h = cfg.hidden
    cost = traced("gpt-tiny").cost_of(1)
    assert cost.saved_bytes_selective == (B * T * h * 4 + B * T * (3 * h + 4 * h) * 2
                                          + B * T * h * 2 + B * cfg.heads * T * 4)
    assert cost.saved_bytes_full_ckpt < cost.saved_bytes_selective < cost.saved_bytes


def test_cuda_rms_norm_saves_less_than_cpu(traced):
    """CUDA's fused RMSNorm does not keep the normalised activations: 4*B*T*h bytes per norm,
    two norms per Llama block, one in the head."""
    h = PRESETS["llama-tiny"].hidden
    cpu, cuda = traced("llama-tiny", "bf16", "cpu"), traced("llama-tiny", "bf16", "cuda")
    assert cpu.cost_of(1).saved_bytes - cuda.cost_of(1).saved_bytes == 2 * B * T * h * 4
    assert cpu.cost_of(5).saved_bytes - cuda.cost_of(5).saved_bytes == B * T * h * 4


def test_emulated_fused_rms_norm_matches_torch():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.rms_norm(x, [16], w, 1e-5)
    grad = torch.randn_like(ref)
    with kernel_choices("cuda"):
        out = torch.nn.functional.rms_norm(x, [16], w, 1e-5)
    assert "fused_rms_norm" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)):
        torch.testing.assert_close(got, want)


def test_boundary_bytes(traced):
    tm = traced("gpt-tiny")
    h = PRESETS["gpt-tiny"].hidden
    block, head = tm.cost_of(1), tm.cost_of(5)
    assert block.input_bytes == block.output_bytes == B * T * h * 4
    assert tm.cost_of(0).input_bytes == B * T * 8 and tm.cost_of(0).output_bytes == B * T * h * 4
    assert head.input_bytes == B * T * h * 4 + B * T * 8 and head.output_bytes == 4  # hidden + targets -> loss


# ----------------------------------------------------------------------------- ops and TP metadata

def test_linear_ops_carry_gemm_and_tp_dims(traced):
    tm = traced("gpt-tiny")
    h, cost = PRESETS["gpt-tiny"].hidden, tm.cost_of(1)
    linears = {op.module_path: op for op in cost.ops_of_kind("linear")}
    assert set(linears) == {"blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2"}
    assert linears["blocks.0.qkv"].gemm == (B * T, h, 3 * h)
    assert linears["blocks.0.fc2"].gemm == (B * T, 4 * h, h)
    for op in linears.values():
        assert op.shardable == {"colwise": 0, "rowwise": 1}
        assert op.dtype == "bfloat16" and op.fwd_flops == 2 * op.gemm[0] * op.gemm[1] * op.gemm[2]
    assert linears["blocks.0.qkv"].params == ("blocks.0.qkv.weight", "blocks.0.qkv.bias")
    assert linears["blocks.0.qkv"].param_count == 3 * h * h + 3 * h
    (attention,) = cost.ops_of_kind("attention")
    assert attention.attention == (B, PRESETS["gpt-tiny"].heads, T, T, h // PRESETS["gpt-tiny"].heads, True)
    embeddings = tm.cost_of(0).ops_of_kind("embedding")
    assert [op.shardable for op in embeddings] == [{"vocab": 0, "hidden": 1}] * 2


def test_op_graph_is_the_block_dataflow(traced):
    cost = traced("gpt-tiny").cost_of(1)
    assert nx.is_directed_acyclic_graph(cost.graph)
    assert set(cost.graph.nodes) == {op.name for op in cost.ops}
    g = cost.compute_graph()
    path = {op.name: op.module_path or op.kind for op in cost.ops}
    edges = {(path[u], path[v]) for u, v in g.edges}
    assert edges == {("blocks.0.ln1", "blocks.0.qkv"), ("blocks.0.qkv", "blocks.0"), ("blocks.0", "blocks.0.proj"),
                     ("blocks.0.proj", "blocks.0.ln2"), ("blocks.0.ln2", "blocks.0.fc1"),
                     ("blocks.0.fc1", "blocks.0.fc2")}


def test_precision_sets_op_dtypes(traced):
    fp32 = {op.dtype for op in traced("gpt-tiny", "fp32").cost_of(1).ops_of_kind("linear")}
    bf16 = {op.dtype for op in traced("gpt-tiny", "bf16").cost_of(1).ops_of_kind("linear")}
    assert fp32 == {"float32"} and bf16 == {"bfloat16"}
    assert traced("gpt-tiny", "fp32").cost_of(1).saved_param_copy_bytes == 0


def test_to_dict_is_json(traced):
    tm = traced("llama-tiny")
    data = json.loads(json.dumps(tm.to_dict()))
    assert data["route"] == tm.route and len(data["layers"]) == len(tm.layers)
    cost = data["costs"][tm.layers[1].signature]
    assert cost["saved_bytes"] == tm.cost_of(1).saved_bytes
    assert len(cost["ops"]) == len(tm.cost_of(1).ops) and len(cost["edges"]) == tm.cost_of(1).graph.number_of_edges()


# ----------------------------------------------------------------------------- other models and routes

def test_json_custom_model(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"arch": "llama", "layers": 3, "hidden": 64, "heads": 4, "kv_heads": 1,
                                "vocab": 300, "max_seq": 64}))
    tm = trace_model(str(path), 2, 32, "fp32")
    assert tm.name == "mine" and len(tm.blocks) == 3 and len(tm.costs) == 3
    (attention,) = tm.cost_of(1).ops_of_kind("attention")
    assert attention.attention[:5] == (2, 4, 32, 32, 16)
    k_proj = [op for op in tm.cost_of(1).ops_of_kind("linear") if op.module_path == "blocks.0.k"]
    assert k_proj[0].gemm == (64, 64, 16)  # one kv head of 16


def test_mlp_factory_is_traced_by_fx_one_layer_per_child():
    tm = trace_model(f"{FIXTURES}/mlp_model.py:mlp", 4, 1)
    assert tm.route == "torch.fx.symbolic_trace"
    assert [layer.name for layer in tm.layers] == [str(i) for i in range(7)]
    assert {layer.kind for layer in tm.layers} == {"other"} and tm.blocks == []
    sig = [layer.signature for layer in tm.layers]
    assert sig[1] == sig[3] == sig[5] and sig[2] == sig[4] and len(set(sig)) == 4
    fwd, bwd = tm.flop_counter_flops()
    assert (fwd, bwd) == flop_counter_reference(f"{FIXTURES}/mlp_model.py:mlp", 4, 1)


def test_cnn_factory_is_one_layer_with_conv_flops():
    tm = trace_model(f"{FIXTURES}/cnn_model.py:cnn", 4, 1, "fp32")
    assert tm.route == "torch.fx.symbolic_trace"
    assert [(layer.name, layer.kind) for layer in tm.layers] == [("model", "other")]
    cost = tm.cost_of(0)
    convs = cost.ops_of_kind("conv")
    assert [op.fwd_flops for op in convs] == [2 * 4 * 16 * 32 * 32 * 3 * 9, 2 * 4 * 32 * 8 * 8 * 16 * 9]  # conv2: stride 2
    assert all(op.shardable == {} for op in convs)
    assert (cost.fwd_flops, cost.bwd_flops) == flop_counter_reference(f"{FIXTURES}/cnn_model.py:cnn", 4, 1)
    assert cost.saved_bytes > 0 and cost.saved_bytes_full_ckpt == 4 * 3 * 32 * 32 * 4 + 4 * 8


def test_params_cast_feeds_16_bit_inputs_and_runs_batch_norm_in_fp32():
    """Parameters held in bf16 (ZeRO 1-3): the float images enter in bf16, as FSDP2 casts them
    (fp32 images into the bf16 stem convolution were "Input type (float) and weight type
    (bfloat16)"), and BatchNorm runs in fp32 between bf16 convolutions, as the runtime wraps it."""
    tm = trace_model(f"{FIXTURES.parent.parent}/examples/resnet.py:factory", 2, 1, "bf16", cast="params")
    ops = [op for layer in tm.layers for op in tm.cost_of(layer).ops]
    assert {op.dtype for op in ops if op.kind == "conv"} == {"bfloat16"}
    assert {op.dtype for op in ops if op.kind == "norm"} == {"float32"}
    assert [op.dtype for op in tm.cost_of(0).ops if op.kind == "conv"] == ["bfloat16"]   # the stem's


def test_shape_branch_falls_back_to_make_fx():
    tm = trace_model(f"{FIXTURES}/branchy_model.py:branchy", 2, 16)
    assert tm.route == "make_fx"
    assert [layer.name for layer in tm.layers] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert len(tm.costs) == 3
    assert tm.flop_counter_flops() == flop_counter_reference(f"{FIXTURES}/branchy_model.py:branchy", 2, 16)


def test_untraceable_model_names_routes_and_construct():
    with pytest.raises(MeshplanError) as err:
        trace_model(f"{FIXTURES}/untraceable_model.py:untraceable", 2, 8)
    message = str(err.value)
    assert "\n" not in message
    assert "torch.fx.symbolic_trace failed" in message and "make_fx failed" in message
    assert "if y.sum() > 0:" in message and "untraceable_model.py:13" in message
    assert "aten._local_scalar_dense" in message


def test_factory_without_example_inputs_is_a_clear_error(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text("import torch.nn as nn\ndef net():\n    return nn.Linear(4, 4)\n")
    with pytest.raises(MeshplanError, match="example_inputs"):
        trace_model(f"{path}:net", 1, 1)


def test_inputs_argument_overrides():
    lin = torch.nn.Linear(8, 3, device="meta")
    tm = trace_model(lin, 5, 1, "fp32", inputs=lambda b, s: torch.empty(b, 8))
    assert tm.name == "Linear" and tm.cost_of(0).fwd_flops == 2 * 5 * 8 * 3


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(precision="fp4"), "precision 'fp4'"), (dict(micro_batch=0), "micro_batch"),
    (dict(seq=4096), "exceeds gpt-tiny's max_seq"), (dict(kernels="tpu"), "kernels 'tpu'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, fragment):
    args = dict(micro_batch=1, seq=8, precision="bf16") | kwargs
    with pytest.raises(MeshplanError) as err:
        trace_model("gpt-tiny", **args)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_gpt3_175b_traces_on_meta_with_known_activation_memory():
    """No parameter is materialised. Without recomputation a block keeps 36*s*b*h bytes:
    the fp32 inputs of its two LayerNorms (4+4), the bf16 inputs of qkv, proj, fc1, fc2
    (2+2+2+8), q/k/v for flash attention (6) and the GELU input (8), plus per-token
    statistics; with full checkpointing only its fp32 input (4)."""
    tm = trace_model("gpt3-175b", 1, 2048)
    assert tm.param_count == pytest.approx(174.6e9, rel=0.005)
    assert len(tm.layers) == 98 and len(tm.costs) == 3
    sbh = 2048 * 12288
    block = tm.cost_of(tm.blocks[0])
    lse = 96 * 2048 * 4  # flash attention's fp32 logsumexp (heads x s x b)
    ln_stats = 2 * 2 * 2048 * 4  # fp32 mean and rstd of the two LayerNorms
    assert block.saved_bytes == 36 * sbh + lse + ln_stats
    assert block.saved_bytes_full_ckpt == 4 * sbh
    assert block.saved_param_copy_bytes == 2 * 12 * 12288 ** 2  # bf16 weights of qkv, proj, fc1, fc2

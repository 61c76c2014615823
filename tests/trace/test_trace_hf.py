"""Hugging Face decoders traced from a config alone (no weights, no network)."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from cost_models import MeshplanError  # noqa: E402
from fixtures.real_runs import saved_per_layer  # noqa: E402
from planner.hf import hf_model_from_config  # noqa: E402
from planner.trace import flop_counter_reference, kernel_choices, trace_hf, trace_model  # noqa: E402

B, T = 2, 16
_DECODER = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "llama": dict(_DECODER, model_type="llama", num_key_value_heads=2, intermediate_size=128),
    "mistral": dict(_DECODER, model_type="mistral", num_key_value_heads=2, intermediate_size=128,
                    sliding_window=64),
    "qwen2": dict(_DECODER, model_type="qwen2", num_key_value_heads=2, intermediate_size=128),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, n_positions=128, vocab_size=256,
                 bos_token_id=0, eos_token_id=1),
}
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module")
def traced():
    cache = {}

    def get(arch, precision="bf16", kernels="cuda"):
        if (arch, precision, kernels) not in cache:
            cache[arch, precision, kernels] = trace_model(CONFIGS[arch], B, T, precision, kernels=kernels)
        return cache[arch, precision, kernels]

    return get


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hf_decoder_traces_into_repeated_blocks(traced, arch):
    tm = traced(arch)
    assert tm.route == "make_fx"  # HF's mask/cache code defeats torch.fx.symbolic_trace
    names = [layer.name for layer in tm.layers]
    assert names == ["embed"] + [f"{BLOCKS[arch]}.{i}" for i in range(3)] + ["head"]
    assert len({tm.layers[i].signature for i in tm.blocks}) == 1 and len(tm.costs) == 3
    model = hf_model_from_config(CONFIGS[arch])
    assert tm.param_count == sum(p.numel() for p in model.parameters())
    (attention,) = tm.cost_of(tm.blocks[0]).ops_of_kind("attention")
    assert attention.attention == (B, 4, T, T, 16, True)  # causal SDPA, no materialised mask


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hf_flops_match_flop_counter_mode(traced, arch):
    fwd, bwd = traced(arch).flop_counter_flops()
    ref_fwd, ref_bwd = flop_counter_reference(CONFIGS[arch], B, T)
    assert fwd == pytest.approx(ref_fwd, rel=0.01) and bwd == pytest.approx(ref_bwd, rel=0.01)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_saved_bytes_equal_a_real_cpu_step(arch, precision):
    """Against a real CPU step of the same model with real weights. GPT-2's dropout is
    switched off: on CPU no fused attention kernel takes dropout (see the next test)."""
    config = dict(CONFIGS[arch], num_hidden_layers=2, n_layer=2)
    if arch == "gpt2":
        config.update(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    else:
        config.pop("n_layer")
    tm = trace_model(config, B, T, precision, kernels="cpu")
    model = hf_model_from_config(config, device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    blocks = {model.get_submodule(f"{BLOCKS[arch]}.{i}"): f"{BLOCKS[arch]}.{i}" for i in range(2)}
    ids = torch.randint(0, 256, (B, T))
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with kernel_choices("cpu"):   # as the trace dispatches: on 2.7/2.8 GQA fused, as torch 2.13 does itself
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    real = saved_per_layer(model, blocks, step, dtype)
    for layer in tm.layers:
        cost = tm.cost_of(layer)
        assert (cost.saved_bytes, cost.saved_param_copy_bytes) == real[layer.name], layer.name


def test_gpt2_dropout_runs_the_gpu_kernels(traced):
    """With dropout, CUDA runs flash attention (no T x T probabilities saved) and the fused
    dropout (bool masks); plain CPU dispatch would run math attention and keep fp32 masks."""
    cuda, cpu = traced("gpt2", "bf16", "cuda"), traced("gpt2", "bf16", "cpu")
    cuda_block, cpu_block = cuda.cost_of(cuda.blocks[0]), cpu.cost_of(cpu.blocks[0])
    assert len(cuda_block.ops_of_kind("attention")) == 1 and not cpu_block.ops_of_kind("attention")
    assert {op.target for op in cuda_block.ops if "dropout" in op.target} == {"aten.native_dropout.default"}
    probabilities = B * 4 * T * T * 4  # fp32 (B, heads, T, T) kept by the math path
    assert cpu_block.saved_bytes - cuda_block.saved_bytes >= probabilities
    assert cuda_block.bwd_flops - cpu_block.bwd_flops == 0.5 * cuda_block.attn_fwd_flops  # flash recompute


def test_hf_conv1d_weights_are_transposed_for_tp(traced):
    """GPT-2's Conv1D stores (in, out) weights: column parallel splits dim 1."""
    block = traced("gpt2").cost_of(1)
    by_module = {op.module_path: op for op in block.ops_of_kind("linear")}
    assert by_module["transformer.h.0.attn.c_attn"].shardable == {"colwise": 1, "rowwise": 0}
    assert by_module["transformer.h.0.attn.c_attn"].gemm == (B * T, 64, 192)
    llama = {op.module_path: op for op in traced("llama").cost_of(1).ops_of_kind("linear")}
    assert llama["model.layers.0.self_attn.q_proj"].shardable == {"colwise": 0, "rowwise": 1}
    assert llama["model.layers.0.self_attn.k_proj"].gemm == (B * T, 64, 32)  # 2 kv heads of 16


def test_hf_block_compute_graph(traced):
    cost = traced("llama").cost_of(1)
    path = {op.name: op.module_path for op in cost.ops}
    edges = {(path[u].split(".")[-1], path[v].split(".")[-1]) for u, v in cost.compute_graph().edges}
    assert edges == {("input_layernorm", p) for p in ("q_proj", "k_proj", "v_proj")} | {
        (p, "self_attn") for p in ("q_proj", "k_proj", "v_proj")} | {
        ("self_attn", "o_proj"), ("o_proj", "post_attention_layernorm"),
        ("post_attention_layernorm", "gate_proj"), ("post_attention_layernorm", "up_proj"),
        ("gate_proj", "down_proj"), ("up_proj", "down_proj")}


def test_config_json_path_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["qwen2"]))
    by_file = trace_hf(tmp_path / "config.json", 1, 8)
    by_dir = trace_model(str(tmp_path), 1, 8)
    assert by_file.name == by_dir.name == "hf-qwen2"
    assert [layer.signature for layer in by_file.layers] == [layer.signature for layer in by_dir.layers]


def test_hf_sequence_longer_than_positions_is_an_error():
    with pytest.raises(MeshplanError, match="max_position_embeddings 128"):
        trace_model(CONFIGS["gpt2"], 1, 256)


@pytest.mark.parametrize("config,fragment", [
    ({"model_type": "no-such-model"}, "model_type 'no-such-model' was rejected"),
    ({"model_type": "t5", "d_model": 64, "num_layers": 1, "num_heads": 4}, "cannot build a causal LM"),
])
def test_bad_hf_config_is_an_error(config, fragment):
    with pytest.raises(MeshplanError) as err:
        trace_model(config, 1, 8)
    assert fragment in str(err.value) and "\n" not in str(err.value)

"""The moe family as a model: its MoE layer computes what a per-token reference does (routing,
renormalisation, capacity, shared experts and their gate), bad configs get one line, the
presets have their published sizes, and Hugging Face's MoE configs load from config alone
into the models transformers builds (same parameters, same logits)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cost_models import MeshplanError
from fixtures.hf_configs import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, SMALL_MOE, write_config
from planner.arch.moe import MoE
from planner.hf_config import config_from_hf
from planner.models import Decoder, ModelConfig, active_parameters, count_parameters
from planner.zoo import PRESETS, load_model

TINY = dict(arch="moe", layers=2, hidden=16, heads=2, vocab=32, max_seq=16, experts=4, top_k=2, expert_ffn=8)


def _moe(seed: int = 0, **keys) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(ModelConfig(**{**TINY, **keys}))
    layer.experts.reset_parameters(torch.Generator().manual_seed(seed), std=0.3, out_std=0.3)
    return layer


def _expert(layer: MoE, e: int, x):
    w = layer.experts
    return (F.silu(x @ w.w_gate[e]) * (x @ w.w_up[e])) @ w.w_down[e]


def _reference(layer: MoE, x, capacity: int | None = None):
    """Token by token: scores, top-k, renormalised weights, the chosen experts' weighted sum
    (a (token, choice) pair past its expert's capacity, in token order, adds nothing), plus
    the shared experts (times their gate)."""
    router, filled, out = layer.router, [0] * layer.num_experts, []
    for token in x:
        logits = router.gate(token).float()
        scores = logits.softmax(-1) if router.kind == "softmax" else logits.sigmoid()
        weights, chosen = scores.topk(router.top_k)
        if router.normalize:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for w, e in zip(weights, chosen.tolist()):
            filled[e] += 1
            if capacity is None or filled[e] <= capacity:
                y = y + w * _expert(layer, e, token)
        if layer.shared is not None:
            gate = torch.sigmoid(layer.shared_gate(token)) if layer.shared_gate is not None else 1
            y = y + gate * layer.shared(token)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("keys", [
    {},                                                        # Mixtral: softmax, renormalised
    {"router_normalize": False, "shared_experts": 1, "shared_expert_ffn": 12, "shared_expert_gate": True},  # Qwen2-MoE
    {"router": "sigmoid", "shared_experts": 2, "top_k": 3},    # DeepSeek-V3
])
def test_moe_layer_equals_a_per_token_reference(keys):
    layer = _moe(**keys)
    x = torch.randn(3, 5, TINY["hidden"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x.reshape(-1, TINY["hidden"])).view_as(x))


def test_capacity_factor_drops_the_pairs_past_each_experts_capacity_in_token_order():
    layer = _moe(seed=1, capacity_factor=0.5)
    with torch.no_grad():   # expert 0 first for every token: its pairs overflow
        layer.router.gate.weight[0] += 2.0
    x = torch.randn(1, 24, TINY["hidden"]).abs()
    capacity = math.ceil(0.5 * 24 * TINY["top_k"] / TINY["experts"])
    with torch.no_grad():
        got, dropless = layer(x)[0], _reference(layer, x[0])
        expected = _reference(layer, x[0], capacity)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, dropless)   # something was dropped
    torch.testing.assert_close(got[:capacity], dropless[:capacity])   # ... and not by the first tokens


@pytest.mark.parametrize("keys,fragment", [
    ({"top_k": 5}, "model top_k must be a whole number from 1 to 4, got 5"),
    ({"top_k": None}, "needs top_k"),
    ({"arch": "llama", "experts": 8, "top_k": 2, "expert_ffn": 8}, "experts, top_k, expert_ffn are options of arch moe"),
    ({"arch": "llama", "experts": 0, "top_k": None, "expert_ffn": None, "qk_norm": True},
     "qk_norm is an option of arch moe"),
    ({"dense_layers": 3}, "model dense_layers must be a whole number from 0 to 2, got 3"),
    ({"router": "sinkhorn"}, "model router 'sinkhorn' is unknown; use one of softmax, sigmoid"),
    ({"shared_expert_gate": True}, "give shared_experts or drop it"),
    ({"qk_norm": "yes"}, "model qk_norm must be true or false"),
    ({"experts": 0}, "model experts must be a whole number from 1"),
])
def test_bad_configs_get_one_line(keys, fragment):
    with pytest.raises(MeshplanError) as err:
        ModelConfig(**{**TINY, **keys})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_model_with_every_option_trains():
    cfg = ModelConfig(**{**TINY, "layers": 3, "dense_layers": 1, "shared_experts": 1, "shared_expert_gate": True,
                         "qk_norm": True, "router": "sigmoid", "capacity_factor": 1.0})
    model = Decoder(cfg, device="cpu").init_weights(seed=0)
    ids = torch.randint(0, cfg.vocab, (2, 12))
    loss = model(ids, ids)
    assert abs(loss.item() - math.log(cfg.vocab)) < 0.5   # near uniform at initialisation
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for name in ("blocks.1.q_norm.weight", "blocks.1.moe.shared_gate.weight", "blocks.2.moe.router.gate.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_qwen_options_are_left_out_of_to_dict_when_off():
    assert "qk_norm" not in PRESETS["moe-tiny"].to_dict() and "shared_expert_gate" not in PRESETS["moe-tiny"].to_dict()
    cfg = PRESETS["qwen3-30b-a3b"]
    assert cfg.to_dict()["qk_norm"] is True and ModelConfig.from_dict(cfg.to_dict()) == cfg


# --- sizes --------------------------------------------------------------------------------------

def _mla_minus_gqa(data: dict) -> int:
    """Per block: DeepSeek's MLA attention parameters (transformers modeling_deepseek_v3.py
    DeepseekV3Attention: q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj) less those of the GQA meshplan prices in its place."""
    h, heads, kv = data["hidden_size"], data["num_attention_heads"], data["num_key_value_heads"]
    rope, nope, v, q_rank, kv_rank = (data[k] for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                                                         "q_lora_rank", "kv_lora_rank"))
    mla = (h * q_rank + q_rank + q_rank * heads * (nope + rope) + h * (kv_rank + rope) + kv_rank
           + kv_rank * heads * (nope + v) + heads * v * h)
    gqa = h * heads * rope * 2 + h * kv * rope * 2   # q and o; k and v (head_dim = qk_rope_head_dim)
    return mla - gqa


# Published sizes: the totals quoted to 3 significant figures (within 0.2%), the active ones
# to 2 (within 2%).
# Total: every parameter. Active: Mistral and Qwen count the embedding table, OpenAI and
# DeepSeek do not (planner.models.active_parameters says which is which).
@pytest.mark.parametrize("name,total,active,embeddings", [
    ("mixtral-8x7b", 46.7e9, 12.9e9, True),       # Mistral AI, "Mixtral of experts" (2023-12-11)
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, True),       # Qwen/Qwen3-30B-A3B model card
    ("qwen3-235b-a22b", 235e9, 22e9, True),       # Qwen/Qwen3-235B-A22B model card
])
def test_presets_have_their_published_sizes(name, total, active, embeddings):
    assert count_parameters(load_model(name).build("meta")) == pytest.approx(total, rel=2e-3)
    assert active_parameters(PRESETS[name], embeddings) == pytest.approx(active, rel=0.02)


def test_gpt_oss_120b_is_its_published_size_less_the_biases_it_does_not_model():
    # the gpt-oss-120b model card (arXiv 2508.10925) Table 1: 116.83B total, 5.13B active;
    # unmodelled per block: each expert's gate/up (2 x 2880) and down (2880) biases, the router's
    # 128 and the 64 attention sinks
    cfg = PRESETS["gpt-oss-120b"]
    per_expert_bias = 3 * cfg.expert_ffn
    missing = cfg.layers * (cfg.experts * per_expert_bias + cfg.experts + cfg.heads)
    assert count_parameters(load_model("gpt-oss-120b").build("meta")) + missing == pytest.approx(116.83e9, rel=1e-3)
    active_missing = cfg.layers * (cfg.top_k * per_expert_bias + cfg.experts + cfg.heads)
    assert active_parameters(cfg, embeddings=False) + active_missing == pytest.approx(5.13e9, rel=2e-3)


def test_deepseek_v3_with_mla_in_place_of_its_gqa_is_its_published_size():
    # DeepSeek-V3's README_WEIGHTS.md: 671B main-model parameters, 36.6B active (the head
    # included, the embedding not); our GQA attention differs from MLA by _mla_minus_gqa per block
    cfg = PRESETS["deepseek-v3"]
    mla = cfg.layers * _mla_minus_gqa(DEEPSEEK_V3)
    assert count_parameters(load_model("deepseek-v3").build("meta")) + mla == pytest.approx(671e9, rel=1e-3)
    assert active_parameters(cfg, embeddings=False) + mla == pytest.approx(36.6e9, rel=5e-3)


def test_active_parameters_leave_out_the_routed_experts_a_token_skips():
    cfg = PRESETS["moe-tiny"]
    model = Decoder(cfg, device="meta")
    per_expert = 3 * cfg.hidden * cfg.expert_ffn
    moe_blocks = cfg.layers - cfg.dense_layers
    skipped = moe_blocks * (cfg.experts - cfg.top_k) * per_expert
    assert active_parameters(cfg) == active_parameters(model) == count_parameters(model) - skipped
    assert active_parameters(cfg, embeddings=False) == count_parameters(model) - skipped - cfg.vocab * cfg.hidden
    dense = PRESETS["gpt-tiny"]   # tied head, learned positions: only `pos` is a pure lookup
    assert active_parameters(dense) == count_parameters(Decoder(dense, device="meta"))
    assert active_parameters(dense, embeddings=False) == active_parameters(dense) - dense.max_seq * dense.hidden


# --- Hugging Face configs ------------------------------------------------------------------------

@pytest.mark.parametrize("data,preset", [(MIXTRAL_8X7B, "mixtral-8x7b"), (QWEN3_30B_A3B, "qwen3-30b-a3b"),
                                         (DEEPSEEK_V3, "deepseek-v3")])
def test_real_configs_map_onto_the_presets(tmp_path, data, preset):
    spec = load_model(str(write_config(tmp_path / preset, data)))
    assert replace(spec.config, name=preset) == PRESETS[preset]


def test_qwen2_moe_config_has_qwen1_5_moe_a2_7b_published_size():
    # Qwen/Qwen1.5-MoE-A2.7B's sizes (its config.json; the rest are Qwen2MoeConfig's defaults,
    # shared_expert_intermediate_size 5632 among them): 14.3B total, 2.7B active (its model card)
    data = dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=24, num_experts=60,
                num_experts_per_tok=4, vocab_size=151936, max_position_embeddings=8192)
    cfg = config_from_hf(data, "qwen1.5-moe-a2.7b", "config")
    assert (cfg.shared_experts, cfg.shared_expert_ffn, cfg.shared_expert_gate, cfg.router_normalize) == (1, 5632, True,
                                                                                                       False)
    assert count_parameters(Decoder(cfg, device="meta")) == pytest.approx(14.3e9, rel=2e-3)
    assert active_parameters(cfg) == pytest.approx(2.7e9, rel=0.02)


@pytest.mark.parametrize("family,keys,fragment", [
    ("mixtral", {"output_router_logits": True}, "output_router_logits = true adds a load-balancing loss"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1"),
    ("qwen2_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 4}, "dense blocks [0, 2] (mlp_only_layers"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "dense blocks [1]"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias = true biases MLA's"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func = 'softmax' is not what transformers' DeepseekV3"),
    ("deepseek_v3", {"first_k_dense_replace": 3}, "first_k_dense_replace must be a whole number from 0 to"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantized weights are not modelled"),
    ("qwen3_moe", {"moe_jitter": 1}, "key(s) ['moe_jitter'] of model_type 'qwen3_moe' are not modelled"),
])
def test_unmappable_configs_get_one_line(family, keys, fragment):
    with pytest.raises(MeshplanError) as err:
        config_from_hf({**SMALL_MOE[family], **keys}, family, "config")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_sliding_windows_cap_max_seq_as_transformers_applies_them():
    qwen2 = {**SMALL_MOE["qwen2_moe"], "use_sliding_window": True, "sliding_window": 64}
    assert config_from_hf(qwen2, "q", "config").max_seq == 64   # layer 0 slides (configuration_qwen2_moe.py)
    assert config_from_hf({**qwen2, "layer_types": ["full_attention"] * 2}, "q", "config").max_seq == 128
    assert config_from_hf({**SMALL_MOE["qwen3_moe"], "sliding_window": 64}, "q", "config").max_seq == 128
    assert config_from_hf({**SMALL_MOE["qwen3_moe"], "sliding_window": 64, "use_sliding_window": True},
                          "q", "config").max_seq == 64
    assert config_from_hf({**SMALL_MOE["mixtral"], "sliding_window": 32}, "m", "config").max_seq == 32


# transformers' MoE parameter names -> ours (after "model." is dropped); the experts' stacked
# gate_up_proj (E, 2f, h) and down_proj (E, h, f) are split and transposed in _ours
_RENAMES = [
    (r"^embed_tokens\.", "tok."), (r"^lm_head\.", "head."), (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"\.input_layernorm\.", ".n1."), (r"\.post_attention_layernorm\.", ".n2."),
    (r"\.self_attn\.(q|k|v|o)_proj\.", r".\1."), (r"\.self_attn\.(q_norm|k_norm)\.", r".\1."),
    (r"\.mlp\.(gate|up|down)_proj\.", r".\1."), (r"\.mlp\.gate\.weight$", ".moe.router.gate.weight"),
    (r"\.mlp\.shared_experts?\.(gate|up|down)_proj\.", r".moe.shared.\1."),
    (r"\.mlp\.shared_expert_gate\.", ".moe.shared_gate."),
]


def _ours(hf_state: dict) -> dict:
    out = {}
    for name, value in hf_state.items():
        name = re.sub(r"^model\.", "", name)
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        if name.endswith(".mlp.experts.gate_up_proj"):
            stem = name.replace(".mlp.experts.gate_up_proj", ".moe.experts.")
            gate, up = value.chunk(2, dim=1)
            out[stem + "w_gate"], out[stem + "w_up"] = gate.transpose(1, 2), up.transpose(1, 2)
        elif name.endswith(".mlp.experts.down_proj"):
            out[name.replace(".mlp.experts.down_proj", ".moe.experts.w_down")] = value.transpose(1, 2)
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_same_weights_give_transformers_logits(tmp_path, family):
    pytest.importorskip("transformers")
    from planner.hf import hf_model_from_config
    data = SMALL_MOE[family]
    torch.manual_seed(0)
    theirs = hf_model_from_config(data, device="cpu").eval()
    with torch.no_grad():   # the routers start at zero: make every weight count
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spec = load_model(str(write_config(tmp_path / family, data)))
    ours = spec.build("cpu").eval()
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    ours.load_state_dict(_ours(theirs.state_dict()))   # strict: every parameter, both ways
    ids = torch.randint(0, spec.config.vocab, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_deepseek_v3_differs_from_transformers_by_mla_alone():
    pytest.importorskip("transformers")
    from planner.hf import hf_model_from_config
    data = SMALL_MOE["deepseek_v3"]
    theirs = sum(p.numel() for p in hf_model_from_config(data, device="meta").parameters())
    ours = count_parameters(Decoder(config_from_hf(data, "d", "config"), device="meta"))
    assert ours + data["num_hidden_layers"] * _mla_minus_gqa(data) == theirs


def test_models_lists_the_moe_presets_with_total_and_active_parameters(cli):
    listed = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)}
    for name in ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-120b", "deepseek-v3"):
        assert listed[name]["params"] == count_parameters(load_model(name).build("meta"))
        assert listed[name]["active_params"] == active_parameters(PRESETS[name]) < listed[name]["params"]
    assert listed["deepseek-v3"]["experts"] == "256 x 2048, top 8, +1 shared, 3 dense first"
    assert listed["llama3-8b"]["active_params"] == listed["llama3-8b"]["params"]
    table = cli("models").stdout
    assert "12.88 B" in table and "46.70 B" in table   # mixtral-8x7b: active, total
    described = cli("describe", "--model", "qwen3-30b-a3b", "--cluster", "dgx-h100").stdout
    assert "experts: 128 x 768, top 8, softmax router; 3.35 B active per token" in described

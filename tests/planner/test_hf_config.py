"""`--model` takes a Hugging Face config.json, a model directory or a model in the local HF cache
(planner.hf_config): each family plans with tensor parallelism as meshplan's own model, real
configs map onto the presets sized from the papers, and what meshplan cannot price is refused
in one line."""
from __future__ import annotations

import json

import pytest

from cost_models.errors import MeshplanError
from fixtures.hf_configs import GPT2, LLAMA31_8B, SMALL, write_config
from helpers import assert_user_error, run_cli_in_process
from planner.models import ModelConfig, count_parameters
from planner.plan import Plan
from planner.search import plan
from planner.simulate import prepare, simulate
from planner.zoo import PRESETS, load_model

SIZES = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "tie_embeddings", "activation")


@pytest.mark.parametrize("family", sorted(SMALL))
def test_each_family_plans_with_tensor_parallelism(family):
    data, arch = SMALL[family]
    best = plan(data, "cpu:1x2", global_batch=4, seq=64, tp=2, pp=1, micro_batch=2, zero=0)[0]
    assert best.tp == 2 and best.result.fits
    assert {best.tp_layout[n] for n in ("q", "qkv") if n in best.tp_layout} == {"colwise"}
    assert load_model(data).config.arch == arch


def test_real_configs_are_the_presets_sized_from_the_papers():
    gpt2 = load_model(GPT2).config
    assert {k: getattr(gpt2, k) for k in SIZES} == {**{k: getattr(PRESETS["gpt2-124m"], k) for k in SIZES},
                                                    "activation": "gelu_tanh"}
    assert (gpt2.dropout, gpt2.attention_dropout, gpt2.embedding_dropout, gpt2.max_seq) == (0.1, 0.1, 0.1, 1024)
    assert count_parameters(load_model(GPT2).build("meta")) == count_parameters(load_model("gpt2-124m").build("meta"))
    llama = load_model(LLAMA31_8B).config
    assert {k: getattr(llama, k) for k in SIZES} == {k: getattr(PRESETS["llama3-8b"], k) for k in SIZES}
    assert (llama.rope_theta, llama.norm_eps, llama.max_seq, llama.qkv_bias) == (500000.0, 1e-5, 131072, False)


def test_cli_plans_from_a_config_json_and_a_model_directory(tmp_path):
    path = write_config(tmp_path / "tiny-qwen3", SMALL["qwen3"][0])
    for model in (path, path.parent):
        proc = run_cli_in_process("plan", "--model", model, "--cluster", "cpu:1x2", "--global-batch", 4, "--seq", 64,
                                  "--tp", 2, "--pp", 1, "--micro-batch", 2, "--top", 1, "--json")
        assert proc.returncode == 0, proc.stderr
        best = json.loads(proc.stdout)["plans"][0]
        assert best["tp"] == 2 and best["tp_layout"]["q_norm"] in ("replicate", "sequence")


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home in tmp_path, as HF_HOME names it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _cache(hub, repo_id: str, data: dict, revision: str = "0123abcd", main: bool = True):
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    write_config(repo / "snapshots" / revision, data)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)


def test_a_model_in_the_local_cache_by_name(hf_home, monkeypatch, tmp_path):
    _cache(hf_home / "hub", "meta-llama/Llama-3.1-8B", LLAMA31_8B)
    _cache(hf_home / "hub", "meta-llama/Llama-3.1-8B", {**LLAMA31_8B, "num_hidden_layers": 2}, "old", main=False)
    spec = load_model("meta-llama/Llama-3.1-8B")
    assert spec.name == "meta-llama/Llama-3.1-8B" and spec.config.layers == 32   # refs/main's snapshot
    proc = run_cli_in_process("describe", "--model", "meta-llama/Llama-3.1-8B", "--cluster", "dgx-h100")
    assert proc.returncode == 0 and "meta-llama/Llama-3.1-8B" in proc.stdout, proc.stderr
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    _cache(tmp_path / "elsewhere", "Qwen/tiny", SMALL["qwen3"][0], main=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert load_model("Qwen/tiny").config.arch == "qwen3"
    with pytest.raises(MeshplanError, match="not in the local Hugging Face cache"):
        load_model("meta-llama/Llama-3.1-8B")


def test_a_sliding_window_bounds_the_sequence_it_prices_exactly():
    mistral = dict(SMALL["mistral"][0], sliding_window=32)
    assert load_model(mistral).config.max_seq == 32   # min(max positions 128, window 32)
    assert load_model(SMALL["mistral"][0]).config.max_seq == 128
    assert load_model({k: v for k, v in SMALL["mistral"][0].items() if k != "sliding_window"}).config.max_seq == 128
    with pytest.raises(MeshplanError, match="seq 64 exceeds the model's max_seq 32"):
        simulate(Plan(micro_batch=1, global_batch=1, seq=64), mistral, "cpu:1x1")
    qwen2 = dict(SMALL["qwen2"][0], sliding_window=16, max_window_layers=1)
    assert load_model(qwen2).config.max_seq == 128                     # use_sliding_window is off
    assert load_model({**qwen2, "use_sliding_window": True}).config.max_seq == 16
    assert load_model({**qwen2, "use_sliding_window": True, "max_window_layers": 2}).config.max_seq == 128
    gemma2 = {k: v for k, v in SMALL["gemma2"][0].items() if k != "max_position_embeddings"}
    assert load_model(gemma2).config.max_seq == 4096       # every other layer slides over 4096 of 8192
    assert load_model({**gemma2, "layer_types": ["full_attention"] * 2}).config.max_seq == 8192


def test_gemma2_softcaps_scores_in_unfused_attention_and_its_logits():
    gemma2 = load_model(SMALL["gemma2"][0]).config
    assert (gemma2.attention, gemma2.attention_softcap, gemma2.logit_softcap) == ("unfused", 50.0, 30.0)
    uncapped = load_model({**SMALL["gemma2"][0], "attn_logit_softcapping": None}).config
    assert (uncapped.attention, uncapped.attention_softcap) == ("sdpa", None)
    with pytest.raises(MeshplanError, match="attention_softcap needs attention 'unfused'"):
        ModelConfig.from_dict({**gemma2.to_dict(), "attention": "sdpa"})


@pytest.mark.parametrize("config, fragments", [
    ({"model_type": "bert", "hidden_size": 64}, ["model_type 'bert' is not a family", "gpt2, llama, mistral"]),
    ({"model_type": "olmoe", "hidden_size": 64}, ["model_type 'olmoe'", "qwen3, gemma, gemma2, phi, phi3, mixtral"]),
    ({**SMALL["llama"][0], "quantization_config": {"quant_method": "bitsandbytes"}},
     ["quantization_config", "quantized weights are not modelled"]),
    ({**SMALL["phi"][0], "qk_layernorm": True}, ["qk_layernorm = True", "not modelled"]),
    ({**SMALL["llama"][0], "hidden_act": "quick_gelu"}, ["hidden_act 'quick_gelu' is not modelled"]),
    ({**SMALL["qwen3"][0], "num_experts": 8}, ["num_experts = 8", "mixture-of-experts"]),
    ({**SMALL["llama"][0], "attn_logit_softcapping": 50.0}, ["['attn_logit_softcapping']", "not modelled"]),
    ({**SMALL["llama"][0], "num_hidden_layers": "2"}, ["num_hidden_layers must be a whole number"]),
])
def test_what_meshplan_cannot_price_is_refused_in_one_line(tmp_path, config, fragments):
    path = write_config(tmp_path / "m", config)
    assert_user_error(run_cli_in_process("describe", "--model", path, "--cluster", "dgx-h100"), *fragments)


def test_missing_models_name_the_fix(tmp_path, hf_home):
    assert_user_error(run_cli_in_process("plan", "--model", "org/absent", "--cluster", "cpu:1x2", "--global-batch", 4),
                      "'org/absent' is not in the local Hugging Face cache", "pass the path of its config.json")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli_in_process("describe", "--model", tmp_path / "empty", "--cluster", "dgx-h100"),
                      "holds no config.json")


def test_head_norm_gradients_are_reduced_over_the_tp_group():
    """Qwen3's q_norm and k_norm weights see only this rank's heads, so their gradients are
    summed over the TP group after backward with or without sequence parallelism; the other
    families' norms only under it (planner.simulate.communication.norm_grad_bytes)."""
    qwen3, llama = SMALL["qwen3"][0], SMALL["llama"][0]
    for model, sp, params in ((qwen3, False, 2 * 2 * 32), (llama, False, 0), (qwen3, True, 2 * (2 * 64 + 2 * 32) + 64)):
        sim = prepare(Plan(tp=2, micro_batch=2, global_batch=2, seq=16, sequence_parallel=sp), model, "cpu:1x2")
        assert sim.norm_grad_bytes(0, [list(range(len(sim.traced.layers)))]) == params * sim.grad_dtype_bytes


def test_model_config_checks_the_fields_hf_families_added():
    # derived fields follow what they derive from when a config is edited through to_dict
    edited = ModelConfig.from_dict({**PRESETS["gpt-tiny"].to_dict(), "dropout": 0.1, "hidden": 128})
    assert (edited.attention_dropout, edited.embedding_dropout, edited.head_dim) == (0.1, 0.1, 32)
    assert ModelConfig("phi", 2, 64, 4, 256, rotary_fraction=0.25).rotary_dims == 4
    for kw, message in ((dict(arch="gpt", rotary_fraction=0.5), "gpt models have learned positions"),
                        (dict(arch="phi", rotary_fraction=0.1), "rotate 1 of head size 16"),
                        (dict(arch="llama", activation="gelu_fast"), "activation 'gelu_fast' is unknown"),
                        (dict(arch="llama", hidden=60, heads=8), "or give head_dim"),
                        (dict(arch="gemma", mlp_bias="yes"), "mlp_bias must be true or false")):
        with pytest.raises(MeshplanError, match=message):
            ModelConfig(**{**dict(layers=2, hidden=64, heads=4, vocab=256), **kw})
    assert ModelConfig("llama", 2, 60, 4, 256, head_dim=16).head_dim == 16   # head_dim need not divide hidden


def test_training_flops_per_token_count_attention_over_heads_times_head_dim():
    """runtime.metrics' MFU numerator (PaLM's 6N + 12 L H Q T) against FlopCounterMode on a Gemma
    whose 4 heads of 32 are twice its hidden size of 64 (norm weights, 0.3 % of N, are not matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from runtime.metrics import flops_per_token
    spec, seq = load_model(SMALL["gemma"][0]), 32
    model = spec.build("meta")
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(ids, ids)
    params = count_parameters(model)   # tied: the head's matmul is the embedding's weight
    attention_fwd = counter.get_total_flops() / seq - 2 * params
    assert flops_per_token(spec.config, params, seq) == pytest.approx(6 * params + 3 * attention_fwd, rel=0.01)

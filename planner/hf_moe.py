"""The Mixture-of-Experts Hugging Face configs as meshplan "moe" ModelConfigs (planner.hf_config
calls the mapping of a config's model_type; planner.hf_reader reads the keys).

Written from transformers 5.25's configuration_<family>.py (defaults) and modeling_<family>.py
(what each key builds), per model_type:

- mixtral: Mistral's attention (the window, when set, on every layer); every block routes to
  num_experts_per_tok of num_local_experts SwiGLU experts of intermediate_size, softmax scores
  renormalised over the chosen (MixtralTopKRouter).
- qwen2_moe: Qwen2's attention (q, k, v biased by qkv_bias); experts of moe_intermediate_size;
  one shared expert of shared_expert_intermediate_size whose output is scaled by
  sigmoid(shared_expert_gate(x)) - modelled (ModelConfig.shared_expert_gate: one hidden -> 1
  weight row per block); norm_topk_prob (false by default) decides the renormalisation.
- qwen3_moe: Qwen3's attention with its q/k head norms (ModelConfig.qk_norm), attention_bias
  on q, k, v and o; no shared expert.
- Qwen's dense blocks are those in mlp_only_layers or off the decoder_sparse_step beat; meshplan
  builds them only as a leading run (dense_layers), so any other pattern is refused.
- deepseek_v3: first_k_dense_replace dense blocks of intermediate_size, then n_routed_experts
  experts of moe_intermediate_size, top num_experts_per_tok by sigmoid scores, and
  n_shared_experts always-on ones. **Its attention is approximated**: multi-head latent
  attention (MLA: low-rank q_lora_rank / kv_lora_rank projections, 192-wide query-key and
  128-wide value heads) is priced as grouped-query attention with the config's query and
  key/value head counts and head_dim = qk_rope_head_dim (DeepseekV3Config's own head_dim,
  configuration_deepseek_v3.py __post_init__). For DeepSeek-V3 that is 235M parameters per
  block where MLA holds 187M (674B in all, not 671B), and a token's causal attention FLOPs at
  seq 4096 within 1% of MLA's (planner/zoo.py's deepseek-v3 preset says the same).
  The group-limited choice (n_group, topk_group), the score-correction bias and
  routed_scaling_factor change which experts a token picks and its weights, not the cost;
  transformers builds no multi-token-prediction module (num_nextn_predict_layers), and
  neither does meshplan.
- Every family: output_router_logits true (transformers then adds the load-balancing loss
  over every block's router scores to the loss) is refused; router_aux_loss_coef, that
  loss's weight, is unused without it.
"""
from __future__ import annotations

from cost_models.errors import MeshplanError
from cost_models.inputs import shown
from planner.hf_reader import Reader, llama_like, window_max_seq


def _no_aux_loss(r: Reader) -> None:
    if r.flag("output_router_logits", False):
        raise MeshplanError(f"{r.where}: output_router_logits = true adds a load-balancing loss over every block's "
                            f"router scores, which is not modelled; set it false")
    r.value("router_aux_loss_coef")


def _mixtral(r: Reader) -> dict:
    # configuration_mixtral.py: MixtralConfig; modeling_mixtral.py: no biases, the window on
    # every layer (MixtralAttention), router jitter (training only) multiplies the block's input
    cfg = llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=8, max_seq=4096 * 32, ffn=14336,
                         vocab=32000, eps=1e-5))
    cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], None)
    if r.number("router_jitter_noise", 0.0) != 0:
        raise MeshplanError(f"{r.where}: router_jitter_noise = {shown(r.data['router_jitter_noise'])} scales each "
                            f"block's input by random noise, which is not modelled; set it 0")
    _no_aux_loss(r)
    return dict(arch="moe", **cfg, **r.rope(None), qkv_bias=False, out_bias=False, mlp_bias=False,
                experts=r.size("num_local_experts", 8, "num_experts"), top_k=r.size("num_experts_per_tok", 2),
                expert_ffn=cfg["ffn"], router_normalize=True)


def _leading_dense(r: Reader, layers: int) -> int:
    """Qwen-MoE's dense blocks (modeling_qwen2_moe.py Qwen2MoeDecoderLayer: layer i is dense
    when in mlp_only_layers or (i + 1) % decoder_sparse_step != 0) as a count of leading ones."""
    step = r.size("decoder_sparse_step", 1)
    only = r.value("mlp_only_layers", [])
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise MeshplanError(f"{r.where}: mlp_only_layers must be a list of layer numbers, got {shown(only)}")
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    if dense != list(range(len(dense))):
        raise MeshplanError(f"{r.where}: dense blocks {dense} (mlp_only_layers, decoder_sparse_step) are not a leading "
                            f"run, the only dense blocks meshplan's moe models have; use mlp_only_layers [0..k-1] "
                            f"and decoder_sparse_step 1")
    return len(dense)


def _qwen_moe(r: Reader, qwen3: bool) -> dict:
    # configuration_qwen2_moe.py / configuration_qwen3_moe.py; modeling_qwen2_moe.py: q, k, v
    # biased by qkv_bias, o not, a gated shared expert; modeling_qwen3_moe.py: attention_bias on
    # q, k, v and o, q_norm / k_norm, the window on every layer with use_sliding_window
    cfg = llama_like(r, dict(layers=24, heads=32 if qwen3 else 16, hidden=2048, kv_heads=4 if qwen3 else 16,
                         max_seq=32768, ffn=6144 if qwen3 else 5632, vocab=151936))
    if qwen3:
        r.value("max_window_layers")   # Qwen3MoeModel never reads it
        if r.flag("use_sliding_window", False):   # then the window is on every layer
            cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], 4096)
        r.value("sliding_window")
        bias = r.flag("attention_bias", False)
        attention = dict(qkv_bias=bias, out_bias=bias, qk_norm=True)
        shared = {}
    else:
        cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], 4096, gated=True,
                                 sliding=lambda i, bound: i % 2 == 0 and i < bound)
        attention = dict(qkv_bias=r.flag("qkv_bias", True), out_bias=False)
        shared = dict(shared_experts=1, shared_expert_ffn=r.size("shared_expert_intermediate_size", 5632),
                      shared_expert_gate=True)
    dense = _leading_dense(r, cfg["layers"])
    _no_aux_loss(r)
    experts = r.size("num_experts", 128 if qwen3 else 60, *(("num_local_experts",) if qwen3 else ()))
    return dict(arch="moe", **cfg, **r.rope(None), **attention, mlp_bias=False, experts=experts,
                top_k=r.size("num_experts_per_tok", 8 if qwen3 else 4),
                expert_ffn=r.size("moe_intermediate_size", 768 if qwen3 else 1408), **shared,
                dense_layers=dense, dense_ffn=cfg["ffn"], router_normalize=r.flag("norm_topk_prob", False))


# DeepSeek's own config.json (its remote modeling_deepseek.py) carries keys transformers'
# DeepseekV3 does not read; these values are the ones that model builds.
_DEEPSEEK_FIXED = {"scoring_func": "sigmoid", "moe_layer_freq": 1, "topk_method": "noaux_tc"}


def _deepseek_v3(r: Reader) -> dict:
    # configuration_deepseek_v3.py: DeepseekV3Config; modeling_deepseek_v3.py: the MLA
    # attention priced as GQA (the module docstring), DeepseekV3TopkRouter, DeepseekV3MoE
    cfg = llama_like(r, dict(layers=61, heads=128, hidden=7168, kv_heads=128, max_seq=4096, ffn=18432,
                         vocab=129280))
    r.value("qk_head_dim")   # __post_init__ derives it and head_dim from the MLA sizes below
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        r.value(key)         # MLA's sizes: approximated (the module docstring)
    cfg["head_dim"] = r.size("qk_rope_head_dim", 64)
    if r.flag("attention_bias", False):
        raise MeshplanError(f"{r.where}: attention_bias = true biases MLA's low-rank projections, which are not "
                            f"modelled; set it false")
    for key, value in _DEEPSEEK_FIXED.items():
        if r.value(key, value) != value:
            raise MeshplanError(f"{r.where}: {key} = {shown(r.data[key])} is not what transformers' DeepseekV3 "
                                f"builds ({value!r}); meshplan models that")
    for key in ("n_group", "topk_group", "routed_scaling_factor", "rope_interleave", "ep_size", "aux_loss_alpha",
                "seq_aux", "num_nextn_predict_layers", "num_mtp_layers"):
        r.value(key)         # routing choices, weights and rotary order: the same cost; ep_size is for inference
    _no_aux_loss(r)
    shared = r.value("n_shared_experts", 1)
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise MeshplanError(f"{r.where}: n_shared_experts must be a whole number >= 0, got {shown(shared)}")
    dense = r.value("first_k_dense_replace", 3)
    if isinstance(dense, bool) or not isinstance(dense, int) or not 0 <= dense <= cfg["layers"]:
        raise MeshplanError(f"{r.where}: first_k_dense_replace must be a whole number from 0 to num_hidden_layers "
                            f"({cfg['layers']}), got {shown(dense)}")
    return dict(arch="moe", **cfg, **r.rope(None), qkv_bias=False, out_bias=False, mlp_bias=False,
                experts=r.size("n_routed_experts", 256, "num_local_experts"), top_k=r.size("num_experts_per_tok", 8),
                expert_ffn=r.size("moe_intermediate_size", 2048), shared_experts=shared, dense_layers=dense,
                dense_ffn=cfg["ffn"], router="sigmoid", router_normalize=r.flag("norm_topk_prob", True))


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": lambda r: _qwen_moe(r, qwen3=False),
            "qwen3_moe": lambda r: _qwen_moe(r, qwen3=True), "deepseek_v3": _deepseek_v3}

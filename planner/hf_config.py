"""A Hugging Face config.json as a meshplan ModelConfig, and a model's config.json found in the
local Hugging Face cache (never the network).

The mapping is written from transformers 5.25's configuration_<family>.py (the defaults of
a key a config leaves out) and modeling_<family>.py (what each key builds), per model_type:

- gpt2 -> gpt; llama, mistral, qwen2 and phi3 -> llama (Phi-3's fused qkv_proj and
  gate_up_proj are the same products as separate q, k, v and gate, up); qwen3 -> qwen3;
  gemma -> gemma; gemma2 -> gemma2 (its softcapped scores need unfused attention, as
  transformers runs it: eager); phi -> phi.
- Every key that changes the model's cost or memory is carried into the ModelConfig:
  sizes, head_dim, kv heads, vocabulary, max positions, tied embeddings, norm epsilon,
  activation, biases, dropouts, rotary theta and partial rotary.
- A sliding attention window W that some layer uses is causal attention for any sequence
  of at most W tokens (transformers masking_utils.sliding_window_overlay: key j is seen
  from query i when i - j < W), so the model's max_seq becomes min(max positions, W): what
  meshplan plans is then exact, and a longer sequence is refused, not mispriced.
- Keys that change nothing meshplan prices are accepted and named in FREE_KEYS (with why);
  a key that would change the cost but that meshplan cannot model is refused in one line
  that names it (REFUSED and the per-family checks); any other key is refused as unknown.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.inputs import shown
from planner.models import ModelConfig

# Hugging Face activation names (transformers/activations.py ACT2CLS) -> ModelConfig.activation.
# gelu_new and gelu_fast are GELU's tanh approximation written out op by op; meshplan's
# runtime computes the same function as one kernel.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu", "relu": "relu"}

# Accepted and not modelled: none of them changes what a training step computes or holds.
FREE_KEYS = {
    **dict.fromkeys(("architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path",
                     "_commit_hash", "model_type"), "bookkeeping"),
    **dict.fromkeys(("torch_dtype", "dtype", "use_bfloat16"), "the plan's precision decides"),
    **dict.fromkeys(("initializer_range", "initializer_factor"), "initial values only"),
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
                     "tokenizer_class", "prefix", "id2label", "label2id", "num_labels", "problem_type",
                     "finetuning_task", "task_specific_params"), "tokenizer and task metadata"),
    **dict.fromkeys(("use_cache", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
                     "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
                     "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                     "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
                     "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                     "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
                     "cache_implementation"),
                   "generation only"),
    **dict.fromkeys(("return_dict", "use_return_dict", "output_hidden_states", "output_attentions", "torchscript",
                     "tf_legacy_loss", "attn_implementation", "_attn_implementation",
                     "_attn_implementation_autoset", "gradient_checkpointing"),
                    "runtime switches (meshplan picks attention kernels and recomputation itself)"),
    **dict.fromkeys(("rope_scaling", "rope_parameters", "rope_type", "original_max_position_embeddings"),
                    "rotary frequencies and their scaling: the same ops at any frequency"),
    "pretraining_tp": "transformers 5 ignores it",
    "n_ctx": "GPT-2's unused legacy copy of n_positions",
    # a constant factor on the attention scores costs nothing; meshplan's is 1 / sqrt(head_dim)
    **dict.fromkeys(("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "query_pre_attn_scalar"),
                    "a constant factor on the attention scores"),
    "reorder_and_upcast_attn": "GPT-2's eager attention only; SDPA ignores it",
    **dict.fromkeys(("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                     "summary_first_dropout"), "GPT-2's double-heads model only"),
}
# Keys that change the cost unless absent or one of the values given, and what they would need.
REFUSED = {
    "quantization_config": ((), "quantized weights are not modelled"),
    "is_encoder_decoder": ((False,), "encoder-decoder models are not decoders"),
    "add_cross_attention": ((False,), "cross-attention layers are not modelled"),
    "pruned_heads": (({},), "pruned heads are not modelled"),
    "chunk_size_feed_forward": ((0,), "chunked feed-forward is not modelled"),
    "use_bidirectional_attention": ((False,), "non-causal attention is not modelled"),
    "qk_layernorm": ((False,), "Phi's query/key LayerNorm is not modelled"),
    "num_experts": ((0,), "mixture-of-experts layers are not modelled"),
    "num_local_experts": ((0,), "mixture-of-experts layers are not modelled"),
}
FREE_KEYS.update(dict.fromkeys(("is_decoder", "tie_encoder_decoder", "cross_attention_hidden_size"),
                               "encoder-decoder settings, unused by a decoder"))


class _Reader:
    """Reads one config's keys by name, with the family's transformers defaults, and
    remembers what it read so the leftovers can be refused."""

    def __init__(self, data: dict, where: str):
        self.data, self.where, self.read = data, where, {"model_type"}

    def value(self, key: str, default=None, *aliases: str):
        for name in (key, *aliases):
            self.read.add(name)
        for name in (key, *aliases):
            if self.data.get(name) is not None:
                return self.data[name]
        return default

    def size(self, key: str, default=None, *aliases: str) -> int | None:
        value = self.value(key, default, *aliases)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MeshplanError(f"{self.where}: {key} must be a whole number >= 1, got {shown(value)}")
        return value

    def number(self, key: str, default, *aliases: str) -> float:
        value = self.value(key, default, *aliases)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MeshplanError(f"{self.where}: {key} must be a number, got {shown(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise MeshplanError(f"{self.where}: {key} must be true or false, got {shown(value)}")
        return value

    def activation(self, key: str, default: str) -> str:
        value = self.value(key, default)
        if value not in ACTIVATIONS:
            raise MeshplanError(f"{self.where}: {key} {shown(value)} is not modelled; meshplan has "
                                f"{', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[value]

    def rope(self, default_fraction: float | None) -> dict:
        """rope_theta (transformers 5 keeps it in rope_parameters; older configs at the top or in
        rope_scaling) and, for a family whose attention rotates part of each head, the fraction."""
        params, legacy = self.value("rope_parameters", {}), self.value("rope_scaling", {})
        if not isinstance(params, dict) or not isinstance(legacy, dict):
            raise MeshplanError(f"{self.where}: rope_parameters and rope_scaling must be JSON objects")
        merged = {**legacy, **params}
        out = {"rope_theta": merged.get("rope_theta", self.value("rope_theta", 10000.0))}
        if default_fraction is not None:
            out["rotary_fraction"] = merged.get("partial_rotary_factor",
                                                self.value("partial_rotary_factor", default_fraction))
        for key, value in out.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MeshplanError(f"{self.where}: {key} must be a number, got {shown(value)}")
        return {k: float(v) for k, v in out.items()}

    def leftovers(self, model_type: str) -> None:
        for key, (allowed, why) in REFUSED.items():
            self.read.add(key)
            value = self.data.get(key)
            if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
                raise MeshplanError(f"{self.where}: {key} = {shown(value)} changes the cost and {why}; "
                                    f"remove it or use a model without it")
        unknown = sorted(k for k in self.data if k not in self.read and k not in FREE_KEYS)
        if unknown:
            raise MeshplanError(f"{self.where}: key(s) {unknown} of model_type {model_type!r} are not modelled and "
                                f"may change the cost; remove them if they do not (see docs/cli.md)")


def _window(r: _Reader, max_seq: int, layers: int, default: int | None, gated: bool = False,
            alternating: bool = False) -> int:
    """max_seq under a sliding window (see the module docstring) that some layer uses. Mistral
    and Phi-3 use it on every layer; Qwen2/3 (`gated`) only with use_sliding_window, on
    layer_types' "sliding_attention" layers (by default those from max_window_layers on:
    configuration_qwen2.py __post_init__); Gemma 2 (`alternating`) on layer_types' sliding
    layers, by default every other one from the first (configuration_gemma2.py)."""
    window = r.value("sliding_window", default)
    types = r.value("layer_types", None)
    if gated:
        first = r.size("max_window_layers", 28)
        if not r.flag("use_sliding_window", False):
            window = None
        elif types is None:
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif alternating and types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if window is None:
        return max_seq
    if (gated or alternating) and not isinstance(types, list):
        raise MeshplanError(f"{r.where}: layer_types must be a list, got {shown(types)}")
    if (gated or alternating) and "sliding_attention" not in types:
        return max_seq
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MeshplanError(f"{r.where}: sliding_window must be a whole number >= 1 or null, got {shown(window)}")
    return min(max_seq, window)


def _llama_like(r: _Reader, d: dict, eps_key: str = "rms_norm_eps", act_key: str = "hidden_act") -> dict:
    """The keys Llama, Mistral, Qwen2/3, Gemma and Phi share; `d`: the family's defaults."""
    layers = r.size("num_hidden_layers", d["layers"])
    heads = r.size("num_attention_heads", d["heads"])
    hidden = r.size("hidden_size", d["hidden"])
    kv = r.size("num_key_value_heads", d["kv_heads"])
    head_dim = r.size("head_dim", d.get("head_dim"))
    max_seq = r.size("max_position_embeddings", d["max_seq"])
    # head_dim None: hidden / heads, which ModelConfig requires to divide (as LlamaConfig does)
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv or heads, head_dim=head_dim,
                ffn=r.size("intermediate_size", d["ffn"]), vocab=r.size("vocab_size", d["vocab"]),
                max_seq=max_seq, tie_embeddings=r.flag("tie_word_embeddings", d.get("tie", False)),
                norm_eps=r.number(eps_key, d.get("eps", 1e-6)),
                attention_dropout=r.number("attention_dropout", 0.0), dropout=0.0, embedding_dropout=0.0,
                activation=r.activation(act_key, d.get("act", "silu")))


def _gpt2(r: _Reader) -> dict:
    # configuration_gpt2.py: GPT2Config; attribute_map gives the Llama-style aliases
    hidden = r.size("n_embd", 768, "hidden_size")
    return dict(arch="gpt", layers=r.size("n_layer", 12, "num_hidden_layers"), hidden=hidden,
                heads=r.size("n_head", 12, "num_attention_heads"), vocab=r.size("vocab_size", 50257),
                max_seq=r.size("n_positions", 1024, "max_position_embeddings"),
                ffn=r.size("n_inner", None) or 4 * hidden, activation=r.activation("activation_function", "gelu_new"),
                norm_eps=r.number("layer_norm_epsilon", 1e-5), tie_embeddings=r.flag("tie_word_embeddings", True),
                dropout=r.number("resid_pdrop", 0.1), embedding_dropout=r.number("embd_pdrop", 0.1),
                attention_dropout=r.number("attn_pdrop", 0.1), qkv_bias=True, out_bias=True, mlp_bias=True)


def _llama(r: _Reader) -> dict:
    # configuration_llama.py: LlamaConfig; modeling_llama.py: attention_bias on q, k, v and o
    cfg = _llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=None, max_seq=2048, ffn=11008,
                          vocab=32000))
    bias = r.flag("attention_bias", False)
    return dict(arch="llama", **cfg, **r.rope(None), qkv_bias=bias, out_bias=bias, mlp_bias=r.flag("mlp_bias", False))


def _mistral(r: _Reader) -> dict:
    # configuration_mistral.py: MistralConfig (8 kv heads and a 4096-token window by default);
    # modeling_mistral.py: no biases, the window on every layer
    cfg = _llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=8, max_seq=4096 * 32, ffn=14336,
                          vocab=32000))
    r.value("layer_types")   # MistralModel ignores it (its config warns to use Ministral)
    cfg["max_seq"] = _window(r, cfg["max_seq"], cfg["layers"], 4096)
    return dict(arch="llama", **cfg, **r.rope(None), qkv_bias=False, out_bias=False, mlp_bias=False)


def _qwen(r: _Reader, model_type: str) -> dict:
    # configuration_qwen2.py / configuration_qwen3.py; modeling_qwen2.py: q, k, v biased, o not;
    # modeling_qwen3.py: attention_bias on q, k, v and o, and q_norm / k_norm
    qwen3 = model_type == "qwen3"
    cfg = _llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=32, max_seq=32768, ffn=22016,
                          vocab=151936, head_dim=128 if qwen3 else None))
    cfg["max_seq"] = _window(r, cfg["max_seq"], cfg["layers"], 4096, gated=True)
    bias = r.flag("attention_bias", False) if qwen3 else True
    return dict(arch="qwen3" if qwen3 else "llama", **cfg, **r.rope(None), qkv_bias=bias,
                out_bias=bias if qwen3 else False, mlp_bias=False)


def _gemma(r: _Reader) -> dict:
    # configuration_gemma.py: GemmaConfig ("gelu" there means the tanh approximation, its
    # __post_init__ says); modeling_gemma.py: attention_bias on q, k, v and o
    if r.data.get("hidden_act") == "gelu":
        r.data = {**r.data, "hidden_act": "gelu_pytorch_tanh"}
    r.value("hidden_activation")   # some Gemma configs carry it; transformers' Gemma reads hidden_act
    cfg = _llama_like(r, dict(layers=28, heads=16, hidden=3072, kv_heads=16, max_seq=8192, ffn=24576,
                          vocab=256000, head_dim=256, tie=True, act="gelu_pytorch_tanh"))
    bias = r.flag("attention_bias", False)
    return dict(arch="gemma", **cfg, **r.rope(None), qkv_bias=bias, out_bias=bias, mlp_bias=False)


def _gemma2(r: _Reader) -> dict:
    # configuration_gemma2.py: Gemma2Config; modeling_gemma2.py: Gemma's block with a norm after
    # each branch, eager attention (Gemma2PreTrainedModel._supports_sdpa is False) whose scores
    # are softcapped, softcapped logits, the window on every other layer
    cfg = _llama_like(r, dict(layers=26, heads=8, hidden=2304, kv_heads=4, max_seq=8192, ffn=9216, vocab=256000,
                          head_dim=256, tie=True, act="gelu_pytorch_tanh"), act_key="hidden_activation")
    r.value("hidden_act")   # some Gemma 2 configs carry it too; transformers' Gemma 2 reads hidden_activation
    cfg["max_seq"] = _window(r, cfg["max_seq"], cfg["layers"], 4096, alternating=True)
    # an explicit null turns a cap off (Gemma2Config's defaults are 50 and 30)
    caps = {"attention_softcap": r.data.get("attn_logit_softcapping", 50.0),
            "logit_softcap": r.data.get("final_logit_softcapping", 30.0)}
    r.read.update(("attn_logit_softcapping", "final_logit_softcapping"))
    bias = r.flag("attention_bias", False)
    return dict(arch="gemma2", **cfg, **r.rope(None), **caps, qkv_bias=bias, out_bias=bias, mlp_bias=False,
                attention="unfused" if caps["attention_softcap"] else "sdpa")


def _phi(r: _Reader) -> dict:
    # configuration_phi.py: PhiConfig (partial_rotary_factor 0.5 by default); modeling_phi.py:
    # biases everywhere, the lm_head's included; resid_pdrop on both branches, embd_pdrop
    cfg = _llama_like(r, dict(layers=24, heads=32, hidden=2048, kv_heads=None, max_seq=2048, ffn=8192,
                          vocab=51200, act="gelu_new", eps=1e-5), eps_key="layer_norm_eps")
    cfg.update(dropout=r.number("resid_pdrop", 0.0), embedding_dropout=r.number("embd_pdrop", 0.0))
    return dict(arch="phi", **cfg, **r.rope(0.5), qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=True)


def _phi3(r: _Reader) -> dict:
    # configuration_phi3.py: Phi3Config; modeling_phi3.py: no biases, resid_pdrop on both
    # branches, embd_pdrop unused, the window (None by default) on every layer
    cfg = _llama_like(r, dict(layers=32, heads=32, hidden=3072, kv_heads=None, max_seq=4096, ffn=8192,
                          vocab=32064, eps=1e-5))
    cfg.update(dropout=r.number("resid_pdrop", 0.0))
    r.value("embd_pdrop")   # Phi3Model never applies it
    cfg["max_seq"] = _window(r, cfg["max_seq"], cfg["layers"], None)
    return dict(arch="llama", **cfg, **r.rope(1.0), qkv_bias=False, out_bias=False, mlp_bias=False)


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "qwen2": lambda r: _qwen(r, "qwen2"),
            "qwen3": lambda r: _qwen(r, "qwen3"), "gemma": _gemma, "gemma2": _gemma2, "phi": _phi, "phi3": _phi3}


def is_hf_dict(data) -> bool:
    """A Hugging Face config (it has model_type; a meshplan config has arch)."""
    return isinstance(data, dict) and "model_type" in data


def config_from_hf(data: dict, name: str, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict (see the module docstring)."""
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise MeshplanError(f"{where}: model_type {shown(model_type)} is not a family meshplan models; "
                            f"supported: {', '.join(FAMILIES)}")
    reader = _Reader(dict(data), where)
    fields = FAMILIES[model_type](reader)
    reader.leftovers(model_type)
    return ModelConfig(**fields, name=name)


def read_hf_json(path: Path) -> dict | None:
    """The JSON object in `path` when it is a Hugging Face config, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if is_hf_dict(data) else None


# --- the local cache -------------------------------------------------------------------------

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_cache() -> Path:
    """The hub cache directory as huggingface_hub finds it (huggingface_hub/constants.py):
    HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, where HF_HOME
    defaults to $XDG_CACHE_HOME/huggingface and that to ~/.cache/huggingface."""
    home = os.getenv("HF_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                "huggingface")
    cache = os.getenv("HF_HUB_CACHE") or os.getenv("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def cached_config(repo_id: str) -> Path | None:
    """config.json of `repo_id`'s cached snapshot: the one refs/main names (as
    huggingface_hub.try_to_load_from_cache resolves it), else the only one; None when the
    cache has no such model."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file():
        path = snapshots / main.read_text().strip() / "config.json"
        return path if path.is_file() else None
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    if len(found) > 1:
        raise MeshplanError(f"the Hugging Face cache holds {len(found)} snapshots of {repo_id} and no refs/main: "
                            f"pass the path of the config.json you mean ({found[0].parent.parent})")
    return found[0] if found else None

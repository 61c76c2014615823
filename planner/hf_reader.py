"""Reading a Hugging Face config.json's keys as every family mapping does (planner.hf_config,
planner.hf_moe): a key's transformers default when the config leaves it out, its type checked,
and - once a family has read what it models - the keys left over accepted (FREE_KEYS: they
change nothing meshplan prices), refused in one line (REFUSED: they would change the cost in
ways meshplan cannot model), or refused as unknown."""
from __future__ import annotations

from cost_models.errors import MeshplanError
from cost_models.inputs import shown

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
    **dict.fromkeys(("num_experts", "num_local_experts"),
                    ((0,), "mixture-of-experts layers are modelled for model_type mixtral, qwen2_moe, qwen3_moe "
                           "and deepseek_v3 only")),
}
FREE_KEYS.update(dict.fromkeys(("is_decoder", "tie_encoder_decoder", "cross_attention_hidden_size"),
                               "encoder-decoder settings, unused by a decoder"))


class Reader:
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
            if key in self.read:   # the family maps it (the MoE families' expert counts)
                continue
            self.read.add(key)
            value = self.data.get(key)
            if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
                raise MeshplanError(f"{self.where}: {key} = {shown(value)} changes the cost and {why}; "
                                    f"remove it or use a model without it")
        unknown = sorted(k for k in self.data if k not in self.read and k not in FREE_KEYS)
        if unknown:
            raise MeshplanError(f"{self.where}: key(s) {unknown} of model_type {model_type!r} are not modelled and "
                                f"may change the cost; remove them if they do not (see docs/cli.md)")


def window_max_seq(r: Reader, max_seq: int, layers: int, default: int | None, gated: bool = False,
            alternating: bool = False, sliding=lambda i, bound: i >= bound) -> int:
    """max_seq under a sliding window (planner.hf_config says why) that some layer uses. Mistral
    and Phi-3 use it on every layer; Qwen2/3 (`gated`) only with use_sliding_window, on
    layer_types' "sliding_attention" layers (by default those from max_window_layers on:
    configuration_qwen2.py __post_init__; Qwen2-MoE's `sliding`: the even ones below it,
    configuration_qwen2_moe.py); Gemma 2 (`alternating`) on layer_types' sliding layers, by
    default every other one from the first (configuration_gemma2.py)."""
    window = r.value("sliding_window", default)
    types = r.value("layer_types", None)
    if gated:
        bound = r.size("max_window_layers", 28)
        if not r.flag("use_sliding_window", False):
            window = None
        elif types is None:
            types = ["sliding_attention" if sliding(i, bound) else "full_attention" for i in range(layers)]
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


def llama_like(r: Reader, d: dict, eps_key: str = "rms_norm_eps", act_key: str = "hidden_act") -> dict:
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

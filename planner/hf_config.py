"""A Hugging Face config.json as a meshplan ModelConfig, and a model's config.json found in the
local Hugging Face cache (never the network).

The mapping is written from transformers 5.25's configuration_<family>.py (the defaults of
a key a config leaves out) and modeling_<family>.py (what each key builds), per model_type:

- gpt2 -> gpt; llama, mistral, qwen2 and phi3 -> llama (Phi-3's fused qkv_proj and
  gate_up_proj are the same products as separate q, k, v and gate, up); qwen3 -> qwen3;
  gemma -> gemma; gemma2 -> gemma2 (its softcapped scores need unfused attention, as
  transformers runs it: eager); phi -> phi; mixtral, qwen2_moe, qwen3_moe and deepseek_v3
  -> moe (planner.hf_moe; DeepSeek-V3's MLA attention is approximated by grouped-query
  attention, as that module says).
- Every key that changes the model's cost or memory is carried into the ModelConfig:
  sizes, head_dim, kv heads, vocabulary, max positions, tied embeddings, norm epsilon,
  activation, biases, dropouts, rotary theta and partial rotary.
- A sliding attention window W that some layer uses is causal attention for any sequence
  of at most W tokens (transformers masking_utils.sliding_window_overlay: key j is seen
  from query i when i - j < W), so the model's max_seq becomes min(max positions, W): what
  meshplan plans is then exact, and a longer sequence is refused, not mispriced.
- Keys that change nothing meshplan prices are accepted and named in FREE_KEYS (with why);
  a key that would change the cost but that meshplan cannot model is refused in one line
  that names it (REFUSED and the per-family checks); any other key is refused as unknown
  (planner.hf_reader holds both lists and the reader every family mapping uses).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.inputs import shown
from planner.hf_moe import FAMILIES as MOE_FAMILIES
from planner.hf_reader import Reader, llama_like, window_max_seq
from planner.models import ModelConfig


def _gpt2(r: Reader) -> dict:
    # configuration_gpt2.py: GPT2Config; attribute_map gives the Llama-style aliases
    hidden = r.size("n_embd", 768, "hidden_size")
    return dict(arch="gpt", layers=r.size("n_layer", 12, "num_hidden_layers"), hidden=hidden,
                heads=r.size("n_head", 12, "num_attention_heads"), vocab=r.size("vocab_size", 50257),
                max_seq=r.size("n_positions", 1024, "max_position_embeddings"),
                ffn=r.size("n_inner", None) or 4 * hidden, activation=r.activation("activation_function", "gelu_new"),
                norm_eps=r.number("layer_norm_epsilon", 1e-5), tie_embeddings=r.flag("tie_word_embeddings", True),
                dropout=r.number("resid_pdrop", 0.1), embedding_dropout=r.number("embd_pdrop", 0.1),
                attention_dropout=r.number("attn_pdrop", 0.1), qkv_bias=True, out_bias=True, mlp_bias=True)


def _llama(r: Reader) -> dict:
    # configuration_llama.py: LlamaConfig; modeling_llama.py: attention_bias on q, k, v and o
    cfg = llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=None, max_seq=2048, ffn=11008,
                         vocab=32000))
    bias = r.flag("attention_bias", False)
    return dict(arch="llama", **cfg, **r.rope(None), qkv_bias=bias, out_bias=bias, mlp_bias=r.flag("mlp_bias", False))


def _mistral(r: Reader) -> dict:
    # configuration_mistral.py: MistralConfig (8 kv heads and a 4096-token window by default);
    # modeling_mistral.py: no biases, the window on every layer
    cfg = llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=8, max_seq=4096 * 32, ffn=14336,
                         vocab=32000))
    r.value("layer_types")   # MistralModel ignores it (its config warns to use Ministral)
    cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], 4096)
    return dict(arch="llama", **cfg, **r.rope(None), qkv_bias=False, out_bias=False, mlp_bias=False)


def _qwen(r: Reader, model_type: str) -> dict:
    # configuration_qwen2.py / configuration_qwen3.py; modeling_qwen2.py: q, k, v biased, o not;
    # modeling_qwen3.py: attention_bias on q, k, v and o, and q_norm / k_norm
    qwen3 = model_type == "qwen3"
    cfg = llama_like(r, dict(layers=32, heads=32, hidden=4096, kv_heads=32, max_seq=32768, ffn=22016,
                         vocab=151936, head_dim=128 if qwen3 else None))
    cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], 4096, gated=True)
    bias = r.flag("attention_bias", False) if qwen3 else True
    return dict(arch="qwen3" if qwen3 else "llama", **cfg, **r.rope(None), qkv_bias=bias,
                out_bias=bias if qwen3 else False, mlp_bias=False)


def _gemma(r: Reader) -> dict:
    # configuration_gemma.py: GemmaConfig ("gelu" there means the tanh approximation, its
    # __post_init__ says); modeling_gemma.py: attention_bias on q, k, v and o
    if r.data.get("hidden_act") == "gelu":
        r.data = {**r.data, "hidden_act": "gelu_pytorch_tanh"}
    r.value("hidden_activation")   # some Gemma configs carry it; transformers' Gemma reads hidden_act
    cfg = llama_like(r, dict(layers=28, heads=16, hidden=3072, kv_heads=16, max_seq=8192, ffn=24576,
                         vocab=256000, head_dim=256, tie=True, act="gelu_pytorch_tanh"))
    bias = r.flag("attention_bias", False)
    return dict(arch="gemma", **cfg, **r.rope(None), qkv_bias=bias, out_bias=bias, mlp_bias=False)


def _gemma2(r: Reader) -> dict:
    # configuration_gemma2.py: Gemma2Config; modeling_gemma2.py: Gemma's block with a norm after
    # each branch, eager attention (Gemma2PreTrainedModel._supports_sdpa is False) whose scores
    # are softcapped, softcapped logits, the window on every other layer
    cfg = llama_like(r, dict(layers=26, heads=8, hidden=2304, kv_heads=4, max_seq=8192, ffn=9216, vocab=256000,
                         head_dim=256, tie=True, act="gelu_pytorch_tanh"), act_key="hidden_activation")
    r.value("hidden_act")   # some Gemma 2 configs carry it too; transformers' Gemma 2 reads hidden_activation
    cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], 4096, alternating=True)
    # an explicit null turns a cap off (Gemma2Config's defaults are 50 and 30)
    caps = {"attention_softcap": r.data.get("attn_logit_softcapping", 50.0),
            "logit_softcap": r.data.get("final_logit_softcapping", 30.0)}
    r.read.update(("attn_logit_softcapping", "final_logit_softcapping"))
    bias = r.flag("attention_bias", False)
    return dict(arch="gemma2", **cfg, **r.rope(None), **caps, qkv_bias=bias, out_bias=bias, mlp_bias=False,
                attention="unfused" if caps["attention_softcap"] else "sdpa")


def _phi(r: Reader) -> dict:
    # configuration_phi.py: PhiConfig (partial_rotary_factor 0.5 by default); modeling_phi.py:
    # biases everywhere, the lm_head's included; resid_pdrop on both branches, embd_pdrop
    cfg = llama_like(r, dict(layers=24, heads=32, hidden=2048, kv_heads=None, max_seq=2048, ffn=8192,
                         vocab=51200, act="gelu_new", eps=1e-5), eps_key="layer_norm_eps")
    cfg.update(dropout=r.number("resid_pdrop", 0.0), embedding_dropout=r.number("embd_pdrop", 0.0))
    return dict(arch="phi", **cfg, **r.rope(0.5), qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=True)


def _phi3(r: Reader) -> dict:
    # configuration_phi3.py: Phi3Config; modeling_phi3.py: no biases, resid_pdrop on both
    # branches, embd_pdrop unused, the window (None by default) on every layer
    cfg = llama_like(r, dict(layers=32, heads=32, hidden=3072, kv_heads=None, max_seq=4096, ffn=8192,
                         vocab=32064, eps=1e-5))
    cfg.update(dropout=r.number("resid_pdrop", 0.0))
    r.value("embd_pdrop")   # Phi3Model never applies it
    cfg["max_seq"] = window_max_seq(r, cfg["max_seq"], cfg["layers"], None)
    return dict(arch="llama", **cfg, **r.rope(1.0), qkv_bias=False, out_bias=False, mlp_bias=False)


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "qwen2": lambda r: _qwen(r, "qwen2"),
            "qwen3": lambda r: _qwen(r, "qwen3"), "gemma": _gemma, "gemma2": _gemma2, "phi": _phi, "phi3": _phi3,
            **MOE_FAMILIES}


def is_hf_dict(data) -> bool:
    """A Hugging Face config (it has model_type; a meshplan config has arch)."""
    return isinstance(data, dict) and "model_type" in data


def config_from_hf(data: dict, name: str, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict (see the module docstring)."""
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise MeshplanError(f"{where}: model_type {shown(model_type)} is not a family meshplan models; "
                            f"supported: {', '.join(FAMILIES)}")
    reader = Reader(dict(data), where)
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

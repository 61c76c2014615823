"""Named model presets, and `--model` resolution: preset, JSON config (meshplan's or Hugging
Face's), model directory, model in the local Hugging Face cache, or file.py:factory.

Preset sizes come from the papers: GPT-2 (Radford et al. 2019), GPT-3 Table 2.1
(Brown et al. 2020; vocab padded to 51200 as in Megatron-LM's tables), Llama 2
(Touvron et al. 2023) and Llama 3 (Dubey et al. 2024), and Megatron-LM's weak-scaling
models (Narayanan et al. SC21 Table 1, shared/reference/megatron_sc21_table1.json).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cost_models.errors import MeshplanError
from cost_models.inputs import parse_json, read_text, shown
from planner.hf_config import REPO_ID, cached_config, config_from_hf, hub_cache, is_hf_dict
from planner.models import Decoder, ModelConfig


def _gpt(name, layers, hidden, heads, vocab=51200, max_seq=2048, **kw):
    return ModelConfig("gpt", layers, hidden, heads, vocab, max_seq=max_seq, name=name, **kw)


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, max_seq, rope_theta):
    return ModelConfig("llama", layers, hidden, heads, vocab, kv_heads=kv_heads, ffn=ffn,
                       max_seq=max_seq, rope_theta=rope_theta, name=name)


_PRESETS = [
    # A model small enough to train for real on CPU ranks in tests and demos.
    _gpt("gpt-tiny", 4, 64, 4, vocab=256, max_seq=128),
    _llama("llama-tiny", 4, 64, 4, 2, 192, 256, 128, 10000.0),
    # ... and a Mixture-of-Experts one: a dense first block, then 4 routed experts (top 2) and a shared one.
    ModelConfig("moe", 4, 64, 4, 256, kv_heads=2, ffn=192, max_seq=128, experts=4, top_k=2, expert_ffn=64,
                shared_experts=1, dense_layers=1, name="moe-tiny"),
    _gpt("gpt2-124m", 12, 768, 12, vocab=50257, max_seq=1024),
    _gpt("gpt2-350m", 24, 1024, 16, vocab=50257, max_seq=1024),
    _gpt("gpt2-774m", 36, 1280, 20, vocab=50257, max_seq=1024),
    _gpt("gpt2-1.5b", 48, 1600, 25, vocab=50257, max_seq=1024),
    _gpt("gpt3-125m", 12, 768, 12),
    _gpt("gpt3-350m", 24, 1024, 16),
    _gpt("gpt3-760m", 24, 1536, 16),
    # The paper lists 24 heads for 1.3B but a 128 head size, which needs 16 heads.
    _gpt("gpt3-1.3b", 24, 2048, 16),
    _gpt("gpt3-2.7b", 32, 2560, 32),
    _gpt("gpt3-6.7b", 32, 4096, 32),
    # The paper's d_model 5140 is not a multiple of its 40 heads; 5120 is what is trained.
    _gpt("gpt3-13b", 40, 5120, 40),
    _gpt("gpt3-175b", 96, 12288, 96),
    _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0),
    _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10000.0),
    _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10000.0),
    _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0),
    _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0),
    # 405B was released as Llama 3.1, trained to 128K tokens (Llama 3 paper Sec. 3.4.2; its
    # config.json: max_position_embeddings 131072)
    _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 131072, 500000.0),
    # Megatron-LM weak-scaling table (seq 2048, vocab 51200).
    _gpt("megatron-1.7b", 24, 2304, 24),
    _gpt("megatron-3.6b", 30, 3072, 32),
    _gpt("megatron-7.5b", 36, 4096, 32),
    _gpt("megatron-18b", 40, 6144, 48),
    _gpt("megatron-39b", 48, 8192, 64),
    _gpt("megatron-76b", 60, 10240, 80),
    _gpt("megatron-145b", 80, 12288, 96),
    _gpt("megatron-310b", 96, 16384, 128),
    _gpt("megatron-530b", 105, 20480, 128),
    _gpt("megatron-1t", 128, 25600, 160),
    # Mixture-of-Experts, sizes from each model's config.json on the Hugging Face Hub (the
    # defaults of transformers' configuration_<family>.py where they match):
    # mistralai/Mixtral-8x7B-v0.1 (46.7B total, 12.9B active: Mistral's announcement).
    ModelConfig("moe", 32, 4096, 32, 32000, kv_heads=8, ffn=14336, max_seq=32768, rope_theta=1e6, norm_eps=1e-5,
                experts=8, top_k=2, name="mixtral-8x7b"),
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (30.5B / 3.3B and 235B / 22B: their model
    # cards): 128 experts, top 8 renormalised (norm_topk_prob), Qwen3's q/k head norms, no
    # shared expert; `ffn` is intermediate_size, which no block uses (mlp_only_layers is []).
    ModelConfig("moe", 48, 2048, 32, 151936, kv_heads=4, head_dim=128, ffn=6144, max_seq=40960, rope_theta=1e6,
                norm_eps=1e-6, experts=128, top_k=8, expert_ffn=768, qk_norm=True, name="qwen3-30b-a3b"),
    ModelConfig("moe", 94, 4096, 64, 151936, kv_heads=4, head_dim=128, ffn=12288, max_seq=40960, rope_theta=1e6,
                norm_eps=1e-6, experts=128, top_k=8, expert_ffn=1536, qk_norm=True, name="qwen3-235b-a22b"),
    # openai/gpt-oss-120b's shape (116.8B total, 5.1B active without the embedding: its model
    # card): biased attention, 128 experts top 4 (softmax over the 4 chosen logits is softmax
    # then renormalised). Not modelled: attention sinks (64 logits per block), the 128-token
    # sliding window on every other block (here all 36 attend causally over the whole
    # sequence, which overprices those 18 blocks' attention at long sequences), the clamped
    # SwiGLU (x * sigmoid(1.702 x) with limits, times up + 1: a few more element-wise ops), and
    # the router's and experts' biases (40M of 117B parameters).
    ModelConfig("moe", 36, 2880, 64, 201088, kv_heads=8, head_dim=64, ffn=2880, max_seq=131072, rope_theta=150000.0,
                norm_eps=1e-5, qkv_bias=True, out_bias=True, experts=128, top_k=4, name="gpt-oss-120b"),
    # deepseek-ai/DeepSeek-V3's shape (671B total, 37B active without the embedding: its
    # report): 3 dense blocks, then 256 experts top 8 by sigmoid scores and 1 shared expert.
    # Its attention is grouped-query in place of MLA (multi-head latent attention): 128 query
    # and 128 key/value heads of head_dim 64 (DeepseekV3Config's head_dim, qk_rope_head_dim).
    # Those projections hold 235M parameters per block where MLA's low-rank ones hold 187M
    # (674B in all, not 671B); at seq 4096 a token's causal attention FLOPs (projections and
    # core) come within 1% of MLA's. The group-limited routing (a token's 8 experts from 4 of 8
    # groups), the routing bias and the 2.5 scale on the weights change which experts and how
    # much, not what it costs; the multi-token-prediction module (14B) is not part of it.
    ModelConfig("moe", 61, 7168, 128, 129280, kv_heads=128, head_dim=64, ffn=18432, max_seq=163840, norm_eps=1e-6,
                experts=256, top_k=8, expert_ffn=2048, shared_experts=1, dense_layers=3, dense_ffn=18432,
                router="sigmoid", name="deepseek-v3"),
]
PRESETS: dict[str, ModelConfig] = {c.name: c for c in _PRESETS}


@dataclass
class ModelSpec:
    """What `--model` named: a zoo config, or a user factory returning any nn.Module."""

    name: str
    config: ModelConfig | None = None
    factory: Callable[[], nn.Module] | None = None

    def build(self, device: str | torch.device = "meta") -> nn.Module:
        """Build the module; on the meta device this allocates no parameter memory."""
        if self.config is not None:
            return Decoder(self.config, device=device)
        try:
            with torch.device(device):
                model = self.factory()
        except Exception as exc:  # the user's factory: any error in it is theirs to fix
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise MeshplanError(f"model factory {self.name!r} failed: {type(exc).__name__}"
                                + (f": {first}" if first else "")
                                + (" (it is called with no arguments)" if isinstance(exc, TypeError) else "")) from None
        if not isinstance(model, nn.Module):
            raise MeshplanError(f"model factory {self.name!r} returned {type(model).__name__}, not an nn.Module")
        return model


def load_model(text: str | dict) -> ModelSpec:
    """Resolve a preset name, a JSON config path (meshplan's or a Hugging Face config.json), a
    model directory holding a config.json, the name of a model in the local Hugging Face cache
    (planner.hf_config), an inline config dict (either kind), or `file.py:factory` (a
    ModelSpec or ModelConfig is taken as it is)."""
    if isinstance(text, ModelSpec):
        return text
    if isinstance(text, ModelConfig):
        return ModelSpec(text.name, text)
    if isinstance(text, dict):
        if is_hf_dict(text):
            config = config_from_hf(text, f"hf-{text['model_type']}", "inline Hugging Face config")
        else:
            config = ModelConfig.from_dict(text, "inline model config")
        return ModelSpec(config.name, config)
    if not isinstance(text, (str, Path)):
        raise MeshplanError(f"a model is a preset name, a .json path, file.py:factory or a config dict, "
                            f"not {shown(text)}")
    text = str(text).strip()
    if text.lower() in PRESETS:
        return ModelSpec(text.lower(), PRESETS[text.lower()])
    if ".py:" in text:
        return _factory_model(text)
    if text.lower().endswith(".json"):
        return _json_model(Path(text))
    if text and Path(text).is_dir():
        if not (Path(text) / "config.json").is_file():
            raise MeshplanError(f"model directory {text!r} holds no config.json")
        return _json_model(Path(text) / "config.json")
    cached = cached_config(text) if REPO_ID.match(text) else None
    if cached is not None:
        return _json_model(cached, name=text)
    if "/" in text and REPO_ID.match(text):
        raise MeshplanError(f"model {text!r} is not in the local Hugging Face cache ({hub_cache()}) and meshplan "
                            f"never downloads: pass the path of its config.json")
    raise MeshplanError(
        f"unknown model {text!r}: use a preset ({', '.join(PRESETS)}), a .json config, a model directory, "
        f"a model in the local Hugging Face cache, or file.py:factory")


def _json_model(path: Path, name: str | None = None) -> ModelSpec:
    """A meshplan config, or a Hugging Face config.json (it has model_type), named after its
    file - or its directory, for a config.json - unless `name` is given."""
    data = parse_json(read_text(path, "model config"), f"model config {str(path)!r}")
    if not isinstance(data, dict):
        raise MeshplanError(f"model config {str(path)!r} must be a JSON object")
    default_name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    if is_hf_dict(data):
        config = config_from_hf(data, name or default_name, f"Hugging Face config {str(path)!r}")
        return ModelSpec(config.name, config)
    data.setdefault("name", name or path.stem)
    config = ModelConfig.from_dict(data, str(path))
    return ModelSpec(config.name, config)


def _factory_model(text: str) -> ModelSpec:
    file_part, _, func_name = text.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise MeshplanError(f"model file {file_part!r} does not exist")
    module_name = f"meshplan_user_model_{abs(hash(str(path.resolve())))}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error in it is theirs to fix
        raise MeshplanError(f"importing {file_part!r} failed: {type(exc).__name__}: {exc}")
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise MeshplanError(f"{file_part!r} has no callable {func_name!r}")
    return ModelSpec(f"{path.stem}:{func_name}", factory=factory)

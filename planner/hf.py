"""Hugging Face decoders from a config alone: no weights, no network, built on the meta device.

`transformers` is optional: everything here imports it lazily and turns its absence into a
one-line `MeshplanError`. A config is a dict (as in a model repository's config.json, with
`model_type`), a path to such a JSON file, or a directory holding `config.json`.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from cost_models.errors import MeshplanError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MeshplanError("Hugging Face configs need the transformers package: pip install transformers")
    transformers.logging.set_verbosity_error()  # config sanity warnings are noise for a cost model
    return transformers


def _config_path(text: str | Path) -> Path | None:
    path = Path(text)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.suffix.lower() == ".json" and path.is_file():
        return path
    return None


def is_hf_config(obj) -> bool:
    """True for a dict with `model_type`, or a JSON path / directory whose config has one.

    That key is what tells a Hugging Face config from a meshplan zoo config (`arch`)."""
    if isinstance(obj, dict):
        return "model_type" in obj
    if isinstance(obj, (str, Path)):
        path = _config_path(obj)
        if path is None:
            return False
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and "model_type" in data
    return False


def is_hf_model(module: nn.Module) -> bool:
    """A `transformers.PreTrainedModel`, checked without importing transformers."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def load_hf_config(config):
    """A `PretrainedConfig` from a dict, a config.json path or a model directory."""
    transformers = _transformers()
    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, (str, Path)):
        path = _config_path(config)
        if path is None:
            raise MeshplanError(f"Hugging Face config {str(config)!r} is neither a .json file nor a directory with config.json")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MeshplanError(f"Hugging Face config {str(path)!r} is not valid JSON: {str(exc).splitlines()[0]}")
    if not isinstance(config, dict) or "model_type" not in config:
        raise MeshplanError("a Hugging Face config must be a JSON object with a model_type")
    data = dict(config)
    model_type = data.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise MeshplanError(f"Hugging Face config of model_type {model_type!r} was rejected: {str(exc).splitlines()[0]}")


def hf_model_from_config(config, device: str | torch.device = "meta") -> nn.Module:
    """The causal-LM model a config describes, with fp32 parameters on `device` (meta:
    no memory), SDPA attention (what a training run uses; eager attention for a model that
    has no SDPA path, as Gemma 2 for its score softcapping) and no KV cache."""
    transformers = _transformers()
    cfg = load_hf_config(config)
    cfg.use_cache = False
    model_class = transformers.AutoModelForCausalLM._model_mapping.get(type(cfg), None)
    attention = "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                cfg, attn_implementation=attention, dtype=torch.float32)
    except ValueError as exc:
        raise MeshplanError(f"transformers cannot build a causal LM from this config "
                            f"(model_type {cfg.model_type!r}): {str(exc).splitlines()[0]}")
    model.train()
    return model


def hf_max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when the config says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def hf_model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"hf-{getattr(cfg, 'model_type', type(model).__name__)}"


@contextlib.contextmanager
def eager_masks(model: nn.Module):
    """Make a Hugging Face model build the attention masks an eager training step builds.

    HF treats FakeTensor and meta inputs as "tracing" and then assumes the position ids
    may be packed sequences, materialising a (B, 1, T, T) mask and calling SDPA with it
    instead of `is_causal=True`. Our example inputs are unpacked sequences, for which an
    eager step finds no packing (the check reads tensor values, so cannot run on fake
    tensors); we answer that check with "no packing". No-op for other models."""
    utils = sys.modules.get("transformers.masking_utils") if is_hf_model(model) else None
    original = getattr(utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        utils.find_packed_sequence_indices = original

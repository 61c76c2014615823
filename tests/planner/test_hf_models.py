"""A Hugging Face config planned as meshplan's own model is transformers' model: for each family
the meshplan model built from the config has transformers' parameter count and forward FLOPs
(both built on the meta device from the same dict), and with transformers' weights copied in
it computes the same logits."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fixtures.hf_configs import SMALL, write_config
from planner.hf import eager_masks, hf_model_from_config
from planner.models import count_parameters
from planner.zoo import load_model

pytest.importorskip("transformers")

FAMILIES = sorted(SMALL)


def _forward_flops(model, call) -> int:
    with eager_masks(model), FlopCounterMode(display=False) as counter:
        call(model)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_and_forward_flops_match_transformers(tmp_path, family):
    data, arch = SMALL[family]
    spec = load_model(str(write_config(tmp_path / family, data)))
    assert spec.config.arch == arch and spec.name == family
    ours, theirs = spec.build("meta"), hf_model_from_config(data, device="meta")
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    ours_flops = _forward_flops(ours, lambda m: m(ids, ids))
    theirs_flops = _forward_flops(theirs, lambda m: m(input_ids=ids, labels=ids, use_cache=False))
    assert ours_flops == theirs_flops > 0


# transformers' parameter names -> ours (after "model." / "transformer." is dropped)
_RENAMES = [
    (r"^(embed_tokens|wte)\.", "tok."), (r"^wpe\.", "pos."), (r"^(norm|final_layernorm|ln_f)\.", "norm."),
    (r"^lm_head\.", "head."), (r"^(layers|h)\.(\d+)\.", r"blocks.\2."),
    (r"\.input_layernorm\.", ".n1."), (r"\.post_attention_layernorm\.", ".n2."),
    (r"\.self_attn\.(q|k|v|o)_proj\.", r".\1."), (r"\.self_attn\.(q_norm|k_norm)\.", r".\1."),
    (r"\.self_attn\.dense\.", ".dense."), (r"\.mlp\.(gate|up|down)_proj\.", r".\1."),
    (r"\.mlp\.fc1\.", ".fc_in."), (r"\.mlp\.fc2\.", ".fc_out."),
    (r"\.ln_1\.", ".ln1."), (r"\.ln_2\.", ".ln2."),
]


def _ours(hf_state: dict, cfg) -> dict:
    """transformers' state dict in meshplan's names and layouts (Phi's shared norm is `ln`,
    Gemma 2's branch-output norms post_attn and post_mlp;
    GPT-2's Conv1D weights are transposed and its fused QKV regrouped per head; Phi-3's fused
    qkv_proj and gate_up_proj split)."""
    out = {}
    for name, value in hf_state.items():
        name = re.sub(r"^(model|transformer)\.", "", name)
        if cfg.arch == "gemma2":   # its post_attention_layernorm normalises the attention's output
            name = (name.replace(".post_attention_layernorm.", ".post_attn.")
                    .replace(".pre_feedforward_layernorm.", ".n2.").replace(".post_feedforward_layernorm.", ".post_mlp."))
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        if cfg.arch == "phi":
            name = name.replace(".n1.", ".ln.")
        if ".self_attn.qkv_proj." in name:   # Phi-3: [q; k; v] rows
            q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
            for part, rows in zip("qkv", value.split([q, kv, kv])):
                out[name.replace("self_attn.qkv_proj", part)] = rows
            continue
        if ".mlp.gate_up_proj." in name:     # Phi-3: [gate; up] rows
            for part, rows in zip(("gate", "up"), value.chunk(2)):
                out[name.replace("mlp.gate_up_proj", part)] = rows
            continue
        if ".attn.c_attn." in name or ".attn.c_proj." in name or ".mlp.c_" in name:   # GPT-2's Conv1D
            value = value.t() if value.dim() == 2 else value
            if ".c_attn." in name:   # [q | k | v] over all heads -> [q_h; k_h; v_h] per head
                value = torch.stack(value.split(cfg.head_dim * cfg.heads)).unflatten(1, (cfg.heads, cfg.head_dim))
                value = value.transpose(0, 1).flatten(0, 2)
            name = (name.replace(".attn.c_attn.", ".qkv.").replace(".attn.c_proj.", ".proj.")
                    .replace(".mlp.c_fc.", ".fc1.").replace(".mlp.c_proj.", ".fc2."))
        out[name] = value
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_same_weights_give_the_same_logits(tmp_path, family):
    data, _ = SMALL[family]
    torch.manual_seed(0)
    theirs = hf_model_from_config(data, device="cpu").eval()
    with torch.no_grad():   # Gemma's norms start at zero and its biases are zero: make every weight count
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spec = load_model(str(write_config(tmp_path / family, data)))
    ours = spec.build("cpu").eval()
    missing, unexpected = ours.load_state_dict(_ours(theirs.state_dict(), spec.config), strict=False)
    assert not unexpected and set(missing) <= {"head.weight"} and (not missing or spec.config.tie_embeddings)
    ids = torch.randint(0, spec.config.vocab, (2, 24))
    with torch.no_grad():
        expected = theirs(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-5)

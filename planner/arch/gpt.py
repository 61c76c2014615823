"""GPT-2/3 (Radford et al. 2019; Brown et al. 2020): learned positions, pre-LayerNorm, GELU
MLP (GPT-2 uses its tanh approximation), biases, tied embeddings by default. The fused QKV weight is laid out per head
([q_h; k_h; v_h] for each head h, as in Megatron-LM), so a column shard holds whole heads."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from planner.arch.base import Architecture, register
from planner.arch.layers import ACTIVATIONS, WHOLE_SEQUENCE, attention_core, dropped


class GPTBlock(nn.Module):
    def __init__(self, cfg, device=None):
        super().__init__()
        h, inner = cfg.hidden, cfg.heads * cfg.head_dim
        self.head_dim, self.act = cfg.head_dim, ACTIVATIONS[cfg.activation]
        self.attention, self.dropout, self.attention_dropout = cfg.attention, cfg.dropout, cfg.attention_dropout
        self.recompute_attention = False   # set by runtime.parallelize.apply_checkpointing
        self.sequence = WHOLE_SEQUENCE     # runtime.context_parallel sets this rank's chunks
        self.ln1 = nn.LayerNorm(h, eps=cfg.norm_eps, device=device)
        self.qkv = nn.Linear(h, 3 * inner, bias=cfg.qkv_bias, device=device)
        self.proj = nn.Linear(inner, h, bias=cfg.out_bias, device=device)
        self.ln2 = nn.LayerNorm(h, eps=cfg.norm_eps, device=device)
        self.fc1 = nn.Linear(h, cfg.ffn, bias=cfg.mlp_bias, device=device)
        self.fc2 = nn.Linear(cfg.ffn, h, bias=cfg.mlp_bias, device=device)

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, -1, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        y = attention_core(self, q, k, v)
        x = x + dropped(self.proj(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)
        return x + dropped(self.fc2(self.act(self.fc1(self.ln2(x)))), self.dropout, self.training)


GPT = register(Architecture(
    name="gpt", block=GPTBlock, final_norm=nn.LayerNorm,
    block_roles={"ln1": "norm", "qkv": "in", "proj": "out", "ln2": "norm", "fc1": "in", "fc2": "out"},
    regions=(("attention", ("qkv",), "proj"), ("mlp", ("fc1",), "fc2")),
    region_norms={"attention": "ln1", "mlp": "ln2"},
    default_ffn=lambda hidden: 4 * hidden,
    learned_positions=True, ties_embeddings=True, grouped_query=False, even_head_dim=False,
    activation="gelu", biases=True,
    # transformers' GPT2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (both c_proj are "out")
    hf_names={"c_attn": "qkv", "c_proj": "proj", "c_fc": "fc1", "wte": "tok", "wpe": "pos", "lm_head": "head"},
))

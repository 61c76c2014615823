"""Llama 2/3 (Touvron et al. 2023; Dubey et al. 2024): RMSNorm, rotary positions, SwiGLU MLP,
no biases, grouped-query attention."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from planner.arch.base import Architecture, register
from planner.arch.layers import attention_core, dropped


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of a (B, heads, T, D) tensor by position."""
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, cfg, device=None):
        super().__init__()
        h, hd, kw = cfg.hidden, cfg.head_dim, dict(bias=False, device=device)
        self.head_dim, self.rope_theta = hd, cfg.rope_theta
        self.attention, self.dropout = cfg.attention, cfg.dropout
        self.recompute_attention = False   # set by runtime.parallelize.apply_checkpointing
        self.n1 = nn.RMSNorm(h, eps=cfg.norm_eps, device=device)
        self.q = nn.Linear(h, h, **kw)
        self.k = nn.Linear(h, cfg.kv_heads * hd, **kw)
        self.v = nn.Linear(h, cfg.kv_heads * hd, **kw)
        self.o = nn.Linear(h, h, **kw)
        self.n2 = nn.RMSNorm(h, eps=cfg.norm_eps, device=device)
        self.gate = nn.Linear(h, cfg.ffn, **kw)
        self.up = nn.Linear(h, cfg.ffn, **kw)
        self.down = nn.Linear(cfg.ffn, h, **kw)

    def forward(self, x):
        B, T, _ = x.shape
        y = self.n1(x)
        q = rotary(self.q(y).view(B, T, -1, self.head_dim).transpose(1, 2), self.rope_theta)
        k = rotary(self.k(y).view(B, T, -1, self.head_dim).transpose(1, 2), self.rope_theta)
        v = self.v(y).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = attention_core(self, q, k, v)
        x = x + dropped(self.o(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)
        y = self.n2(x)
        return x + dropped(self.down(F.silu(self.gate(y)) * self.up(y)), self.dropout, self.training)


def llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 256."""
    ffn = int(2 * 4 * hidden / 3)
    return multiple_of * math.ceil(ffn / multiple_of)


LLAMA = register(Architecture(
    name="llama", block=LlamaBlock, final_norm=nn.RMSNorm,
    block_roles={"n1": "norm", "q": "in", "k": "in", "v": "in", "o": "out",
                 "n2": "norm", "gate": "in", "up": "in", "down": "out"},
    regions=(("attention", ("q", "k", "v"), "o"), ("mlp", ("gate", "up"), "down")),
    region_norms={"attention": "n1", "mlp": "n2"},
    default_ffn=llama_ffn,
    learned_positions=False, ties_embeddings=False, grouped_query=True, even_head_dim=True,
    # transformers' Llama/Mistral/Qwen2 module names
    hf_names={"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
              "up_proj": "up", "down_proj": "down", "embed_tokens": "tok", "lm_head": "head"},
))

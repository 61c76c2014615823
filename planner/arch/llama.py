"""Llama 2/3 (Touvron et al. 2023; Dubey et al. 2024): RMSNorm, rotary positions, SwiGLU MLP,
no biases, grouped-query attention."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from planner.arch.base import Architecture, register
from planner.arch.layers import ACTIVATIONS, WHOLE_SEQUENCE, attention_core, dropped


def rotary(x: torch.Tensor, theta: float, dims: int | None = None, positions: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:d]) of a (B, heads, T, D) tensor by position,
    over its first d = `dims` (default D) dimensions; the rest pass through (partial rotary,
    as Hugging Face's Phi applies it: transformers models/phi/modeling_phi.py). `positions`:
    the T tokens' float32 positions (default 0..T-1)."""
    T, D = x.shape[-2], x.shape[-1]
    d = D if dims is None else dims
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    if positions is None:
        positions = torch.arange(T, device=x.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if d == D:
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2: d]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., d:]), dim=-1)


class RotaryBlock(nn.Module):
    """What the rotary families' blocks share: their settings, and the q, k, v projections
    rotated by position (Llama's, Qwen3's, Gemma's and Phi's blocks)."""

    def _attention_inputs(self, cfg, device):
        h, hd = cfg.hidden, cfg.head_dim
        self.head_dim, self.rope_theta, self.rotary_dims = hd, cfg.rope_theta, cfg.rotary_dims
        self.act = ACTIVATIONS[cfg.activation]
        self.attention, self.dropout, self.attention_dropout = cfg.attention, cfg.dropout, cfg.attention_dropout
        self.recompute_attention = False   # set by runtime.parallelize.apply_checkpointing
        self.sequence = WHOLE_SEQUENCE     # runtime.context_parallel sets this rank's chunks
        self.q = nn.Linear(h, cfg.heads * hd, bias=cfg.qkv_bias, device=device)
        self.k = nn.Linear(h, cfg.kv_heads * hd, bias=cfg.qkv_bias, device=device)
        self.v = nn.Linear(h, cfg.kv_heads * hd, bias=cfg.qkv_bias, device=device)

    def heads(self, y, B: int, T: int):
        """(q, k, v) as (B, heads, T, head_dim), q and k rotated."""
        q = self.q(y).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k(y).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v(y).view(B, T, -1, self.head_dim).transpose(1, 2)
        return self.rotate(q), self.rotate(k), v

    def rotate(self, x):
        positions = self.sequence.positions(x.shape[-2], x.device, torch.float32)
        return rotary(x, self.rope_theta, None if self.rotary_dims == self.head_dim else self.rotary_dims, positions)


class LlamaBlock(RotaryBlock):
    """Also the block of Mistral, Qwen2 and Phi-3 (the configs planner.hf_config maps onto it):
    their differences are sizes, biases, activation and partial rotary, all in the config."""

    norm_class = nn.RMSNorm

    def __init__(self, cfg, device=None):
        super().__init__()
        h = cfg.hidden
        self.n1 = self.norm_class(h, eps=cfg.norm_eps, device=device)
        self._attention_inputs(cfg, device)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, h, bias=cfg.out_bias, device=device)
        self.n2 = self.norm_class(h, eps=cfg.norm_eps, device=device)
        self.gate = nn.Linear(h, cfg.ffn, bias=cfg.mlp_bias, device=device)
        self.up = nn.Linear(h, cfg.ffn, bias=cfg.mlp_bias, device=device)
        self.down = nn.Linear(cfg.ffn, h, bias=cfg.mlp_bias, device=device)

    def forward(self, x):
        B, T, _ = x.shape
        y = attention_core(self, *self.heads(self.n1(x), B, T))
        x = x + dropped(self.o(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)
        y = self.n2(x)
        return x + dropped(self.down(self.act(self.gate(y)) * self.up(y)), self.dropout, self.training)


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
    activation="silu", biases=False,
    # transformers' Llama/Mistral/Qwen2 module names
    hf_names={"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
              "up_proj": "up", "down_proj": "down", "embed_tokens": "tok", "lm_head": "head"},
))

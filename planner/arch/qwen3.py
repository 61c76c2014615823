"""Qwen3 (Qwen Team 2025): Llama's block with an RMSNorm over each head of the queries and
keys, between their projections and the rotary embedding (transformers
models/qwen3/modeling_qwen3.py, Qwen3Attention.forward), and head_dim set apart from
hidden / heads."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from planner.arch.base import Architecture, register
from planner.arch.llama import LLAMA, LlamaBlock


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over head_dim in its input's dtype. Under autocast the projections hand it bf16
    while its weight stays fp32, and torch runs mixed dtypes unfused ("Mismatch dtype between
    input and weight"); the weight cast keeps the one fused kernel the tracer prices."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Qwen3Block(LlamaBlock):
    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        # per head: one weight of head_dim shared by all heads (Qwen3RMSNorm(head_dim))
        self.q_norm = HeadRMSNorm(cfg.head_dim, eps=cfg.norm_eps, device=device)
        self.k_norm = HeadRMSNorm(cfg.head_dim, eps=cfg.norm_eps, device=device)

    def heads(self, y, B: int, T: int):
        return normed_heads(self, y, B, T)


def normed_heads(block, y, B: int, T: int):
    """RotaryBlock.heads with each head of q and k normalised by `block.q_norm` and
    `block.k_norm` before the rotation (also the MoE family's with qk_norm)."""
    q = block.q_norm(block.q(y).view(B, T, -1, block.head_dim)).transpose(1, 2)
    k = block.k_norm(block.k(y).view(B, T, -1, block.head_dim)).transpose(1, 2)
    v = block.v(y).view(B, T, -1, block.head_dim).transpose(1, 2)
    return block.rotate(q), block.rotate(k), v


QWEN3 = register(Architecture(**{
    **LLAMA.__dict__, "name": "qwen3", "block": Qwen3Block,
    "block_roles": {"n1": "norm", "q": "in", "k": "in", "v": "in", "q_norm": "norm", "k_norm": "norm", "o": "out",
                    "n2": "norm", "gate": "in", "up": "in", "down": "out"},
    "head_norms": {"q_norm": "q", "k_norm": "k"},
    "hf_names": {},   # Llama's (q_proj, ...) already name these roles; q_norm/k_norm keep their names
}))

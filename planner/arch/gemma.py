"""Gemma (Gemma Team 2024): Llama's block with a GeGLU MLP (GELU's tanh approximation on the
gate), an RMSNorm that scales by 1 + w, head_dim set apart from hidden / heads, the token
embedding multiplied by sqrt(hidden), and tied embeddings (transformers
models/gemma/modeling_gemma.py: GemmaRMSNorm, GemmaTextScaledWordEmbedding, GemmaMLP)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from planner.arch.base import Architecture, register
from planner.arch.llama import LLAMA, LlamaBlock


class GemmaRMSNorm(nn.Module):
    """RMSNorm with the scale stored as w - 1 (starting at 0), computed in fp32 and cast back,
    as GemmaRMSNorm does: one fused RMSNorm whose weight is 1 + w."""

    initial_weight = 0.0   # planner.models.Decoder.init_weights: the scale 1 + w starts at 1

    def __init__(self, hidden: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden, device=device))

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).type_as(x)


class GemmaBlock(LlamaBlock):
    norm_class = GemmaRMSNorm


GEMMA = register(Architecture(**{
    **LLAMA.__dict__, "name": "gemma", "block": GemmaBlock, "final_norm": GemmaRMSNorm,
    "ties_embeddings": True, "activation": "gelu_tanh", "scales_embedding": True, "hf_names": {},
}))

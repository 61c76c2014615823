"""Gemma (Gemma Team 2024): Llama's block with a GeGLU MLP (GELU's tanh approximation on the
gate), an RMSNorm that scales by 1 + w, head_dim set apart from hidden / heads, the token
embedding multiplied by sqrt(hidden), and tied embeddings (transformers
models/gemma/modeling_gemma.py: GemmaRMSNorm, GemmaTextScaledWordEmbedding, GemmaMLP).

Gemma 2 (Gemma Team 2024b) adds a norm on each branch's output before the residual add
(post_attn, post_mlp) and softcapped attention scores and logits
(ModelConfig.attention_softcap, logit_softcap; transformers models/gemma2/modeling_gemma2.py,
Gemma2DecoderLayer and Gemma2ForCausalLM)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from planner.arch.base import Architecture, register
from planner.arch.layers import attention_core, dropped
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


class Gemma2Block(GemmaBlock):
    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.attention_softcap = cfg.attention_softcap   # read by planner.arch.layers.attention_core
        self.post_attn = GemmaRMSNorm(cfg.hidden, eps=cfg.norm_eps, device=device)
        self.post_mlp = GemmaRMSNorm(cfg.hidden, eps=cfg.norm_eps, device=device)

    def forward(self, x):
        B, T, _ = x.shape
        y = attention_core(self, *self.heads(self.n1(x), B, T))
        x = x + dropped(self.post_attn(self.o(y.transpose(1, 2).reshape(B, T, -1))), self.dropout, self.training)
        y = self.n2(x)
        return x + dropped(self.post_mlp(self.down(self.act(self.gate(y)) * self.up(y))), self.dropout, self.training)


GEMMA2 = register(Architecture(**{
    **GEMMA.__dict__, "name": "gemma2", "block": Gemma2Block,
    "block_roles": {"n1": "norm", "q": "in", "k": "in", "v": "in", "o": "out", "post_attn": "norm",
                    "n2": "norm", "gate": "in", "up": "in", "down": "out", "post_mlp": "norm"},
}))

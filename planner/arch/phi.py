"""Phi-1, Phi-1.5 and Phi-2 (Microsoft 2023): one LayerNorm feeds attention and the MLP side
by side, and both branches are added to the residual together (GPT-J's parallel block);
partial rotary embeddings (the first rotary_fraction of each head), biases on every linear
layer including the output head, a GELU (tanh) MLP (transformers models/phi/modeling_phi.py,
PhiDecoderLayer and PhiAttention).

Under tensor parallelism the two regions read one replicated norm output, so their input
gradients are summed before one reduction: a block reduces twice forward and once backward
(planner.arch.base.shared_input_outputs; runtime.parallelize)."""
from __future__ import annotations

import torch.nn as nn

from planner.arch.base import Architecture, register
from planner.arch.layers import attention_core, dropped
from planner.arch.llama import RotaryBlock


class PhiBlock(RotaryBlock):
    def __init__(self, cfg, device=None):
        super().__init__()
        h = cfg.hidden
        self.ln = nn.LayerNorm(h, eps=cfg.norm_eps, device=device)
        self._attention_inputs(cfg, device)
        self.dense = nn.Linear(cfg.heads * cfg.head_dim, h, bias=cfg.out_bias, device=device)
        self.fc_in = nn.Linear(h, cfg.ffn, bias=cfg.mlp_bias, device=device)
        self.fc_out = nn.Linear(cfg.ffn, h, bias=cfg.mlp_bias, device=device)

    def forward(self, x):
        B, T, _ = x.shape
        y = self.ln(x)
        a = self.dense(attention_core(self, *self.heads(y, B, T)).transpose(1, 2).reshape(B, T, -1))
        m = self.fc_out(self.act(self.fc_in(y)))
        return dropped(a, self.dropout, self.training) + dropped(m, self.dropout, self.training) + x


PHI = register(Architecture(
    name="phi", block=PhiBlock, final_norm=nn.LayerNorm,
    block_roles={"ln": "norm", "q": "in", "k": "in", "v": "in", "dense": "out", "fc_in": "in", "fc_out": "out"},
    regions=(("attention", ("q", "k", "v"), "dense"), ("mlp", ("fc_in",), "fc_out")),
    region_norms={"attention": "ln", "mlp": "ln"},
    default_ffn=lambda hidden: 4 * hidden,
    learned_positions=False, ties_embeddings=False, grouped_query=True, even_head_dim=True,
    activation="gelu_tanh", biases=True,
    # transformers' Phi: self_attn.dense, mlp.fc1 / mlp.fc2 (q_proj... are Llama's names)
    hf_names={"dense": "dense", "fc1": "fc_in", "fc2": "fc_out"},
))

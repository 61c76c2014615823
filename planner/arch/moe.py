"""Mixture-of-Experts decoders (Mixtral, Qwen2/3-MoE, DeepSeek-V3-shaped, GPT-OSS-shaped):
Llama's attention (RMSNorm, rotary, grouped-query) and, in place of its MLP, a routed layer
of SwiGLU experts plus optional always-on shared experts; the first `dense_layers` blocks
keep a dense SwiGLU MLP (DeepSeek's first_k_dense_replace).

Two options make Qwen's MoE models exact: `qk_norm` adds Qwen3's RMSNorm over each head of
the queries and keys (planner/arch/qwen3.py; transformers models/qwen3_moe/
modeling_qwen3_moe.py, Qwen3MoeAttention), and `shared_expert_gate` scales the shared
experts' output by sigmoid(Linear(hidden -> 1)) of the token (Qwen2-MoE's
shared_expert_gate: models/qwen2_moe/modeling_qwen2_moe.py, Qwen2MoeSparseMoeBlock).

A token's path through `MoE.forward`, as Megatron-Core's MoELayer runs it
(megatron/core/transformer/moe/moe_layer.py: router -> token dispatcher -> experts ->
combine):
1. route: scores = softmax or sigmoid of the router's logits (fp32), the top-k experts
   and their weights (renormalised over the k when `router_normalize`);
2. permute: the (token, choice) pairs sorted by expert, each token's hidden state copied
   once per choice;
3. experts: each expert's SwiGLU on the contiguous run of tokens it received
   (`Experts`, one GEMM per expert and projection - a grouped GEMM);
4. un-permute and combine: the outputs put back in (token, choice) order and summed with
   the router's weights.

Expert parallelism replaces step 3 by `dispatcher(routed, counts, experts)`, which the
runtime sets (runtime.expert_parallel): it sends each run to the rank owning the expert
(all-to-all), runs its local experts and sends the results back. The default runs every
expert here.

Routing is data-dependent. When the block runs on fake or meta tensors (the tracer,
FLOP counting) there is no data, and the tokens are dealt out evenly - the balanced load
the cost model prices (planner.simulate adds measured or assumed imbalance on top).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from cost_models.errors import MeshplanError
from planner.arch.base import Architecture, register
from planner.arch.layers import ACTIVATIONS, attention_core, dropped
from planner.arch.llama import LLAMA, RotaryBlock
from planner.arch.qwen3 import HeadRMSNorm, normed_heads

ROUTERS = ("softmax", "sigmoid")
# Why an MoE model trains with tp 1 (planner.search.space, planner.simulate.step, runtime.engine)
TP_REFUSAL = ("MoE models run with tp 1 for now: tensor parallelism would split the router like an MLP's "
              "gate and run every expert on every TP rank (expert tensor parallelism is not built); "
              "use ep and dp instead")


def check_tensor_parallel(tp: int) -> None:
    if tp > 1:
        raise MeshplanError(f"tp {tp}: {TP_REFUSAL}")


def balanced_counts(pairs: int, experts: int) -> list[int]:
    """`pairs` routed (token, choice) pairs dealt out as evenly as they go over `experts`."""
    base, extra = divmod(pairs, experts)
    return [base + (e < extra) for e in range(experts)]


def expert_counts(expert_of_pair: torch.Tensor, experts: int) -> list[int]:
    """How many routed pairs each expert receives: counted from the routing, or - with no
    data (fake or meta tensors) - the balanced split."""
    if expert_of_pair.is_meta or is_fake(expert_of_pair):
        return balanced_counts(expert_of_pair.numel(), experts)
    return torch.bincount(expert_of_pair, minlength=experts).tolist()


class Router(nn.Module):
    """Token -> (top-k expert ids, their weights). Scores in fp32, as Megatron-Core's router
    computes them (moe/router.py, `--moe-router-dtype fp32`)."""

    def __init__(self, hidden: int, experts: int, top_k: int, kind: str, normalize: bool, device=None):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False, device=device)
        self.top_k, self.kind, self.normalize = top_k, kind, normalize

    def forward(self, tokens):
        logits = self.gate(tokens).float()
        scores = torch.softmax(logits, dim=-1) if self.kind == "softmax" else torch.sigmoid(logits)
        weights, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen


class Experts(nn.Module):
    """`count` SwiGLU experts as stacked weights (one (count, in, out) tensor per projection,
    as torchtitan's GroupedExperts and Megatron-Core's TEGroupedMLP hold them), so expert
    parallelism shards them by slicing the first dimension."""

    def __init__(self, count: int, hidden: int, ffn: int, activation: str, device=None):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(count, hidden, ffn, device=device))
        self.w_up = nn.Parameter(torch.empty(count, hidden, ffn, device=device))
        self.w_down = nn.Parameter(torch.empty(count, ffn, hidden, device=device))
        self.act = ACTIVATIONS[activation]
        self.init_std = 0.02

    @property
    def count(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, tokens, counts: list[int]):
        """`tokens` sorted by expert, `counts[e]` of them for local expert e."""
        outputs = []
        for e, part in enumerate(tokens.split(counts)):
            gate, up, down = self.w_gate[e], self.w_up[e], self.w_down[e]
            outputs.append(torch.mm(self.act(torch.mm(part, gate)) * torch.mm(part, up), down))
        return torch.cat(outputs) if outputs else tokens[:0]

    @torch.no_grad()
    def reset_parameters(self, generator=None, std: float = 0.02, out_std: float = 0.02):
        for w, s in ((self.w_gate, std), (self.w_up, std), (self.w_down, out_std)):
            w.copy_(torch.randn(w.shape, generator=generator) * s)


class SwiGLU(nn.Module):
    """The dense MLP of a leading dense block, and the shared experts (as one wider MLP)."""

    def __init__(self, hidden: int, ffn: int, activation: str, bias: bool, device=None):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=bias, device=device)
        self.up = nn.Linear(hidden, ffn, bias=bias, device=device)
        self.down = nn.Linear(ffn, hidden, bias=bias, device=device)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def run_local(routed, counts: list[int], experts: Experts):
    """Step 3 without expert parallelism: every expert is here."""
    return experts(routed, counts)


class MoE(nn.Module):
    """Routed experts (plus shared experts) replacing a block's MLP."""

    def __init__(self, cfg, device=None):
        super().__init__()
        self.router = Router(cfg.hidden, cfg.experts, cfg.top_k, cfg.router, cfg.router_normalize, device)
        self.experts = Experts(cfg.experts, cfg.hidden, cfg.expert_ffn, cfg.activation, device)
        self.shared = (SwiGLU(cfg.hidden, cfg.shared_experts * cfg.shared_expert_ffn, cfg.activation, False, device)
                       if cfg.shared_experts else None)
        # Qwen2-MoE: the shared experts' output times sigmoid(token . w), one weight row
        self.shared_gate = nn.Linear(cfg.hidden, 1, bias=False, device=device) if cfg.shared_expert_gate else None
        self.num_experts, self.top_k = cfg.experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.dispatcher: Callable = run_local   # runtime.expert_parallel sets the all-to-all one

    def forward(self, x):
        B, T, h = x.shape
        tokens = x.reshape(-1, h)
        weights, chosen = self.router(tokens)
        expert_of_pair = chosen.reshape(-1)
        order = torch.argsort(expert_of_pair, stable=True)
        counts = expert_counts(expert_of_pair, self.num_experts)
        kept, counts = self._within_capacity(order, counts)
        routed = tokens[kept // self.top_k]
        out = self.dispatcher(routed, counts, self.experts)
        pairs = out.new_zeros(expert_of_pair.numel(), h).index_copy(0, kept, out)
        combined = (pairs.view(-1, self.top_k, h) * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            combined = combined + shared
        return combined.view(B, T, h)

    def _within_capacity(self, order, counts: list[int]):
        """Dropless (capacity_factor None): every pair. Otherwise each expert keeps its first
        ceil(capacity_factor * pairs / experts) pairs in token order and drops the rest
        (GShard's capacity; Megatron-Core's `--moe-expert-capacity-factor` without padding)."""
        if self.capacity_factor is None:
            return order, counts
        capacity = math.ceil(self.capacity_factor * order.numel() / self.num_experts)
        if all(c <= capacity for c in counts):
            return order, counts
        starts = [sum(counts[:e]) for e in range(len(counts))]
        keep = torch.cat([order[s:s + min(c, capacity)] for s, c in zip(starts, counts)])
        return keep, [min(c, capacity) for c in counts]


class MoEBlock(RotaryBlock):
    """Llama's attention, then a dense SwiGLU MLP (the first `dense_layers` blocks) or an MoE."""

    def __init__(self, cfg, device=None, layer: int = 0):
        super().__init__()
        h = cfg.hidden
        self.n1 = nn.RMSNorm(h, eps=cfg.norm_eps, device=device)
        self._attention_inputs(cfg, device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:   # Qwen3-MoE: one weight of head_dim shared by all heads, as Qwen3Block's
            self.q_norm = HeadRMSNorm(cfg.head_dim, eps=cfg.norm_eps, device=device)
            self.k_norm = HeadRMSNorm(cfg.head_dim, eps=cfg.norm_eps, device=device)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, h, bias=cfg.out_bias, device=device)
        self.n2 = nn.RMSNorm(h, eps=cfg.norm_eps, device=device)
        if layer < cfg.dense_layers:
            self.gate = nn.Linear(h, cfg.dense_ffn, bias=cfg.mlp_bias, device=device)
            self.up = nn.Linear(h, cfg.dense_ffn, bias=cfg.mlp_bias, device=device)
            self.down = nn.Linear(cfg.dense_ffn, h, bias=cfg.mlp_bias, device=device)
            self.moe = None
        else:
            self.moe = MoE(cfg, device)

    def heads(self, y, B: int, T: int):
        return normed_heads(self, y, B, T) if self.qk_norm else super().heads(y, B, T)

    def forward(self, x):
        B, T, _ = x.shape
        y = attention_core(self, *self.heads(self.n1(x), B, T))
        x = x + dropped(self.o(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)
        y = self.n2(x)
        mlp = self.moe(y) if self.moe is not None else self.down(self.act(self.gate(y)) * self.up(y))
        return x + dropped(mlp, self.dropout, self.training)


MOE = register(Architecture(**{
    **LLAMA.__dict__, "name": "moe", "block": MoEBlock,
    # a dense block's MLP and a shared expert's projections keep Llama's roles; the router
    # and the routed experts are not split by tensor parallelism (expert parallelism instead).
    # q_norm and k_norm exist only with qk_norm (Qwen3-MoE), and are Qwen3's head norms.
    "block_roles": {"n1": "norm", "q": "in", "k": "in", "v": "in", "q_norm": "norm", "k_norm": "norm", "o": "out",
                    "n2": "norm", "gate": "in", "up": "in", "down": "out"},
    "head_norms": {"q_norm": "q", "k_norm": "k"},
    "hf_names": {},
    "layered": True,
}))

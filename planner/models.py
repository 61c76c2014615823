"""The two decoder families of the model zoo, in plain PyTorch.

`gpt`: GPT-2/3 style (learned positions, pre-LayerNorm, GELU MLP, biases, optional
tied embeddings). `llama`: RMSNorm, rotary positions, SwiGLU MLP, no biases,
grouped-query attention. Attention is `F.scaled_dot_product_attention(is_causal=True)`
and the loss is cross-entropy on fp32 logits, as in shared/reference/h100/measure.py,
so a single-GPU plan of ours runs the same arithmetic as that reference loop.

`recompute_attention = True` on a block reruns its attention core (`attention_core`) in
backward instead of keeping its activations: Korthikanti et al. 2022's selective
recomputation, which Megatron-LM applies by checkpointing its `core_attention` module
(megatron/core/transformer/attention.py, `_checkpointed_attention_forward`). The core's
ops carry the fx annotation ATTENTION_CORE, so the tracer knows what that rerun costs.

`attention="unfused"` runs Megatron-LM's core attention instead (the default of
Megatron-LM before flash attention, and what the SC21 and vTrain measurements ran):
scores by one baddbmm, causal mask and softmax, dropout on the probabilities, one bmm
with the values - the s x s scores live in memory. `dropout=p` adds Megatron's dropouts:
embeddings, attention probabilities and each residual branch (its default is 0.1).

Built for parallelism:
- blocks live in an `nn.ModuleDict` keyed "0".."L-1": a pipeline stage deletes the
  blocks it does not own and keeps the others' names (and checkpoint keys);
- `tok`, `pos`, `norm` and `head` may be set to None on stages that do not own them;
- head counts are derived from tensor shapes (`view(B, T, -1, head_dim)`), so a
  tensor-parallel shard of a projection runs the same code on its local heads;
- GPT's fused QKV weight is laid out per head ([q_h; k_h; v_h] for each head h, as in
  Megatron-LM), so a column shard of it holds whole heads.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.fx.traceback as fx_traceback
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cost_models.errors import MeshplanError

ARCHS = ("gpt", "llama")
ATTENTION_KINDS = ("sdpa", "unfused")
# The key of the fx node annotation (node.meta["custom"]) marking the attention core's ops:
# planner.trace reads it to price attention-core recomputation.
ATTENTION_CORE = "attention_core"


@dataclass
class ModelConfig:
    arch: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int | None = None       # default: heads (no grouping)
    ffn: int | None = None            # default: 4*hidden (gpt), Llama's 8/3*hidden rounded to 256
    max_seq: int = 2048
    tie_embeddings: bool | None = None  # default: True for gpt, False for llama
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention: str = "sdpa"           # or "unfused": Megatron-LM's baddbmm-softmax-dropout-bmm
    dropout: float = 0.0              # embeddings, attention probabilities, residual branches
    name: str = "custom"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise MeshplanError(f"model arch {self.arch!r} is unknown; use one of {', '.join(ARCHS)}")
        for key in ("layers", "hidden", "heads", "vocab", "max_seq"):
            _positive_int(key, getattr(self, key))
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.ffn is None:
            self.ffn = 4 * self.hidden if self.arch == "gpt" else _llama_ffn(self.hidden)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt"
        _positive_int("kv_heads", self.kv_heads)
        _positive_int("ffn", self.ffn)
        if self.hidden % self.heads:
            raise MeshplanError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise MeshplanError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.attention not in ATTENTION_KINDS:
            raise MeshplanError(f"model attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION_KINDS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise MeshplanError(f"model dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.arch == "gpt" and self.kv_heads != self.heads:
            raise MeshplanError("gpt models have no grouped-query attention: drop kv_heads or use arch llama")
        if self.arch == "llama" and (self.hidden // self.heads) % 2:
            raise MeshplanError(f"llama head size {self.hidden // self.heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"arch", "layers", "hidden", "heads", "vocab"} - set(data))
        if missing:
            raise MeshplanError(f"{where}: missing key(s) {missing}")
        return cls(**data)


def _positive_int(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MeshplanError(f"model {key} must be a whole number >= 1, got {value!r}")


def _llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    ffn = int(2 * 4 * hidden / 3)
    return multiple_of * math.ceil(ffn / multiple_of)


def dropped(x, p: float, training: bool):
    """F.dropout, left out of the graph entirely when it would do nothing."""
    return F.dropout(x, p, training) if p and training else x


def _core_label():
    """Label the ops traced inside as the attention core. `fx.traceback.annotate` only
    writes node metadata while a tracer preserves it, so an eager step pays one dict
    update; a torch release without it runs the same ops, unlabelled."""
    annotate = getattr(fx_traceback, "annotate", None)
    return annotate({ATTENTION_CORE: True}) if annotate else contextlib.nullcontext()


def attention_core(block: nn.Module, q, k, v):
    """A block's causal attention; rerun in backward when `block.recompute_attention`.

    The checkpoint keeps q, k and v (views of the projections' outputs, which the
    linear layers keep anyway) and recomputes the scores, softmax, dropout and the product
    with the values - Megatron-LM's `--recompute-granularity selective`. Non-reentrant, and
    preserving the RNG state so the attention dropout replays the same mask."""
    args = (q, k, v, block.attention, block.dropout, block.training)
    if block.recompute_attention and torch.is_grad_enabled():
        return checkpoint(causal_attention, *args, use_reentrant=False, preserve_rng_state=True)
    return causal_attention(*args)


def causal_attention(q, k, v, kind: str, dropout: float, training: bool):
    """Causal self-attention of (B, heads, T, D) queries over (B, kv_heads, T, D) keys/values.

    "sdpa": PyTorch's fused kernel (flash on GPUs). "unfused": Megatron-LM's core
    attention - scaled scores written by one baddbmm, the causal mask and softmax, dropout
    on the probabilities, and the values' bmm.
    """
    with _core_label():
        return _causal_attention(q, k, v, kind, dropout, training)


def _causal_attention(q, k, v, kind: str, dropout: float, training: bool):
    p = dropout if training else 0.0
    gqa = k.shape[1] != q.shape[1]
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
    if gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    B, heads, T, D = q.shape
    scores = torch.baddbmm(q.new_empty(B * heads, T, T), q.reshape(B * heads, T, D),
                           k.reshape(B * heads, T, D).transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(D))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = dropped(torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1), p, training)
    return torch.bmm(probs, v.reshape(B * heads, T, D)).view(B, heads, T, D)


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        h, kw = cfg.hidden, dict(device=device)
        self.head_dim = cfg.head_dim
        self.attention, self.dropout = cfg.attention, cfg.dropout
        self.recompute_attention = False   # set by runtime.parallelize.apply_checkpointing
        self.ln1 = nn.LayerNorm(h, eps=cfg.norm_eps, **kw)
        self.qkv = nn.Linear(h, 3 * h, **kw)
        self.proj = nn.Linear(h, h, **kw)
        self.ln2 = nn.LayerNorm(h, eps=cfg.norm_eps, **kw)
        self.fc1 = nn.Linear(h, cfg.ffn, **kw)
        self.fc2 = nn.Linear(cfg.ffn, h, **kw)

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, -1, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        y = attention_core(self, q, k, v)
        x = x + dropped(self.proj(y.transpose(1, 2).reshape(B, T, -1)), self.dropout, self.training)
        return x + dropped(self.fc2(F.gelu(self.fc1(self.ln2(x)))), self.dropout, self.training)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of a (B, heads, T, D) tensor by position."""
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
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


class Decoder(nn.Module):
    """A decoder-only language model. forward(idx, targets) -> loss; without targets -> logits.

    On a pipeline stage that lacks `tok`, the input is the previous stage's hidden states;
    on one that lacks `head`, the output is this stage's hidden states.
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.config = cfg
        block = GPTBlock if cfg.arch == "gpt" else LlamaBlock
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden, device=device)
        self.pos = nn.Embedding(cfg.max_seq, cfg.hidden, device=device) if cfg.arch == "gpt" else None
        self.blocks = nn.ModuleDict({str(i): block(cfg, device) for i in range(cfg.layers)})
        norm = nn.LayerNorm if cfg.arch == "gpt" else nn.RMSNorm
        self.norm = norm(cfg.hidden, eps=cfg.norm_eps, device=device)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight

    def forward(self, x, targets=None):
        if self.tok is not None:
            T = x.shape[1]
            if T > self.config.max_seq:
                raise MeshplanError(f"sequence length {T} exceeds the model's max_seq {self.config.max_seq}")
            h = self.tok(x)
            if self.pos is not None:
                h = h + self.pos(torch.arange(T, device=x.device))
            x = dropped(h, self.config.dropout, self.training)
        for block in self.blocks.values():
            x = block(x)
        if self.head is None:
            return x
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, param in self.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "n1.weight", "n2.weight", "norm.weight")):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = residual_std if name.endswith(("proj.weight", "fc2.weight", ".o.weight",
                                                     "down.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        return self


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights count once)."""
    return sum(p.numel() for p in model.parameters())

"""ModelConfig and the Decoder every family of the zoo shares, in plain PyTorch.

The families (their blocks and every fact about them) live in `planner.arch`: `gpt`
(planner/arch/gpt.py), `llama` (planner/arch/llama.py), `qwen3`, `gemma`, `gemma2` and `phi`;
planner.hf_config maps Hugging Face config.json files onto them. Attention is
`F.scaled_dot_product_attention(is_causal=True)` (or Megatron-LM's unfused core, see
planner.arch.layers) and the loss is cross-entropy on fp32 logits, as in
shared/reference/h100/measure.py, so a single-GPU plan of ours runs the same arithmetic as
that reference loop. `dropout=p` adds Megatron's dropouts: embeddings, attention
probabilities and each residual branch (its default is 0.1); `attention_dropout` and
`embedding_dropout` set the first two apart (Hugging Face configs do).

Built for parallelism:
- blocks live in an `nn.ModuleDict` keyed "0".."L-1": a pipeline stage deletes the
  blocks it does not own and keeps the others' names (and checkpoint keys);
- `tok`, `pos`, `norm` and `head` may be set to None on stages that do not own them;
- head counts are derived from tensor shapes (`view(B, T, -1, head_dim)`), so a
  tensor-parallel shard of a projection runs the same code on its local heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from cost_models.errors import MeshplanError
from cost_models.inputs import (MAX_EXPERTS, MAX_FFN, MAX_HIDDEN, MAX_LAYERS, MAX_SEQ, MAX_VOCAB, finite_number,
                                shown, whole_number)
from planner.arch import arch_names, get_arch
from planner.arch.layers import ACTIVATIONS, ATTENTION_KINDS, WHOLE_SEQUENCE, dropped
from planner.arch.moe import ROUTERS


@dataclass
class ModelConfig:
    arch: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int | None = None       # default: heads (no grouping)
    ffn: int | None = None            # default: the family's (Architecture.default_ffn)
    max_seq: int = 2048
    tie_embeddings: bool | None = None  # default: the family's (Architecture.ties_embeddings)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention: str = "sdpa"           # or "unfused": Megatron-LM's baddbmm-softmax-dropout-bmm
    dropout: float = 0.0              # residual branches (and, unless set below, the other two)
    attention_dropout: float | None = None   # attention probabilities; default: dropout
    embedding_dropout: float | None = None   # the embeddings' output; default: dropout
    head_dim: int | None = None       # default: hidden / heads (Gemma's and Qwen3's differ)
    activation: str | None = None     # the MLP's (its gate's); default: the family's (layers.ACTIVATIONS)
    qkv_bias: bool | None = None      # biases of the attention's input projections; default: the family's
    out_bias: bool | None = None      # ... of its output projection
    mlp_bias: bool | None = None      # ... of the MLP's projections
    head_bias: bool = False           # a bias on the output head (Phi)
    rotary_fraction: float = 1.0      # share of head_dim that rotary embeddings rotate (Phi's partial rotary)
    attention_softcap: float | None = None   # scores -> c * tanh(scores / c) (Gemma 2; unfused attention only)
    logit_softcap: float | None = None       # logits -> c * tanh(logits / c) (Gemma 2)
    # Mixture-of-Experts (arch "moe", planner/arch/moe.py); a dense family leaves them unset
    experts: int = 0                  # routed experts per MoE block
    top_k: int | None = None          # experts each token is routed to
    expert_ffn: int | None = None     # one routed expert's SwiGLU width; default: ffn
    shared_experts: int = 0           # always-on experts every token also goes through
    shared_expert_ffn: int | None = None   # one shared expert's width; default: expert_ffn
    dense_layers: int = 0             # leading blocks with a dense MLP instead (DeepSeek's first_k_dense_replace)
    dense_ffn: int | None = None      # their MLP width; default: ffn
    router: str = "softmax"           # expert scores: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3)
    router_normalize: bool = True     # the k chosen weights renormalised to sum to 1
    capacity_factor: float | None = None   # None: dropless; else each expert keeps cf * its balanced share
    shared_expert_gate: bool = False  # the shared experts' output times sigmoid(Linear(hidden -> 1)) (Qwen2-MoE)
    qk_norm: bool = False             # an RMSNorm over each query and key head, as Qwen3's (Qwen3-MoE)
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.arch, str):
            raise MeshplanError(f"model arch must be text ({', '.join(arch_names())}), got {shown(self.arch)}")
        family = get_arch(self.arch)
        for key in ("layers", "hidden", "heads", "vocab", "max_seq"):
            _positive_int(key, getattr(self, key))
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.ffn is None:
            self.ffn = family.default_ffn(self.hidden)
        if self.tie_embeddings is None:
            self.tie_embeddings = family.ties_embeddings
        self._given = frozenset(k for k in _DERIVED if getattr(self, k) is not None)
        if self.head_dim is None and self.hidden % self.heads:
            raise MeshplanError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}), "
                                f"or give head_dim")
        self.head_dim = self.hidden // self.heads if self.head_dim is None else self.head_dim
        self.activation = family.activation if self.activation is None else self.activation
        for key in ("qkv_bias", "out_bias", "mlp_bias"):
            if getattr(self, key) is None:
                setattr(self, key, family.biases)
        for key in ("attention_dropout", "embedding_dropout"):
            if getattr(self, key) is None:
                setattr(self, key, self.dropout)
        for key in ("kv_heads", "ffn", "head_dim"):
            _positive_int(key, getattr(self, key))
        for key in ("tie_embeddings", "qkv_bias", "out_bias", "mlp_bias", "head_bias"):
            if not isinstance(getattr(self, key), bool):
                raise MeshplanError(f"model {key} must be true or false, got {shown(getattr(self, key))}")
        if self.activation not in ACTIVATIONS:
            raise MeshplanError(f"model activation {shown(self.activation)} is unknown; "
                                f"use one of {', '.join(ACTIVATIONS)}")
        finite_number(self.norm_eps, "model norm_eps", low=0, low_open=True, high=1)
        finite_number(self.rope_theta, "model rope_theta", low=0, low_open=True)
        if not isinstance(self.name, str):
            raise MeshplanError(f"model name must be text, got {shown(self.name)}")
        if self.heads % self.kv_heads:
            raise MeshplanError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not isinstance(self.attention, str) or self.attention not in ATTENTION_KINDS:
            raise MeshplanError(f"model attention {shown(self.attention)} is unknown; "
                                f"use one of {', '.join(ATTENTION_KINDS)}")
        for key in ("dropout", "attention_dropout", "embedding_dropout"):
            p = getattr(self, key)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise MeshplanError(f"model {key} must be a number in [0, 1), got {shown(p)}")
        if not family.grouped_query and self.kv_heads != self.heads:
            grouped = ", ".join(n for n in arch_names() if get_arch(n).grouped_query)
            raise MeshplanError(f"{self.arch} models have no grouped-query attention: drop kv_heads or use arch {grouped}")
        for key in ("attention_softcap", "logit_softcap"):
            if getattr(self, key) is not None:
                finite_number(getattr(self, key), f"model {key}", low=0, low_open=True)
        if self.attention_softcap is not None and self.attention != "unfused":
            raise MeshplanError("model attention_softcap needs attention 'unfused': "
                                "SDPA kernels cannot softcap scores")
        self._check_experts(family)
        finite_number(self.rotary_fraction, "model rotary_fraction", low=0, low_open=True, high=1)
        if family.learned_positions and self.rotary_fraction != 1:
            raise MeshplanError(f"{self.arch} models have learned positions, no rotary embeddings: "
                                f"drop rotary_fraction")
        if family.even_head_dim and (self.rotary_dims < 2 or self.rotary_dims % 2):
            raise MeshplanError(f"{self.arch} rotary embeddings rotate {self.rotary_dims} of head size {self.head_dim} "
                                f"(rotary_fraction {self.rotary_fraction}): that must be even and at least 2")

    def _check_experts(self, family):
        given = [k for k in _MOE_KEYS if getattr(self, k) != _MOE_DEFAULTS[k]]
        if not family.layered:
            if given:
                one = len(given) == 1
                raise MeshplanError(f"{', '.join(given)} {'is an option' if one else 'are options'} of arch moe; "
                                    f"{self.arch} models have no experts: drop {'it' if one else 'them'} or use arch moe")
            return
        whole_number(self.experts, "model experts", low=1, high=MAX_EXPERTS)
        if self.top_k is None:
            raise MeshplanError("a moe model needs top_k, the experts each token is routed to")
        whole_number(self.top_k, "model top_k", low=1, high=self.experts)
        for key, default in (("expert_ffn", self.ffn), ("dense_ffn", self.ffn)):
            setattr(self, key, default if getattr(self, key) is None else getattr(self, key))
            _positive_int(key, getattr(self, key), "ffn")
        whole_number(self.shared_experts, "model shared_experts", low=0, high=MAX_EXPERTS)
        if self.shared_expert_ffn is None:
            self.shared_expert_ffn = self.expert_ffn
        _positive_int("shared_expert_ffn", self.shared_expert_ffn, "ffn")
        whole_number(self.dense_layers, "model dense_layers", low=0, high=self.layers)
        if not isinstance(self.router, str) or self.router not in ROUTERS:
            raise MeshplanError(f"model router {shown(self.router)} is unknown; use one of {', '.join(ROUTERS)}")
        if not isinstance(self.router_normalize, bool):
            raise MeshplanError(f"model router_normalize must be true or false, got {shown(self.router_normalize)}")
        if self.capacity_factor is not None:
            finite_number(self.capacity_factor, "model capacity_factor", low=0, low_open=True, high=MAX_EXPERTS)
        for key in ("shared_expert_gate", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise MeshplanError(f"model {key} must be true or false, got {shown(getattr(self, key))}")
        if self.shared_expert_gate and not self.shared_experts:
            raise MeshplanError("model shared_expert_gate gates the shared experts' output: give shared_experts "
                                "or drop it")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def rotary_dims(self) -> int:
        """The leading dimensions of each head that rotary embeddings rotate (as Hugging Face's
        Phi computes them: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.rotary_fraction)

    def to_dict(self) -> dict:
        """The fields, less the derived ones (_DERIVED) the config did not give, a dense model's
        MoE keys, and the MoE options (_MOE_OPTIONS) left off."""
        moe = self.is_moe
        return {k: v for k, v in asdict(self).items()
                if (k not in _DERIVED or k in self._given) and (moe or k not in _MOE_KEYS)
                and (k not in _MOE_OPTIONS or v)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise MeshplanError(f"{where} must be a JSON object, not {shown(data)}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - allowed))
        if unknown:
            raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"arch", "layers", "hidden", "heads", "vocab"} - set(data))
        if missing:
            raise MeshplanError(f"{where}: missing key(s) {missing}")
        return cls(**data)


# Fields whose None means "derived from the others": to_dict leaves them out unless given,
# so `{**cfg.to_dict(), "dropout": 0.1}` moves the attention dropout along with it.
_DERIVED = ("attention_dropout", "embedding_dropout", "head_dim", "activation", "qkv_bias", "out_bias", "mlp_bias",
            "expert_ffn", "shared_expert_ffn", "dense_ffn")
# The Mixture-of-Experts fields and their unset values (a dense model's to_dict leaves them out).
_MOE_DEFAULTS = {"experts": 0, "top_k": None, "expert_ffn": None, "shared_experts": 0, "shared_expert_ffn": None,
                 "dense_layers": 0, "dense_ffn": None, "router": "softmax", "router_normalize": True,
                 "capacity_factor": None, "shared_expert_gate": False, "qk_norm": False}
_MOE_KEYS = tuple(_MOE_DEFAULTS)
# Switches of one model family's MoE (Qwen's): left out of to_dict when off, so the configs of
# other MoE models (and plans saved with them) read as before they existed.
_MOE_OPTIONS = ("shared_expert_gate", "qk_norm")
# The most each size may be (cost_models.inputs): beyond them the tracer and the search would
# work for hours, or torch's storage size overflows.
_MAX = {"layers": MAX_LAYERS, "hidden": MAX_HIDDEN, "heads": MAX_HIDDEN, "kv_heads": MAX_HIDDEN, "head_dim": MAX_HIDDEN,
        "ffn": MAX_FFN, "vocab": MAX_VOCAB, "max_seq": MAX_SEQ}


def _positive_int(key, value, bound: str | None = None):
    whole_number(value, f"model {key}", high=_MAX[bound or key])


class Decoder(nn.Module):
    """A decoder-only language model. forward(idx, targets) -> loss; without targets -> logits.

    On a pipeline stage that lacks `tok`, the input is the previous stage's hidden states;
    on one that lacks `head`, the output is this stage's hidden states.
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.config = cfg
        family = get_arch(cfg.arch)
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden, device=device)
        self.pos = nn.Embedding(cfg.max_seq, cfg.hidden, device=device) if family.learned_positions else None
        self.blocks = nn.ModuleDict({str(i): family.block(cfg, device, **({"layer": i} if family.layered else {}))
                                     for i in range(cfg.layers)})
        self.norm = family.final_norm(cfg.hidden, eps=cfg.norm_eps, device=device)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=cfg.head_bias, device=device)
        self.embedding_scale = math.sqrt(cfg.hidden) if family.scales_embedding else None
        self.sequence = WHOLE_SEQUENCE   # the positions of the tokens held (runtime.context_parallel)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight

    def forward(self, x, targets=None):
        if self.tok is not None:
            T = x.shape[1]
            if T > self.config.max_seq:
                raise MeshplanError(f"sequence length {T} exceeds the model's max_seq {self.config.max_seq}")
            h = self.tok(x)
            if self.embedding_scale is not None:
                h = h * self.embedding_scale
            if self.pos is not None:
                h = h + self.pos(self.sequence.positions(T, x.device))
            x = dropped(h, self.config.embedding_dropout, self.training)
        for block in self.blocks.values():
            x = block(x)
        if self.head is None:
            return x
        logits = self.head(self.norm(x))
        if self.config.logit_softcap:
            logits = torch.tanh(logits / self.config.logit_softcap) * self.config.logit_softcap
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
        family = get_arch(self.config.arch)
        roles = {**family.block_roles, **family.top_roles}
        for name, param in self.named_parameters():
            role = roles.get(name.rsplit(".", 2)[-2])   # "blocks.3.fc2.weight" -> "fc2"
            if role == "norm" and name.endswith(".weight"):   # a norm's scale starts at 1 (Gemma's w as 1 + w)
                param.fill_(getattr(self.get_submodule(name.rsplit(".", 1)[0]), "initial_weight", 1.0))
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = residual_std if role == "out" else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        return self


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights count once)."""
    return sum(p.numel() for p in model.parameters())


def active_parameters(cfg: "ModelConfig | Decoder", embeddings: bool = True) -> int:
    """The parameters one token's forward pass uses: all of them, less the routed experts of
    each MoE block it is not sent to (experts - top_k of them; the shared experts, router and
    attention always count); a dense model's are its count_parameters. The embedding tables
    count whole (as Mistral and Qwen quote active sizes: Mixtral-8x7B 12.9B, Qwen3-30B-A3B
    3.3B); `embeddings=False` leaves them out (tok, and pos where the family has it), as OpenAI
    and DeepSeek quote them (gpt-oss-120b 5.1B, DeepSeek-V3 36.6B) and as 6 * N * tokens counts
    FLOPs: a lookup multiplies nothing. A tied head is the token table and always counts.
    Given a built Decoder (any device) it counts that one instead of building one on meta."""
    model = cfg if isinstance(cfg, Decoder) else Decoder(cfg, device="meta")
    cfg = model.config
    count = count_parameters(model)
    for block in model.blocks.values():
        moe = getattr(block, "moe", None)
        if moe is not None:
            per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.num_experts
            count -= (moe.num_experts - moe.top_k) * per_expert
    if not embeddings:
        count -= (0 if cfg.tie_embeddings else model.tok.weight.numel()) + (model.pos.weight.numel() if model.pos else 0)
    return count


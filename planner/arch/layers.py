"""Pieces every family's block uses: causal attention (fused or Megatron's unfused core),
attention-core recomputation, the MLP's activation, and dropout that vanishes when off.

`recompute_attention = True` on a block reruns its attention core (`attention_core`) in
backward instead of keeping its activations: Korthikanti et al. 2022's selective
recomputation, which Megatron-LM applies by checkpointing its `core_attention` module
(megatron/core/transformer/attention.py, `_checkpointed_attention_forward`). The core's
ops carry the fx annotation ATTENTION_CORE, so the tracer knows what that rerun costs.

Where a block's tokens sit in the sequence is its `sequence` (a SequenceLayout): the
positions the rotary or learned position embeddings use, and the attention over the
sequence's keys. The default is the whole sequence in order; context parallelism
(runtime.context_parallel) swaps in a layout holding two chunks of it whose attention
gathers the other ranks' keys and values - one hook, every family.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.fx.traceback as fx_traceback
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

ATTENTION_KINDS = ("sdpa", "unfused")
# ModelConfig.activation -> the function, one kernel each. "gelu_tanh" is GELU's tanh
# approximation (Hugging Face's gelu_new, gelu_fast and gelu_pytorch_tanh compute it).
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}
# The key of the fx node annotation (node.meta["custom"]) marking the attention core's ops:
# planner.trace reads it to price attention-core recomputation.
ATTENTION_CORE = "attention_core"


def every_other_product_policy(saves, counts):
    """Op-level selective checkpointing as torchtitan runs it (torchtitan/distributed/
    activation_checkpoint.py, SelectiveAC `_get_custom_policy`): keep the outputs of the ops
    `saves(op, args)` names (the linear layers' products, the fused attention kernels),
    except every second product `counts(op, args)` names, which reruns with everything else
    (norms, activations, casts). The count starts afresh for each block's forward and again
    for its recomputation, so both pass the same ops the same way. A new policy per block
    call: use it as `context_fn=lambda: create_selective_checkpoint_contexts(policy())`."""
    seen = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if counts(op, args):
            seen[ctx.is_recompute] += 1
            if seen[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if saves(op, args) else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def dropped(x, p: float, training: bool):
    """F.dropout, left out of the graph entirely when it would do nothing."""
    return F.dropout(x, p, training) if p and training else x


def _core_label():
    """Label the ops traced inside as the attention core. `fx.traceback.annotate` only
    writes node metadata while a tracer preserves it, so an eager step pays one dict
    update; a torch release without it runs the same ops, unlabelled."""
    annotate = getattr(fx_traceback, "annotate", None)
    return annotate({ATTENTION_CORE: True}) if annotate else contextlib.nullcontext()


class SequenceLayout:
    """The whole sequence, in order, on this process: positions 0..T-1 and plain causal
    attention. runtime.context_parallel.ContextShard overrides both."""

    def positions(self, T: int, device, dtype=torch.long) -> torch.Tensor:
        """The global positions of the T tokens this process holds."""
        return torch.arange(T, device=device, dtype=dtype)

    def attend(self, q, k, v, kind: str, dropout: float, training: bool, softcap: float | None = None):
        return causal_attention(q, k, v, kind, dropout, training, softcap)


WHOLE_SEQUENCE = SequenceLayout()


def attention_core(block: nn.Module, q, k, v):
    """A block's causal attention; rerun in backward when `block.recompute_attention`.

    The checkpoint keeps q, k and v (views of the projections' outputs, which the
    linear layers keep anyway) and recomputes the scores, softmax, dropout and the product
    with the values - Megatron-LM's `--recompute-granularity selective`. Non-reentrant, and
    preserving the RNG state so the attention dropout replays the same mask."""
    # a block without its own attention dropout drops out with its residual branches' p
    args = (q, k, v, block.attention, getattr(block, "attention_dropout", block.dropout), block.training,
            getattr(block, "attention_softcap", None))
    attend = getattr(block, "sequence", WHOLE_SEQUENCE).attend   # a family's block may not declare one
    if block.recompute_attention and torch.is_grad_enabled():
        return checkpoint(attend, *args, use_reentrant=False, preserve_rng_state=True)
    return attend(*args)


def causal_attention(q, k, v, kind: str, dropout: float, training: bool, softcap: float | None = None,
                     future: torch.Tensor | None = None):
    """Causal self-attention of (B, heads, Tq, D) queries over (B, kv_heads, Tk, D) keys/values.

    "sdpa": PyTorch's fused kernel (flash on GPUs). "unfused": Megatron-LM's core
    attention - scaled scores written by one baddbmm, the causal mask and softmax, dropout
    on the probabilities, and the values' bmm. `softcap` (unfused only): the scores become
    softcap * tanh(scores / softcap) before the mask, as Gemma 2's eager attention does
    (transformers models/gemma2/modeling_gemma2.py, eager_attention_forward).
    `future`: a (Tq, Tk) boolean mask, True where a key lies after its query (default: the
    upper triangle of Tq = Tk tokens in order).
    """
    with _core_label():
        return _causal_attention(q, k, v, kind, dropout, training, softcap, future)


def _causal_attention(q, k, v, kind: str, dropout: float, training: bool, softcap: float | None = None,
                      future: torch.Tensor | None = None):
    p = dropout if training else 0.0
    gqa = k.shape[1] != q.shape[1]
    if kind == "sdpa":
        if future is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~future, dropout_p=p, enable_gqa=gqa)
    if gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    B, heads, T, D = q.shape
    Tk = k.shape[2]
    scores = torch.baddbmm(q.new_empty(B * heads, T, Tk), q.reshape(B * heads, T, D),
                           k.reshape(B * heads, Tk, D).transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(D))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if future is None:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = dropped(torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1), p, training)
    return torch.bmm(probs, v.reshape(B * heads, Tk, D)).view(B, heads, T, D)

"""Context parallelism: each sequence split over the cp ranks of a data-parallel rank.

Layout (planner.plan `_check_context_parallel`): every sequence of the step is cut into
2 x cp chunks and cp rank i keeps chunks i and 2cp-1-i, so each rank holds as much of the
causal triangle as any other (Megatron-LM's get_batch_on_this_cp_rank, megatron/core/
utils.py; torchtitan's default "headtail" balancer, torchtitan/distributed/context_parallel/
api.py, torch's _HeadTailLoadBalancer). Tokens and labels are cut alike
(`ContextShard.shard`); the rotary and learned position embeddings read the kept tokens'
real positions through the one hook every family's block and the Decoder have,
`module.sequence` (planner.arch.layers.SequenceLayout), which `apply` sets to this rank's
ContextShard.

Attention, the "allgather" rotate method of torch's context parallel (torch/distributed/
tensor/experimental/_context_parallel/_attention.py, _AllGatherRotater): per attention layer and
micro-batch the keys and values are all-gathered over the cp group (each rank sends its
two chunks), the local queries attend to all of them under the causal mask of their real
positions, and backward reduce-scatters dK and dV to their owners. The gathered copy is not
kept for backward: the attention kernel's saved keys and values are swapped for this
rank's own and gathered again when backward unpacks them (saved-tensor hooks), as torch's
ring backward gathers again. (Under activation recomputation the checkpoint already drops
them and its rerun gathers again; the bytes are the same.) torch's own API only replaces
the CUDA SDPA kernels (flash, efficient, cudnn), not the CPU kernel nor the unfused core,
so meshplan runs its own exchange: c10d all-gather and reduce-scatter, the same on gloo
and NCCL. Grouped-query heads fold into query rows (each kv head's g
query heads as g x Tq rows), so no copy of the gathered K and V is made per query head.

Gradients are reduced over dp x cp (each cp rank holds a whole replica of its stage), FSDP2
/ replicate over the flattened ("dp", "cp") mesh (runtime.mesh; torchtitan's "fsdp" mesh
dimension, dp_shard x cp flattened: torchtitan/distributed/parallel_dims.py); every cp
rank's loss is the mean over an equal number of tokens, so averaging over dp x cp gives
the mean over all tokens of the step, as one process computes it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from cost_models.errors import MeshplanError
from planner.arch.layers import SequenceLayout, causal_attention
from planner.plan import Plan

# torch 2.13 renames the single-tensor collectives (the old names warn); the runtime's floor has only those
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def check(spec, plan: Plan):
    """What a cp plan needs of the model, before any process group starts."""
    if plan.cp == 1:
        return
    if spec.config is None:
        raise MeshplanError(f"cp {plan.cp}: context parallelism runs the zoo's decoders (their attention and "
                            f"positions take the hook), not a file.py:factory model ({spec.name}): use cp 1")


def _gather(local: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, H, Tl, D) on each rank -> (B, H, size x Tl, D), rank-major (the keys' positions
    say where each sits in the sequence)."""
    B, H, Tl, D = local.shape
    out = local.new_empty(size * B, H, Tl, D)
    ALL_GATHER(out, local.contiguous(), group=group)
    return out.view(size, B, H, Tl, D).permute(1, 2, 0, 3, 4).reshape(B, H, size * Tl, D)


class _GatherKV(torch.autograd.Function):
    """All-gather forward, reduce-scatter (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, local, group, size):
        ctx.group, ctx.size = group, size
        return _gather(local, group, size)

    @staticmethod
    def backward(ctx, grad):
        B, H, T, D = grad.shape
        stacked = grad.reshape(B, H, ctx.size, T // ctx.size, D).permute(2, 0, 1, 3, 4)
        stacked = stacked.reshape(ctx.size * B, H, T // ctx.size, D)   # gloo splits dim 0
        out = grad.new_empty(B, H, T // ctx.size, D)
        REDUCE_SCATTER(out, stacked, group=ctx.group)
        return out, None, None


def _outer_saved_tensor_hooks():
    """The saved-tensor hooks in force (a checkpoint's), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Regather:
    """Saved-tensor hooks: a tensor on the storage of a gathered K or V is kept as this
    rank's part plus its view geometry, and gathered again when backward needs it."""

    def __init__(self, shard: "ContextShard", pairs):
        self.shard, self.pairs = shard, pairs   # [(gathered, local)]

    def pack(self, t):
        for gathered, local in self.pairs:
            if t.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr():
                return (local, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        local, size, stride, offset = packed
        return _gather(local, self.shard.group, self.shard.size).as_strided(size, stride, offset)


class ContextShard(SequenceLayout):
    """cp rank `rank` of `size`: chunks rank and 2 size - 1 - rank of every sequence."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self._cache: dict = {}

    # ------------------------------------------------------------------ the data
    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens or labels -> this rank's (B, T / cp): its two chunks, in order."""
        B, T = tokens.shape
        c = T // (2 * self.size)
        chunks = tokens.reshape(B, 2 * self.size, c)
        return chunks[:, [self.rank, 2 * self.size - 1 - self.rank]].reshape(B, 2 * c)

    def _rank_positions(self, rank: int, T: int, device) -> torch.Tensor:
        c = T // 2
        first, second = rank * c, (2 * self.size - 1 - rank) * c
        return torch.cat((torch.arange(first, first + c, device=device),
                          torch.arange(second, second + c, device=device)))

    def positions(self, T: int, device, dtype=torch.long) -> torch.Tensor:
        """Global positions of the T (= seq / cp) tokens this rank holds."""
        key = ("positions", T, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._rank_positions(self.rank, T, device).to(dtype)
        return self._cache[key]

    def _future(self, T: int, device) -> torch.Tensor:
        """(T, cp T) mask: True where a gathered key lies after the local query."""
        key = ("future", T, str(device))
        if key not in self._cache:
            keys = torch.cat([self._rank_positions(r, T, device) for r in range(self.size)])
            self._cache[key] = keys[None, :] > self.positions(T, device)[:, None]
        return self._cache[key]

    # ------------------------------------------------------------------ attention
    def attend(self, q, k, v, kind: str, dropout: float, training: bool, softcap: float | None = None):
        B, H, T, D = q.shape
        groups = H // k.shape[1]
        hooks = None
        if torch.is_grad_enabled() and _outer_saved_tensor_hooks() is None:
            hooks = _Regather(self, [])
        keys = _GatherKV.apply(k, self.group, self.size)
        values = _GatherKV.apply(v, self.group, self.size)
        future = self._future(T, q.device)
        if groups > 1:   # each kv head's query heads as rows: (B, kv_heads, g x T, D)
            q = q.reshape(B, H // groups, groups * T, D)
            future = future.repeat(groups, 1)
        if hooks is None:
            out = causal_attention(q, keys, values, kind, dropout, training, softcap, future)
        else:
            hooks.pairs = [(keys, k), (values, v)]
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                out = causal_attention(q, keys, values, kind, dropout, training, softcap, future)
        return out.reshape(B, H, T, D)


def apply(part: nn.Module, shard: ContextShard):
    """Point the part's sequence layouts at `shard`: the Decoder's, every block's (also a
    registered family's block that declares none: attention_core reads it) and any other
    module's that has one."""
    blocks = set(part.blocks.values())
    for module in part.modules():
        if module in blocks or isinstance(getattr(module, "sequence", None), SequenceLayout):
            module.sequence = shard

"""AdamW, the learning-rate schedule, global gradient-norm clipping, and the fp16 scaler.

- AdamW (betas 0.9/0.95), weight decay on matrices only. One optimizer per model part
  (a pipeline rank may hold several stage chunks), stepped together. Parameter groups
  are split by decay and by DTensor mesh so foreach kernels never mix meshes. Under ZeRO
  1-3 FSDP hands it the rank's 1/dp shards. On a single CUDA device with
  plain parameters it is `fused=True`, as in the reference loop.
- Learning rate: linear warm-up from lr/warmup to lr over `warmup` steps, then cosine
  decay to `min_lr` at the last step (`LambdaLR`, so its state is checkpointed).
- Gradient norm: the L2 norm over every parameter of the model, each counted once,
  whatever the layout. PyTorch's `clip_grad_norm_` cannot do this across pipeline
  stages and across DTensors on different meshes (FSDP-only vs FSDP x TP, experts over
  (edp, ep)), so each rank adds the squares of the gradient shards it owns - a shard is
  owned along a dp/cp/tp (edp/ep) mesh dimension if it is sharded along it, or else by
  coordinate 0 there - and one
  all-reduce over the world sums them. Clipping then scales the local shards.
- fp16: `torch.amp.GradScaler` in one process; `ShardedGradScaler` (found-inf
  all-reduced over all ranks, so every rank skips the same steps) when distributed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
# Imported here, before any process group exists, never lazily: torch.distributed.optim
# binds dist.group.WORLD as a default argument when first imported (ZeroRedundancyOptimizer),
# torch modules the runtime uses may import it, and a world group bound there could never be
# freed, so its gloo threads would outlive teardown (see mesh.teardown).
import torch.distributed.optim  # noqa: F401
from torch.distributed.tensor import DTensor

BETAS = (0.9, 0.95)


def _group_key(p: torch.Tensor):
    if isinstance(p, DTensor):
        return (id(p.device_mesh), tuple(str(x) for x in p.placements))
    return None


def build_optimizer(part: nn.Module, lr: float, weight_decay: float, fused: bool = False):
    groups: dict = {}
    for p in part.parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2
        groups.setdefault((decay, _group_key(p)), []).append(p)
    param_groups = [dict(params=ps, weight_decay=weight_decay if decay else 0.0)
                    for (decay, _), ps in groups.items()]
    kwargs = dict(fused=True) if fused else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=BETAS, **kwargs)


def lr_lambda(steps: int, warmup: int, min_ratio: float):
    """Multiplier of the base lr for optimizer step s (0-based)."""
    def factor(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        span = max(1, steps - warmup - 1)
        progress = min(1.0, (s - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def owned_square_sum(params, coords: dict, device, skip=frozenset()) -> torch.Tensor:
    """This rank's share of sum(grad ** 2) over all parameters (see module doc)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        g = p.grad
        if g is None or id(p) in skip:
            continue
        if all(coords.get(d, 0) == 0 for d in _copies(g)):
            total += _local(g).detach().float().pow(2).sum().to(device)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


REPLICA_DIMS = {"dp", "cp", "tp"}


def _dims(name: str) -> set:
    """The plan's dimensions a mesh dimension spans: "dp_cp" (runtime.mesh, flattened) both."""
    return set(name.split("_")) if set(name.split("_")) <= REPLICA_DIMS else {name}


def _copies(g: torch.Tensor) -> set:
    """The mesh dimensions along which other ranks hold copies of this rank's shard of `g`:
    dp, cp and tp, less those its DTensor mesh shards it along. An expert's mesh (edp, ep)
    stands for dp (runtime.expert_parallel); a plain or dp-mesh gradient is a copy on each
    edp/ep coordinate only through dp."""
    if not isinstance(g, DTensor):
        return set(REPLICA_DIMS)
    names = set().union(*(_dims(n) for n in g.device_mesh.mesh_dim_names))
    # Shard or _StridedShard (FSDP over TP or over ep); gradients are never Partial here
    sharded = set().union(*(_dims(n) for n, pl in zip(g.device_mesh.mesh_dim_names, g.placements)
                            if not pl.is_replicate()))
    outside = REPLICA_DIMS - names
    if names & {"edp", "ep"}:
        outside = (outside - {"dp"}) | ({"edp", "ep"} - names)
    return (names - sharded) | outside


def clip_gradients(params, max_norm: float, coords: dict, device, distributed: bool, skip=frozenset()) -> float:
    """Global gradient L2 norm (before clipping); scales gradients down to max_norm if above it."""
    params = list(params)
    sq = owned_square_sum(params, coords, device, skip)
    if distributed:
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coef)
    return norm


def make_scaler(precision: str, device: torch.device, distributed: bool):
    if precision != "fp16":
        return None
    if distributed:
        import warnings
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        # its found-inf flag meets DTensor gradients as a one-element tensor; DTensor says so on every step
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        return ShardedGradScaler(device.type, process_group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type)

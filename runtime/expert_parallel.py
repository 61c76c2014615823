"""Expert parallelism: each rank of an ep group holds a contiguous slice of every MoE
block's routed experts, and the routed tokens travel to the rank of their expert and
back by all-to-all.

The layout (the plan's, planner.plan `_check_expert_parallel`): ep is the innermost part
of dp - dp coordinate d is (edp, ep) = divmod(d, ep) - so an ep group is ep consecutive
data-parallel ranks, and the ranks with the same ep coordinate ("edp", dp / ep of them)
hold the same expert slice: rank r of a group holds experts [r E/ep, (r+1) E/ep). The
expert weights become DTensors sharded on dim 0 over the "ep" dimension of a mesh of
their own (`expert_mesh`: the plan's mesh with dp unflattened into (edp, ep)), so a
checkpoint holds the whole (E, ...) tensors and resumes under any plan; data parallelism
over "edp" wraps them as FSDP2 wraps a tensor-parallel weight (runtime.parallelize).

One MoE block's step 3 (planner/arch/moe.py: `dispatcher(routed, counts, experts)`), as
torchtitan's AllToAllTokenDispatcher runs it (torchtitan/models/common/token_dispatcher.py
at b5bcd76; before #3386 torchtitan/distributed/expert_parallel.py) and Megatron-Core's
MoEAlltoAllTokenDispatcher (megatron/core/transformer/moe/token_dispatcher.py):
1. exchange the per-expert counts: an all-to-all of E integers, so each rank learns how
   many tokens every rank sends to each of its local experts (the split sizes);
2. dispatch: all_to_all_single of the routed tokens (sorted by global expert, so the run
   for rank r's experts is contiguous) with those splits;
3. regroup what arrived from rank-major ((src 0: e0, e1), (src 1: e0, e1)) to expert-major
   order and run the local experts on it;
4. combine: the reverse permutation and the reverse all-to-all, back in the sender's order.
Both all-to-alls are differentiable (their backward is the reverse all-to-all):
`torch.distributed._functional_collectives.all_to_all_single_autograd`, the same on the
runtime's torch floor (2.10) and 2.13 on gloo and NCCL.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from cost_models.errors import MeshplanError
from planner.arch.moe import MoE, Experts
from planner.plan import Plan

EXPERT_DIMS = ("edp", "ep")


def expert_dims(plan: Plan) -> list[str]:
    """The expert mesh's dimensions: the plan's rank order with dp split into (edp, ep),
    ep inner, so the row-major position of a rank is the same as in the plan's mesh."""
    dims = []
    for d in plan.rank_order:
        dims.extend(EXPERT_DIMS if d == "dp" else (str(d),))
    return dims


def expert_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """A second device mesh over the same ranks, for the expert weights and their groups.
    Its own root (not a sub-mesh of the plan's), because FSDP2 combines a DTensor weight's
    mesh with its data-parallel mesh only when both hang from one root; every rank builds
    it, in the same order, right after the plan's (runtime.mesh.setup)."""
    sizes = {"pp": plan.pp, "cp": plan.cp, "tp": plan.tp, "edp": plan.edp, "ep": plan.ep}
    dims = expert_dims(plan)
    return init_device_mesh(device_type, tuple(sizes[d] for d in dims), mesh_dim_names=tuple(dims))


def check(name: str, module: nn.Module, plan: Plan):
    """What an ep plan needs of the model (`module`, on the meta device will do), checked
    before any process group starts: MoE layers (planner.arch.moe.MoE, in a zoo model or
    inside a file.py:factory one), each with a number of experts ep divides."""
    if plan.ep == 1:
        return
    layers = moe_layers(module)
    if not layers:
        raise MeshplanError(f"ep {plan.ep} needs a Mixture-of-Experts model ({name} has no "
                            f"planner.arch.moe.MoE layers): use ep 1")
    for moe in layers:
        if moe.num_experts % plan.ep:
            raise MeshplanError(f"ep {plan.ep} must divide the model's {moe.num_experts} experts: change ep")


class ExpertSlice(Experts):
    """This rank's experts of one block: the same SwiGLU arithmetic (Experts.forward), on
    the local shards of the (E, ...) DTensor weights. FSDP's hooks around `__call__` gather
    them over edp first (ZeRO 3) and hand back the unsharded weight - a DTensor on the ep
    mesh - whose local tensor holds exactly this rank's experts.

    Their gradient is scaled by 1/ep on its way back (`grad_scale`). A slice's gradient sums
    the tokens of its whole ep group (the combine all-to-all's backward brings them home),
    so data parallelism's average over the edp ranks would divide that sum by edp where the
    rest of the model divides by dp: with 1/ep first, the step is one process's on the whole
    batch. Megatron-Core scales expert gradients by edp/dp the same way
    (megatron/core/distributed/distributed_data_parallel.py, expert_gradient_scaling_factor);
    torchtitan sets FSDP's divide factor instead, which gloo cannot run (NCCL's PREMUL_SUM)
    and which torch 2.13 applies twice when edp is 1
    (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, `foreach_reduce`)."""

    grad_scale = 1.0

    def forward(self, tokens, counts: list[int]):
        # in the tokens' dtype: FSDP casts the weights it manages (edp > 1), not these when edp is 1
        w = [_ScaleGrad.apply(_local(p), self.grad_scale).to(tokens.dtype)
             for p in (self.w_gate, self.w_up, self.w_down)]
        return Experts.forward(SimpleNamespace(w_gate=w[0], w_up=w[1], w_down=w[2], act=self.act), tokens, counts)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _slice(experts: Experts, ep_mesh: DeviceMesh) -> ExpertSlice:
    """The rank's contiguous slice of `experts` as DTensor parameters sharded on dim 0."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    total = experts.w_gate.shape[0]
    per = total // ep
    hidden, ffn = experts.w_gate.shape[1], experts.w_gate.shape[2]
    mine = ExpertSlice(per, hidden, ffn, "silu", device=experts.w_gate.device)   # act: the model's, below
    mine.act, mine.init_std, mine.grad_scale = experts.act, experts.init_std, 1.0 / ep
    for name in ("w_gate", "w_up", "w_down"):
        full = getattr(experts, name)
        part = full.detach()[rank * per:(rank + 1) * per].clone()
        # every rank built the same full weights from the seed: each keeps its rows, no traffic
        dt = DTensor.from_local(part, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
        setattr(mine, name, nn.Parameter(dt, requires_grad=full.requires_grad))
    return mine


class AllToAllDispatcher:
    """`MoE.dispatcher` under expert parallelism (see the module docstring)."""

    def __init__(self, ep_mesh: DeviceMesh):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def __call__(self, routed: torch.Tensor, counts: list[int], experts: nn.Module) -> torch.Tensor:
        ep = self.ep
        local = len(counts) // ep
        # 1. counts: sent[r * local + e] tokens go to rank r's local expert e; got[s][e] come from rank s
        sent = torch.tensor(counts, dtype=torch.int64, device=routed.device)
        got = wait_tensor(all_to_all_single(sent, None, None, self.group)).view(ep, local).tolist()
        input_splits = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
        output_splits = [sum(row) for row in got]
        # 2. dispatch
        received = all_to_all_single_autograd(routed, output_splits, input_splits, self.group)
        # 3. rank-major -> expert-major, the local experts, and back
        order = _expert_major(got, routed.device)
        local_counts = [sum(got[s][e] for s in range(ep)) for e in range(local)]
        out = experts(received[order], local_counts)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        # 4. combine
        return all_to_all_single_autograd(out[back], input_splits, output_splits, self.group)


def _expert_major(got: list[list[int]], device) -> torch.Tensor:
    """Indices that reorder the received tokens, laid out source-rank-major (for each source
    rank its run per local expert), expert-major (for each local expert its run per source)."""
    starts, at = [], 0
    for row in got:
        starts.append([])
        for n in row:
            starts[-1].append(at)
            at += n
    runs = [torch.arange(starts[s][e], starts[s][e] + got[s][e], device=device)
            for e in range(len(got[0])) for s in range(len(got))]
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64, device=device)


def moe_layers(part: nn.Module) -> list[MoE]:
    return [m for m in part.modules() if isinstance(m, MoE)]


def apply_expert_parallel(part: nn.Module, emesh: DeviceMesh):
    """Give every MoE block of `part` its expert slice and the all-to-all dispatcher."""
    ep_mesh = emesh["ep"]
    dispatcher = AllToAllDispatcher(ep_mesh)
    for moe in moe_layers(part):
        moe.experts = _slice(moe.experts, ep_mesh)
        moe.dispatcher = dispatcher


def expert_modules(part: nn.Module) -> list[nn.Module]:
    """The expert slices of `part` (after apply_expert_parallel), for data parallelism over edp."""
    return [moe.experts for moe in moe_layers(part) if isinstance(moe.experts, ExpertSlice)]

"""Pipeline parallelism with torch.distributed.pipelining.

The plan's `stages` ([first, end) block ranges per virtual stage; [] = an even split)
cut the Decoder into stage modules that keep the original module names ("blocks.7.qkv"),
so checkpoints are the same whatever the cut. Virtual stage v runs on pipeline rank
v % pp (interleaved: each rank holds `interleave` chunks). Each stage module is a
manual `PipelineStage`; the schedule is the plan's: ScheduleGPipe, Schedule1F1B or
ScheduleInterleaved1F1B, run over `grad_accum` micro-batches with the loss computed on
the last stage exactly as the Decoder computes it (cross-entropy on fp32 logits).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from planner.plan import Plan, check_schedule, even_stages  # noqa: F401  (check_schedule: the engine's)
from planner.torch_compat import pipeline_divides_partial_grads


def stage_ranges(plan: Plan, num_layers: int) -> list:
    return [list(r) for r in plan.stages] if plan.stages else even_stages(num_layers, plan.virtual_stages)


def local_stages(plan: Plan, pp_rank: int) -> list[int]:
    """Virtual stage indices that pipeline rank `pp_rank` runs (loop placement)."""
    return [pp_rank + k * plan.pp for k in range(plan.interleave)]


def cut(full: nn.Module, first: int, end: int, is_first: bool, is_last: bool) -> nn.Module:
    """A copy of the Decoder holding blocks [first, end) and the ends it owns."""
    part = copy.deepcopy(full)
    for key in list(part.blocks):
        if not first <= int(key) < end:
            del part.blocks[key]
    if not is_first:
        part.tok = None
        part.pos = None
    if not is_last:
        part.norm = None
        part.head = None
    return part


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def build_schedule(plan: Plan, modules: dict, rt, loss, carries_inputs: bool = False):
    """modules: {virtual stage index: module to run}; loss(logits, targets) -> scalar.
    `carries_inputs`: the stages hand on the model's own inputs (runtime.split), labels say."""
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    group = rt.group("pp")
    stage_class = _stage_class(carries_inputs)
    stages = [stage_class(module, stage_index=v, num_stages=plan.virtual_stages, device=rt.device, group=group)
              for v, module in sorted(modules.items())]
    n = plan.grad_accum
    kw = dict(n_microbatches=n, loss_fn=loss, scale_grads=pipeline_divides_partial_grads())
    if plan.schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, **kw), stages
    cls = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], **kw), stages


def _stage_class(zero_filled: bool):
    """PipelineStage, or one whose metadata inference runs on zeros. torch >= 2.13 infers a
    stage's output shapes by running it once on `torch.empty` inputs (torch/distributed/
    pipelining/stage.py, PipelineStage._forward_metadata_inference and _to_tensor); a model
    whose labels ride through the stages (runtime.split) would then compute its loss on
    garbage class ids and fail on the bounds check. Zeros are valid ids (and valid anything)."""
    from torch.distributed.pipelining import PipelineStage
    if not zero_filled or not hasattr(PipelineStage, "_to_tensor"):
        return PipelineStage

    class ZeroFilledInference(PipelineStage):
        def _to_tensor(self, arg):
            t = super()._to_tensor(arg)
            if not isinstance(arg, torch.Tensor):
                with torch.no_grad():
                    (t.to_local() if isinstance(t, DTensor) else t).zero_()
            return t

    return ZeroFilledInference


def divide_grads(schedule, modules: dict, n: int):
    """After a schedule's step: divide the gradients by the `n` micro-batches where the
    schedule did not (`scale_grads=False`, see planner.torch_compat.pipeline_divides_partial_grads),
    stage by stage as torch's `PipelineStage.scale_grads` does, on each gradient's local
    tensor (a Partial(sum) DTensor's parts divide as its sum does)."""
    if schedule.scale_grads or n == 1:
        return
    with torch.no_grad():
        for _, module in sorted(modules.items()):
            for p in module.parameters():
                if p.grad is not None:
                    (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).div_(n)

"""meshplan's own runtime (runtime/): torch DDP-style `replicate` or FSDP2 for ZeRO 1-3,
DTensor tensor parallelism with any layout the TP-layout ILP picks, torch.distributed.pipelining
schedules, torch.utils.checkpoint recompute, torch.compile per block, context parallelism,
torchao float8. Everything the planner can propose, within `runtime_limits`."""
import torch

from planner.engines.base import DEFAULT_ENGINE, Engine, register
from planner.engines.execution import MESHPLAN_RUNTIME


def runtime_limits(plan) -> str | None:
    """The combinations runtime/ cannot train (runtime.compiling applies them too):
    - compile with cp > 1: the context-parallel attention reads the saved-tensor hooks in
      force (torch._C._autograd._top_saved_tensors_default_hooks), a C function dynamo
      skips, so the block's full graph breaks (torch 2.13, gloo, cp 2);
    - compile with tp > 1 and full or attention-core recomputation (a plain
      torch.utils.checkpoint region inside the compiled block): AOTAutograd saves the
      DTensor's DeviceMesh among the checkpointed tensors and fails the first forward
      ("expected all tensors_saved_with_vc_check to be Tensors"; torch 2.13, gloo, tp 2).
      Selective recomputation (a context_fn policy) trains to eager's losses."""
    if not plan.compile:
        return None
    if plan.cp > 1:
        return (f"compile with cp {plan.cp} is not supported: the context-parallel attention's saved-tensor "
                f"hooks break torch.compile's full graph; drop compile or cp")
    modes = sorted({mode for mode in plan.checkpoint if mode in ("full", "attention")})
    if plan.tp > 1 and modes:
        return (f"compile with tp {plan.tp} and {' and '.join(modes)} recomputation fails in torch "
                f"{torch.__version__}'s AOTAutograd (a DTensor's mesh saved with the checkpointed tensors): "
                f"use selective recomputation, or drop compile or tp")
    return None


MESHPLAN = register(Engine(name=DEFAULT_ENGINE, describes="this meshplan's runtime (runtime/)",
                           execution=MESHPLAN_RUNTIME, precisions=("fp32", "bf16", "fp16", "fp8"),
                           fp8_recipes=("tensorwise", "rowwise"), limits=runtime_limits))

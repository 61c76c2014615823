"""meshplan's own runtime (runtime/): torch DDP-style `replicate` or FSDP2 for ZeRO 1-3,
DTensor tensor parallelism with any layout the TP-layout ILP picks, torch.distributed.pipelining
schedules, torch.utils.checkpoint recompute. Everything the planner can propose."""
from planner.engines.base import DEFAULT_ENGINE, Engine, register
from planner.engines.execution import MESHPLAN_RUNTIME

MESHPLAN = register(Engine(name=DEFAULT_ENGINE, describes="this meshplan's runtime (runtime/)",
                           execution=MESHPLAN_RUNTIME, precisions=("fp32", "bf16", "fp16", "fp8"),
                           fp8_recipes=("tensorwise", "rowwise")))

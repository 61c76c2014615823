"""simulate(plan, model, cluster): step time, throughput and per-GPU memory of one plan.

Modules: step (the step-time simulation, simulate and prepare), memory (per-GPU memory),
communication (exposed time and bytes of every collective), traces (the traces it prices, cached),
costing (per-layer times), schedule (pipeline schedules as an event simulation), fsdp
(when FSDP2 gathers and reduces), batch_scaling (traces at any micro-batch size), experts
(expert parallelism), context (context parallelism: attention re-priced, the K/V exchange).
How an engine runs a plan (Execution) is planner.engines'; the plan's engine picks it.
"""
from planner.engines import MEGATRON_2021, MESHPLAN_RUNTIME, Execution
from planner.simulate.memory import ALLOCATOR_RESERVED_RATIO, CUDA_CONTEXT_BYTES, HeldStates, StageMemory
from planner.simulate.step import PHASE_WORDS, SimResult, prepare, prepare_unchecked, simulate
from planner.simulate.traces import expand_blocks, model_key, trace_cached, trace_spec

__all__ = ["simulate", "prepare", "prepare_unchecked", "SimResult", "StageMemory", "HeldStates", "Execution", "MESHPLAN_RUNTIME",
           "MEGATRON_2021", "PHASE_WORDS", "ALLOCATOR_RESERVED_RATIO", "CUDA_CONTEXT_BYTES", "trace_spec",
           "expand_blocks", "trace_cached", "model_key"]

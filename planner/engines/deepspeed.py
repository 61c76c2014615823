"""DeepSpeed (deepspeedai/DeepSpeed at edaa722, Aug 2026) training a model with its engine,
as a ds_config.json configures it:
- ZeRO 0-3 (`zero_optimization.stage`); its PipelineEngine refuses ZeRO-2 and -3
  (deepspeed/runtime/pipe/engine.py: "ZeRO-2 and ZeRO-3 are incompatible with pipeline
  parallelism") and runs one schedule, TrainSchedule (1F1B; deepspeed/runtime/pipe/schedule.py);
- `zero_optimization.overlap_comm` defaults to true for stage 3 only
  (deepspeed/runtime/zero/config.py, overlap_comm_valid); otherwise gradients are reduced
  after backward;
- fp16/bf16 module weights and gradients with fp32 master weights in the optimizer;
- pipeline sends are blocking `dist.send` (deepspeed/runtime/pipe/p2p.py), and with model
  parallelism each rank sends its 1/tp share of the boundary (`pipe_partitioned`, default on);
- activation checkpointing reruns the whole layer (deepspeed.checkpointing, reentrant);
- tensor parallelism is Megatron's layout (Megatron-DeepSpeed's mpu or AutoTP), no sequence
  parallelism in Megatron's sense; optimizer offload is `offload_optimizer` (ZeRO-Offload).
The model is the user's PyTorch code, so its kernels are eager PyTorch's (no Megatron fusions).
DeepSpeed-MoE's expert parallelism (deepspeed/moe/sharded_moe.py) is GShard's: top-1/top-2
gating into capacity-padded (experts x capacity) buffers by einsum, with an all-to-all of the
padded buffers (`_AllToAll`) and, without token dropping, an all-reduce of the largest
expert load first; meshplan prices the dropless dispatch of torchtitan and Megatron-Core,
not that, so plans with ep > 1 are refused for this engine.
Its long-sequence parallelism is Ulysses (deepspeed/sequence/layer.py DistributedAttention:
all-to-alls that split the heads), not context parallelism's K/V exchange, so plans with
cp > 1 are refused for it too.
Its `engine.compile()` (deepspeed/runtime/engine.py) compiles the whole module, with graph
breaks at its ZeRO hooks, not each block: a plan's compile is refused for it.
"""
from planner.engines.base import Engine, EngineOption, register
from planner.engines.execution import Execution

DEEPSPEED_EXECUTION = Execution(overlap_dp_comm=False, cast="params", blocking_p2p=True, p2p_scatter_gather=True,
                                recompute_stops_early=False, replicate_copies_params=False)

DEEPSPEED = register(Engine(
    name="deepspeed", describes="DeepSpeed's engine and PipelineEngine (deepspeedai/DeepSpeed edaa722, 2026-08)",
    execution=DEEPSPEED_EXECUTION,
    options={"overlap_comm": EngineOption(
        "overlap_dp_comm", {False: False, True: True}, False,
        "zero_optimization.overlap_comm: reduce gradients during backward (DeepSpeed turns it on for stage 3)")},
    zero_defaults={3: {"overlap_comm": True}}, pipeline_zero=(0, 1), schedules=("1f1b",), recompute=("full",), sequence_parallel=False,
    searched_tp_layout=False, micro_batch_per_stage=False, expert_zero=(),
    expert_refusal="DeepSpeed-MoE's capacity-padded GShard dispatch, deepspeed/moe/sharded_moe.py",
    context_refusal="its sequence parallelism is Ulysses' head all-to-all, deepspeed/sequence/layer.py",
    compile_refusal="engine.compile() compiles the whole module, deepspeed/runtime/engine.py"))


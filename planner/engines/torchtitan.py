"""torchtitan (pytorch/torchtitan at b5bcd76, Aug 2026): the same PyTorch-native pieces as
meshplan's runtime - FSDP2 (`fully_shard`), DTensor tensor parallelism, torch.distributed.pipelining,
torch.utils.checkpoint - so it runs a plan as meshplan's runtime does, with fewer choices:
- FSDP2 shards parameters, gradients and optimizer state together: ZeRO-3, or ZeRO-2 with
  `parallelism.fsdp_reshard_after_forward = "never"`; there is no ZeRO-1, and pure data
  parallelism is `data_parallel_replicate_degree` (torchtitan/config/configs.py);
- `training.mixed_precision_param` is "bfloat16" or "float32": no fp16 (no loss scaling);
- fp8 is torchao's float8 through Float8LinearConverter (components/quantization/float8.py):
  tensorwise (with FSDP2's float8 all-gather) or rowwise. b5bcd76 offers recipe_name
  "rowwise" (or "rowwise_with_gw_hp") only, so the export (planner.interop.torchtitan_export) refuses
  tensorwise; torchtitan until 2025 ran tensorwise, which its published Float8 benchmarks
  (benchmarks/llama3_h100_202412_torchtitan.md, asyncTP_llama3_h100_2025-06) measured; its
  docs (float8.md) require compile for competitive speed;
- activation checkpointing is none, selective (op-level: SelectiveAC) or full (FullAC)
  (torchtitan/distributed/activation_checkpoint.py); no attention-core mode;
- each model's parallelize.py applies a fixed Megatron-style TP plan, not a searched layout;
- `training.enable_cpu_offload` is FSDP2's CPUOffloadPolicy (meshplan's offload_optimizer);
- expert parallelism (`parallelism.expert_parallel_degree`) is carved out of the FSDP ranks
  (torchtitan/distributed/parallel_dims.py: ep must divide dp_shard * cp * tp; the experts are
  fully_shard-ed over "efsdp"), so it needs ZeRO 2 or 3, not pure replication; the tokens move
  by AllToAllTokenDispatcher (torchtitan/models/common/token_dispatcher.py);
- context parallelism (`parallelism.context_parallel_degree`, head-tail load balancing,
  torchtitan/distributed/context_parallel/api.py) runs torch's context_parallel on SDPA, whose
  default rotate method all-gathers K and V (exposed, as in meshplan's runtime); FSDP shards
  over dp_shard x cp whenever cp > 1 (torchtitan/distributed/parallel_dims.py), so ZeRO 2 or 3;
- `compile.enable` with "model" in compile.components compiles each TransformerBlock after
  TP and AC, before FSDP (torchtitan/distributed/compile.py apply_compile), as meshplan's runtime
  does (Plan.compile; planner.simulate.fusion). Its default components also compile the loss,
  which meshplan leaves eager (the head is priced as eager PyTorch runs it).
"""
from planner.engines.base import Engine, register
from planner.engines.execution import MESHPLAN_RUNTIME

TORCHTITAN = register(Engine(
    name="torchtitan", describes="torchtitan (pytorch/torchtitan b5bcd76, 2026-08)", execution=MESHPLAN_RUNTIME,
    zero=(0, 2, 3), pipeline_zero=(0, 2, 3), recompute=("selective", "full"), precisions=("fp32", "bf16", "fp8"),
    fp8_recipes=("tensorwise", "rowwise"),
    searched_tp_layout=False, expert_zero=(2, 3), context_zero=(2, 3)))

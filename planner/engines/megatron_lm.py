"""Megatron-LM, at two versions: `megatron-lm` (Megatron-Core's training loop, 2024-26:
NVIDIA/Megatron-LM at d98e8a6, Aug 2026) and `megatron-lm@2021` (the v2 code the SC21 paper
and vTrain's Megatron-DeepSpeed runs measured). Sources are files of NVIDIA/Megatron-LM.

What both do, and meshplan's runtime does not:
- fp16/bf16 parameters and gradients (Float16Module), fp32 master weights in the optimizer;
- the gradient all-reduce after backward unless told to overlap it (2021: `--DDP-impl torch`;
  Megatron-Core: `--overlap-grad-reduce`, DistributedDataParallelConfig.overlap_grad_reduce
  = False in megatron/core/distributed/distributed_data_parallel_config.py);
- blocking pipeline sends: batch_isend_irecv, every request waited on, then
  torch.cuda.synchronize() (megatron/core/pipeline_parallel/p2p_communication.py,
  batch_p2p_sync = True in megatron/core/model_parallel_config.py);
- reentrant full recompute that reruns the whole block (tensor_parallel.random.CheckpointFunction);
- its fused kernels (Execution.megatron_kernels) and per-micro-batch host work below;
- no second copy of the parameters for data parallelism (its own DDP over one grad buffer);
- a 1F1B warm-up of min(pp - rank - 1, micro-batches), so fewer micro-batches than stages run.
What changed: the distributed optimizer (ZeRO-1, 2022), sequence parallelism and selective
(attention-core) recompute (Korthikanti et al. 2022) exist only in Megatron-Core; the 2021
code runs the unfused core attention (baddbmm, fused scale-mask-softmax, dropout, bmm) and
sends 1/tp of each pipeline boundary per TP rank with an all-gather after (scatter/gather,
Narayanan et al. 2021 Sec. 4.1), which Megatron-Core's p2p_communication.py no longer does;
Megatron-Core runs Transformer Engine's fused (flash) attention by default
(TransformerConfig.attention_backend = auto in megatron/core/transformer/transformer_config.py).
Expert parallelism is Megatron-Core's (`--expert-model-parallel-size`, folded into the
data-parallel ranks: megatron/core/parallel_state.py expert groups) with the all-to-all
token dispatcher (megatron/core/transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher)
and its default `moe_shared_expert_overlap = False` (shared experts not hidden behind the
all-to-alls); its small all-to-all of the routing probabilities (4 bytes a routed row beside
the tokens' 2 x hidden) is not priced. The 2021 code has no expert parallelism.
Context parallelism is Megatron-Core's (`--context-parallel-size`, megatron/training/arguments.py;
the sequence in 2 x cp load-balanced chunks): Transformer Engine's attention with the default
`--cp-comm-type p2p`, a ring of K/V exchanges overlapping the attention compute
(megatron/core/extensions/transformer_engine.py passes cp_comm_type to TE's
DotProductAttention; TransformerConfig.cp_comm_type's docstring: "P2P is async and can be
overlapped with attention compute"): Execution.cp_overlap. The 2021 code has none.
FP8 is Megatron-Core's Transformer Engine path (`--fp8-format hybrid`, TransformerConfig.fp8 in
megatron/core/transformer/transformer_config.py; `--fp8-recipe` tensorwise or the default
delayed, both one scale a tensor: priced as meshplan's tensorwise) with TE's fused cast kernels
and bf16 parameter gathers (`--fp8-param-gather` off by default); the 2021 code has no FP8.
"""
from planner.engines.base import Engine, EngineOption, register
from planner.engines.execution import Execution

# Megatron-LM's per-micro-batch host work, counted launch by launch in its code (2021-22):
# - batch (pretrain_gpt.get_batch, every stage): the sizes' H2D copy, broadcast and D2H
#   read-back, the tokens' H2D copy and broadcast, two .contiguous() for tokens/labels, and
#   get_ltor_masks_and_position_ids' ones, tril, ones (loss mask), arange and `< 0.5`: 12.
#   Its 'batch-generator' and 'forward-compute' timers call torch.cuda.synchronize().
# - loss forward: mpu.vocab_parallel_cross_entropy issues 20 launches (max, three
#   all-reduces, sub_, masks, clone, two masked fills, arange, gather, clone, exp, sum, log,
#   sub, div_) where the trace has 2; loss_func and average_losses_across_data_parallel_group
#   add 8 (mul, two sums, div, clone, cat, all-reduce, div) and the schedule 1 (/ num
#   micro-batches): 18 + 8 + 1 = 27.
# - loss backward: the cross-entropy's 7 (arange, float, rsub, index, sub, index_put, mul_),
#   the loss scaling (1) and the gradients of loss_func's and the schedule's ops (5), where the
#   trace's two loss ops count for ~3: 10.
MEGATRON_BATCH_HOST_OPS = 12
MEGATRON_LOSS_HOST_OPS = (27, 10)
# Megatron's kernels (megatron_kernels), on by default in its arguments (the --no-*-fusion
# flags turn them off; examples/sc21 and vTrain's model keep them on):
# - attention: FusedScaleMaskSoftmax runs its CUDA kernels
#   (megatron/fused_kernels/scaled_upper_triang_masked_softmax*.cu, scaled_masked_softmax*.cu)
#   for fp16/bf16 scores: scale, causal mask and softmax in one pass over the scores; q, k
#   and v stay [seq, batch, heads, head_dim] views into the QKV projection's output, which
#   baddbmm and bmm read strided;
# Megatron-Core's get_batch (pretrain_gpt.py, megatron/core/utils.py get_batch_on_this_tp_rank)
# broadcasts tokens, labels, loss mask, attention mask and positions from TP rank 0 on the
# first and last stages only; the 2021 count is kept for every stage (it over-counts the
# middle stages' host time by about 12 launches per micro-batch, ~0.1 ms).
MEGATRON_EXECUTION = Execution(overlap_dp_comm=False, cast="params", blocking_p2p=True, p2p_scatter_gather=False,
                               batch_host_ops=MEGATRON_BATCH_HOST_OPS, loss_host_ops=MEGATRON_LOSS_HOST_OPS,
                               megatron_kernels=True, recompute_stops_early=False, replicate_copies_params=False,
                               attention="sdpa", cp_overlap=True, fp8_fused_casts=True, fp8_param_gather=False)
MEGATRON_2021 = Execution(overlap_dp_comm=False, cast="params", blocking_p2p=True, p2p_scatter_gather=True,
                          batch_host_ops=MEGATRON_BATCH_HOST_OPS, loss_host_ops=MEGATRON_LOSS_HOST_OPS,
                          megatron_kernels=True, recompute_stops_early=False, replicate_copies_params=False,
                          attention="unfused")

_OVERLAP = {False: False, True: True}
# Megatron-LM torch.compiles only its small fused functions (megatron/core/jit.py: jit_fuser =
# torch.compile on bias_gelu, bias_dropout_add, swiglu), which megatron_kernels prices; it never
# compiles a whole block, so a plan's compile is refused.
MEGATRON_COMPILE = "it compiles only its own fused functions, megatron/core/jit.py jit_fuser, priced as its kernels"
MEGATRON_LM = register(Engine(
    name="megatron-lm", describes="Megatron-Core training (NVIDIA/Megatron-LM d98e8a6, 2026-08)",
    execution=MEGATRON_EXECUTION,
    options={
        "overlap_grad_reduce": EngineOption(
            "overlap_dp_comm", _OVERLAP, False,
            "--overlap-grad-reduce: reduce gradient buckets during backward"),
        "attention_backend": EngineOption(
            "attention", {"auto": "sdpa", "flash": "sdpa", "fused": "sdpa", "unfused": "unfused", "local": "unfused"},
            "auto", "--attention-backend: Transformer Engine's fused kernels (auto, flash, fused) or the unfused "
                    "core attention (unfused, local)")},
    zero=(0, 1), pipeline_zero=(0, 1), schedules=("1f1b", "interleaved"), recompute=("attention", "full"),
    precisions=("fp32", "bf16", "fp16", "fp8"), fp8_recipes=("tensorwise",),
    offload_optimizer=False, searched_tp_layout=False, micro_batch_per_stage=False, expert_zero=(0, 1),
    compile_refusal=MEGATRON_COMPILE))
MEGATRON_LM_2021 = register(Engine(
    name="megatron-lm@2021", describes="Megatron-LM v2 as SC21's examples/sc21 and vTrain's runs used it",
    execution=MEGATRON_2021,
    options={"ddp_impl": EngineOption("overlap_dp_comm", {"local": False, "torch": True}, "local",
                                      "--DDP-impl: local (all-reduce after backward) or torch (DDP's buckets "
                                      "overlap backward)")},
    zero=(0,), pipeline_zero=(0,), schedules=("1f1b", "interleaved"), recompute=("full",),
    sequence_parallel=False, offload_optimizer=False, searched_tp_layout=False, micro_batch_per_stage=False,
    expert_zero=(), expert_refusal="Megatron-LM v2 of 2021 has no Mixture-of-Experts layers",
    context_refusal="Megatron-LM v2 of 2021 predates --context-parallel-size",
    compile_refusal=MEGATRON_COMPILE))

"""Execution profiles: how a training framework runs a plan where frameworks differ
(meshplan's runtime, MESHPLAN_RUNTIME, and Megatron-LM as of 2021, MEGATRON_2021)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Execution:
    """How a training framework runs a plan, where frameworks differ. The default is
    meshplan's runtime; MEGATRON_2021 is Megatron-LM as the measured runs used it.

    overlap_dp_comm: the gradient all-reduce runs in buckets during backward (torch DDP)
        rather than after it.
    cast: how the low precision is applied (planner.plan.CASTS); None = `plan.cast`.
        "params" with ZeRO 0 is Megatron's fp16 training: fp16 parameters and gradients,
        fp32 master weights in the optimizer (the model-state memory stays meshplan's).
    blocking_p2p: a pipeline send holds its rank until the transfer is done (Megatron waits
        on every batched isend/irecv, then torch.cuda.synchronize()); else sends run
        beside compute and delay only the receiver (torch.distributed.pipelining).
    p2p_scatter_gather: with tp > 1 each rank of a TP group sends 1/tp of the (replicated)
        boundary activation and the receivers all-gather it over the TP group
        (Megatron's scatter/gather optimisation, Narayanan et al. 2021 Sec. 4.1).
    batch_host_ops: launches per micro-batch, on every pipeline stage, that fetch the batch
        and build its masks; charged at the calibration's host time per op and never hidden
        behind the GPU, because the framework synchronises the device around them.
    loss_host_ops: (forward, backward) launches per micro-batch that the framework's loss
        adds to the traced head (whose loss is one log_softmax + nll_loss); they join the
        head's host time, so they hide behind a device-bound head.
    recompute_stops_early: a fully checkpointed block's recomputation stops once the last
        tensor backward needs is rebuilt (torch.utils.checkpoint, non-reentrant), so the
        block's last collective - its MLP output's reduction - is not issued again
        (measured: tests/parity/test_comm_volume.py); Megatron-LM's reentrant checkpoint reruns the
        whole forward.
    replicate_copies_params: ZeRO 0 with dp > 1 runs torch's FSDP-based `replicate`, which
        keeps a second (unsharded) copy of the parameters from forward to backward
        (planner.simulate.fsdp.drive; measured: tests/parity/test_state_bytes.py); Megatron-LM's DDP reduces
        gradients of the one copy.
    megatron_kernels: the framework runs Megatron-LM's kernels where eager PyTorch runs
        several ops (planner.simulate.costing._as_megatron_kernels): the causal mask applied inside
        its softmax kernel and built once per micro-batch, attention's batched products
        reading q, k and v as strided views (no copies), and each residual branch's dropout
        fused with its residual add.
    """

    overlap_dp_comm: bool = True
    cast: str | None = None
    blocking_p2p: bool = False
    p2p_scatter_gather: bool = False
    batch_host_ops: int = 0
    loss_host_ops: tuple[int, int] = (0, 0)
    megatron_kernels: bool = False
    recompute_stops_early: bool = True
    replicate_copies_params: bool = True


MESHPLAN_RUNTIME = Execution()
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
# - residual branches: bias_dropout_add_fused_train (torch.jit.script), one kernel.
MEGATRON_2021 = Execution(overlap_dp_comm=False, cast="params", blocking_p2p=True, p2p_scatter_gather=True,
                          batch_host_ops=MEGATRON_BATCH_HOST_OPS, loss_host_ops=MEGATRON_LOSS_HOST_OPS,
                          megatron_kernels=True, recompute_stops_early=False, replicate_copies_params=False)

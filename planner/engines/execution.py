"""Execution: how a training engine runs a plan, where engines differ (the knobs the
simulator reads). Each engine's profile (planner/engines/<engine>.py) sets them from that
engine's code; MESHPLAN_RUNTIME is meshplan's own runtime."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Execution:
    """How a training engine runs a plan, where engines differ. The defaults are meshplan's
    runtime (MESHPLAN_RUNTIME).

    overlap_dp_comm: the gradient all-reduce runs in buckets during backward (torch DDP)
        rather than after it. It prices ZeRO 0's all-reduce; ZeRO 1-3 reductions are priced
        as FSDP2 schedules them (planner.simulate.fsdp) for every engine.
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
    attention: the core-attention kernel the engine runs whatever the model config says
        (planner.models.ATTENTION_KINDS: "sdpa" = one fused kernel, "unfused" = Megatron-LM's
        baddbmm-softmax-dropout-bmm); None = the model's own.
    replicate_copies_params: ZeRO 0 with dp > 1 runs torch's FSDP-based `replicate`, which
        keeps a second (unsharded) copy of the parameters from forward to backward
        (planner.simulate.fsdp.drive; measured: tests/parity/test_state_bytes.py); Megatron-LM's DDP reduces
        gradients of the one copy.
    megatron_kernels: the framework runs Megatron-LM's kernels where eager PyTorch runs
        several ops (planner.simulate.costing._as_megatron_kernels): the causal mask applied inside
        its softmax kernel and built once per micro-batch, attention's batched products
        reading q, k and v as strided views (no copies), and each residual branch's dropout
        fused with its residual add.
    cp_overlap: context parallelism's K/V exchange runs as a ring of point-to-point steps
        beside the attention kernels (Transformer Engine's cp_comm_type "p2p"): only what
        exceeds the attention's compute is exposed; else (torch's context_parallel
        all-gathers) every exchange is waited on (planner.simulate.context).
    fp8_fused_casts: under precision fp8, each float8 cast is one fused amax pass and one
        cast kernel whether or not the plan compiles (Transformer Engine's cast kernels);
        else they are eager torchao ops unless the plan compiles (planner.simulate.fp8).
    fp8_param_gather: with the tensorwise float8 recipe and ZeRO 1-3, the sharded weights
        are gathered in float8 (torchao's enable_fsdp_float8_all_gather in meshplan's
        runtime; Megatron-LM gathers bf16 unless --fp8-param-gather, which meshplan does not model).
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
    attention: str | None = None
    cp_overlap: bool = False
    fp8_fused_casts: bool = False
    fp8_param_gather: bool = True


MESHPLAN_RUNTIME = Execution()

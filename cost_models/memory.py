"""Model-state memory per GPU: parameters, gradients and AdamW state, by ZeRO stage.

Two accountings:
- `pytorch` (default): what meshplan's runtime allocates, PyTorch-native parts only.
  ZeRO-0 keeps fp32 parameters and fp32 gradients on every rank (mixed precision is
  autocast: low-precision weight copies are per-op transients, not resident state).
  ZeRO 1-3 are FSDP2 `fully_shard`: fp32 sharded parameters, fp32 sharded gradients and
  sharded AdamW state; the unsharded low-precision parameters it all-gathers are accounted by
  `gathered_param_bytes` (one or two layers at a time for ZeRO-3; every layer between
  forward and backward for ZeRO-2, i.e. reshard_after_forward=False). ZeRO-1 (Megatron's
  distributed optimizer) keeps them, and unsharded fp32 gradients, across the step's
  micro-batches: planner.simulate.fsdp says when, planner.simulate adds them. With CPU offload
  (FSDP2 `CPUOffloadPolicy`) sharded parameters, gradients and optimizer state live on
  the host.
- `deepspeed`: the ZeRO paper's accounting (Rajbhandari et al. 2020, Sec. 3/5): fp16
  parameters and gradients (2 + 2 bytes) plus K = 12 bytes of fp32 master weights,
  momentum and variance, sharded by stage. Used to check against the paper.

AdamW keeps two fp32 moments per parameter (exp_avg, exp_avg_sq): 8 bytes. The fused
implementation (`AdamW(fused=True)`) updates in place, so it adds no per-parameter
temporaries; the foreach implementation allocates about one more fp32 copy of the
largest tensor group, which `optimizer_step_transient_bytes` reports.
"""
from __future__ import annotations

from dataclasses import dataclass

from cost_models.errors import MeshplanError

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
ADAM_STATE_BYTES_PER_PARAM = 8       # exp_avg + exp_avg_sq in fp32
MASTER_BYTES_PER_PARAM = 4           # fp32 parameters (PyTorch) / fp32 master copy (DeepSpeed)
DEEPSPEED_K = 12                     # ZeRO paper: fp32 master + momentum + variance


def dtype_bytes(precision: str) -> int:
    """Bytes per element of a precision name; a user error for an unknown one."""
    if precision not in DTYPE_BYTES:
        raise MeshplanError(f"unknown precision {precision!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[precision]


@dataclass(frozen=True)
class ModelStates:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    host_bytes: float = 0.0          # offloaded state kept in CPU memory

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def model_state_bytes(param_count: float, precision: str, zero: int, dp: int,
                      offload_optimizer: bool = False, accounting: str = "pytorch") -> ModelStates:
    """Resident model states on one GPU holding `param_count` parameters before ZeRO sharding."""
    if zero not in (0, 1, 2, 3):
        raise MeshplanError(f"zero must be 0-3, got {zero!r}")
    dtype_bytes(precision)   # validates the name
    if accounting == "deepspeed":
        return _deepspeed_states(param_count, zero, dp)
    if accounting != "pytorch":
        raise MeshplanError(f"unknown memory accounting {accounting!r}; use pytorch or deepspeed")
    p = float(param_count)
    params = grads = MASTER_BYTES_PER_PARAM * p
    optimizer = ADAM_STATE_BYTES_PER_PARAM * p
    if zero >= 1:
        optimizer /= dp
        params /= dp
        grads /= dp
    if offload_optimizer:
        if zero < 2:
            raise MeshplanError("optimizer offload needs FSDP2 (zero 2 or 3)")
        return ModelStates(0.0, 0.0, 0.0, host_bytes=params + grads + optimizer)
    return ModelStates(params, grads, optimizer)


def _deepspeed_states(param_count: float, zero: int, dp: int) -> ModelStates:
    p = float(param_count)
    params, grads, optimizer = 2 * p, 2 * p, DEEPSPEED_K * p
    if zero >= 1:
        optimizer /= dp
    if zero >= 2:
        grads /= dp
    if zero >= 3:
        params /= dp
    return ModelStates(params, grads, optimizer)


def gathered_param_bytes(zero: int, precision: str, layer_param_counts: list,
                         prefetch_layers: int = 1) -> float:
    """Unsharded (all-gathered) parameter bytes that FSDP2 holds at its peak.

    ZeRO-3 holds the layer being computed plus `prefetch_layers` prefetched ones (FSDP2's
    implicit prefetch overlaps the next all-gather with this layer's compute). ZeRO-2
    keeps every layer's unsharded parameters from its forward to its backward, so at the
    start of backward all of them are resident. Below ZeRO-2 nothing is gathered.
    """
    if zero < 2:
        return 0.0
    width = DTYPE_BYTES[precision]  # the all-gather output is a full unsharded copy
    if zero == 2:
        return width * float(sum(layer_param_counts))
    largest = sorted(layer_param_counts, reverse=True)[: 1 + prefetch_layers]
    return width * float(sum(largest))


def adamw_bytes_per_param(param_precision: str = "fp32", grad_precision: str = "fp32",
                          master_weights: bool = False) -> float:
    """DRAM bytes a fused AdamW step moves per parameter (it is bandwidth-bound).

    Reads the gradient and both fp32 moments and writes the moments back (grad + 16 bytes).
    Without master weights it reads and writes the parameter (2 x its width): 28 bytes per
    parameter for fp32 parameters and gradients, the case of autocast training. With fp32
    master weights it reads and writes the master copy (8) and writes the low-precision
    parameter once.
    """
    grad = dtype_bytes(grad_precision)
    param = dtype_bytes(param_precision)
    moments = 2 * ADAM_STATE_BYTES_PER_PARAM      # exp_avg and exp_avg_sq, read and written
    weights = 2 * 4 + param if master_weights else 2 * param
    return float(grad + moments + weights)


def optimizer_step_transient_bytes(largest_group_params: float, fused: bool = True) -> float:
    """Extra memory during optimizer.step(): none for fused AdamW (updates in place)."""
    return 0.0 if fused else MASTER_BYTES_PER_PARAM * float(largest_group_params)

"""Per-op compute time on one GPU: a roofline with empirical efficiencies.

Two layers, kept apart on purpose:
- first principles (this module's functions): FLOP and byte counts of GEMMs, flash
  attention and fused AdamW, and the roofline bound max(FLOPs / peak, bytes / bandwidth)
  that no prediction may beat;
- empirical constants (a `Calibration`, see calibration.py): the fraction of the
  datasheet peak that real kernels reach, how much of the memory traffic a GEMM fails
  to hide, attention's per-call fixed time, the achieved copy bandwidth and the fixed
  per-kernel overhead. GPUs without their own calibration use the H100 one expressed as
  fractions of peak (`default_calibration`), which is the documented default curve.

The API takes primitive arguments; the caller maps its own IR onto it (cost_models
never imports planner). All times are seconds of device time for one kernel/op with the
GPU to itself; host dispatch and overlap are the simulator's business.
"""
from __future__ import annotations

import math
import numbers

from cost_models.calibration import Calibration, default_calibration, score_fraction_fallback
from cost_models.errors import MeshplanError
from cost_models.hardware import GPUSpec
from cost_models.memory import adamw_bytes_per_param, dtype_bytes

OP_KINDS = ("linear", "matmul", "attention", "norm", "elementwise", "embedding", "loss",
            "reduction", "view", "other")
GEMM_KINDS = ("linear", "matmul")
# Ops that run on the vector units and stream their operands once: time is bandwidth-bound
# unless their FLOPs exceed what the non-tensor fp32 units do in the same time.
VECTOR_KINDS = ("norm", "elementwise", "embedding", "loss", "reduction", "other")

# Flash-attention backward does 5 matrix products (S = QK^T recomputed, dP = dO V^T,
# dV = P^T dO, dQ = dS K, dK = dS^T Q) to the forward's 2: 2.5x the forward FLOPs
# (Dao 2023, FlashAttention-2, Sec. 3.1 and the FLOP counts of its benchmarks).
ATTENTION_BWD_FLOPS_FACTOR = 2.5

# PyTorch's multi_tensor_apply limits per fused-optimizer launch, for the 4 KB kernel-
# argument build (aten/src/ATen/native/cuda/MultiTensorApply.cuh: depth_to_max_tensors
# {110, 64, 48, 36, 30}, depth_to_max_blocks 320, kChunkSize 65536). AdamW touches 4 lists
# (params, grads, exp_avg, exp_avg_sq), 5 with fp32 master weights. CUDA 13 builds allow
# more per launch, so this slightly overcounts launches there (microseconds per step).
ADAMW_TENSORS_PER_LAUNCH = {False: 36, True: 30}
ADAMW_ELEMENTS_PER_LAUNCH = 320 * 65536
# Assumption, used only when the calibration has no measurement of its own (`meshplan
# profile` measures it: Calibration.host_adamw_bytes_per_s): host memory traffic one GPU's
# share of a CPU AdamW step achieves - a dual-socket DGX host streams ~300 GB/s over 8 GPUs
# and torch's CPU AdamW reaches a fraction of it.
HOST_ADAMW_BYTES_PER_S = 10e9


# --------------------------------------------------------------------------- first principles

def gemm_flops(m: int, k: int, n: int, batch: int = 1) -> float:
    """One multiply-add = 2 FLOPs: C[m,n] = A[m,k] @ B[k,n], `batch` times."""
    return 2.0 * batch * m * k * n


def gemm_bytes(m: int, k: int, n: int, precision: str, batch: int = 1) -> float:
    """Minimum DRAM traffic: read A and B once, write C once, in the precision's width."""
    return float(dtype_bytes(precision) * batch * (m * k + k * n + m * n))


def scaled_gemm_bytes(m: int, k: int, n: int, batch: int = 1) -> float:
    """Minimum DRAM traffic of a float8 GEMM (torch._scaled_mm): float8 A and B, a bf16 C."""
    return float(batch * (dtype_bytes("fp8") * (m * k + k * n) + dtype_bytes("bf16") * m * n))


def causal_fraction(seq_q: int, seq_kv: int) -> float:
    """Fraction of the seq_q x seq_kv score matrix a causal mask keeps.

    PyTorch's `is_causal=True` aligns the mask top-left: query i sees keys 0..i.
    """
    if seq_q <= seq_kv:
        kept = seq_q * (seq_q + 1) / 2
    else:
        kept = seq_kv * (seq_kv + 1) / 2 + (seq_q - seq_kv) * seq_kv
    return kept / (seq_q * seq_kv)


def attention_flops(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int,
                    causal: bool = True, backward: bool = False) -> float:
    """FLOPs of flash attention: QK^T and PV are 2 * seq_q * seq_kv * head_dim each per head.

    Causal masking skips the masked part (flash kernels skip fully masked blocks); the
    softmax's few FLOPs per score are not counted (they show in the fitted efficiency).
    Query heads count; grouped-query attention's fewer KV heads do not change the FLOPs.
    """
    forward = 4.0 * batch * heads * seq_q * seq_kv * head_dim
    if causal:
        forward *= causal_fraction(seq_q, seq_kv)
    return forward * (ATTENTION_BWD_FLOPS_FACTOR if backward else 1.0)


def attention_bytes(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int,
                    precision: str, backward: bool = False) -> float:
    """Minimum DRAM traffic of flash attention (the score matrix never leaves the chip).

    Forward reads Q, K, V and writes O; backward reads Q, K, V, O, dO and writes dQ, dK, dV.
    K and V are counted with the query heads: an upper bound under grouped-query attention.
    """
    q_sized, kv_sized = (4, 4) if backward else (2, 2)
    elements = batch * heads * head_dim * (q_sized * seq_q + kv_sized * seq_kv)
    return float(dtype_bytes(precision) * elements)


def fused_adamw_launches(param_count: float, num_tensors: int, master_weights: bool = False) -> int:
    """Kernel launches of one fused AdamW step (see ADAMW_TENSORS_PER_LAUNCH)."""
    by_tensors = math.ceil(num_tensors / ADAMW_TENSORS_PER_LAUNCH[master_weights])
    by_elements = math.ceil(param_count / ADAMW_ELEMENTS_PER_LAUNCH)
    return max(1, by_tensors, by_elements)


def _check_sizes(**sizes) -> bool:
    """Validate non-negative whole sizes (numpy integers and 4096.0 included); True when
    any is zero (no work, no kernel)."""
    for name, value in sizes.items():
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 0:
            raise MeshplanError(f"{name} must be a whole number >= 0, got {value!r}")
    return any(v == 0 for v in sizes.values())


def _check_amounts(**amounts) -> None:
    for name, value in amounts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise MeshplanError(f"{name} must be a number >= 0, got {value!r}")


# --------------------------------------------------------------------------- the model

class ComputeModel:
    """Times of single ops on one GPU, from its datasheet and a calibration.

    `calibration=None` uses the GPU's shipped calibration, or the H100 one transferred
    to this GPU (the documented default efficiency curve).
    """

    def __init__(self, gpu: GPUSpec, calibration: Calibration | None = None):
        if calibration is None:
            calibration = default_calibration(gpu)
        elif calibration.gpu != gpu.name:
            raise MeshplanError(f"calibration is for {calibration.gpu!r}, not {gpu.name!r}; "
                                f"profile this GPU with `meshplan profile --gpu {gpu.name}`")
        self.gpu = gpu
        self.calibration = calibration

    # -- constants ------------------------------------------------------------------------
    @property
    def kernel_overhead_s(self) -> float:
        """Fixed device time per kernel (empirical: the intercept of the GEMM fit)."""
        return self.calibration.kernel_overhead_s

    @property
    def grouped_gemm_factor(self) -> float:
        """Routed experts' GEMM time over the dense fit's (Calibration.grouped_gemm_factor; 1 unmeasured)."""
        return self.calibration.grouped_gemm_factor or 1.0

    @property
    def host_s_per_op(self) -> float:
        """Host (Python dispatch + launch) time per eager aten op (empirical, per calibration)."""
        return self.calibration.host_s_per_op

    def host_bound_s(self, device_s: float, host_s: float) -> float:
        """A stretch of eager work that takes `device_s` on the GPU and `host_s` to issue
        (empirical combination, see Calibration.host_overlap_exponent)."""
        p = self.calibration.host_overlap_exponent
        if not p or not host_s or not device_s:
            return max(device_s, host_s)
        big = max(device_s, host_s)   # scaled, so large exponents do not overflow
        return big * ((device_s / big) ** p + (host_s / big) ** p) ** (1.0 / p)

    @property
    def memory_bw_bytes_per_s(self) -> float:
        """Achieved DRAM bandwidth, bytes read + written per second (empirical: a device copy)."""
        return self.calibration.copy_bytes_per_s

    @property
    def score_bw_bytes_per_s(self) -> float:
        """Achieved bandwidth of softmax, masking and dropout over an unfused attention's
        score tensor (empirical: Calibration.score_bandwidth_fraction of the copy rate)."""
        fraction = self.calibration.score_bandwidth_fraction or score_fraction_fallback()
        return fraction * self.memory_bw_bytes_per_s

    def peak_flops(self, precision: str) -> float:
        """Datasheet peak for the precision (a calibration may only raise it; see calibration.py)."""
        return max(self.gpu.peak_flops_for(precision), self.calibration.peak_flops.get(precision, 0.0))

    def vector_peak_flops(self) -> float:
        """Peak of the non-tensor units that run elementwise, norm and softmax math (fp32)."""
        return self.peak_flops("fp32")

    # -- ops --------------------------------------------------------------------------------
    def matmul_time_s(self, m: int, k: int, n: int, precision: str, batch: int = 1) -> float:
        """C[m,n] = A[m,k] @ B[k,n] (`batch` independent products in one kernel)."""
        if _check_sizes(m=m, k=k, n=n, batch=batch):
            return 0.0
        return self._gemm_s(gemm_flops(m, k, n, batch), gemm_bytes(m, k, n, precision, batch), precision)

    def scaled_matmul_time_s(self, m: int, k: int, n: int, batch: int = 1) -> float:
        """A float8 GEMM (torch._scaled_mm, as torchao's float8 training runs it): float8
        operands and a 16-bit output, at the fp8 peak times the fp8 GEMM fit (the 16-bit fit,
        transferred, until a profile measures float8: Calibration.gemm_fit)."""
        if _check_sizes(m=m, k=k, n=n, batch=batch):
            return 0.0
        return self._gemm_s(gemm_flops(m, k, n, batch), scaled_gemm_bytes(m, k, n, batch), "fp8")

    def attention_time_s(self, batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int,
                         precision: str, causal: bool = True, backward: bool = False) -> float:
        """Flash-attention (fused SDPA) forward, or backward when `backward`."""
        if _check_sizes(batch=batch, heads=heads, seq_q=seq_q, seq_kv=seq_kv, head_dim=head_dim):
            return 0.0
        flops = attention_flops(batch, heads, seq_q, seq_kv, head_dim, causal, backward)
        moved = attention_bytes(batch, heads, seq_q, seq_kv, head_dim, precision, backward)
        return self._attention_s(flops, moved, precision, backward)

    def memory_bound_time_s(self, bytes_moved: float) -> float:
        """Elementwise ops, norms, softmax, copies: bytes read + written at the achieved bandwidth."""
        _check_amounts(bytes_moved=bytes_moved)
        if bytes_moved == 0:
            return 0.0
        return self.kernel_overhead_s + bytes_moved / self.memory_bw_bytes_per_s

    def optimizer_step_time_s(self, param_count: float, num_tensors: int = 1, param_precision: str = "fp32",
                              grad_precision: str = "fp32", master_weights: bool = False) -> float:
        """One fused AdamW step over `param_count` parameters in `num_tensors` tensors."""
        _check_amounts(param_count=param_count)
        _check_sizes(num_tensors=num_tensors)
        if param_count == 0:
            return 0.0
        moved = param_count * adamw_bytes_per_param(param_precision, grad_precision, master_weights)
        launches = fused_adamw_launches(param_count, num_tensors, master_weights)
        return launches * self.kernel_overhead_s + moved / self.memory_bw_bytes_per_s

    def offloaded_optimizer_step_time_s(self, param_count: float) -> float:
        """FSDP2 CPUOffloadPolicy: fp32 gradients go to the host, AdamW runs on the CPU, the
        updated fp32 parameters come back - on the step's critical path.

        PCIe at the datasheet rate each way, and the CPU step bound by host memory traffic
        (adamw_bytes_per_param) at the rate `meshplan profile` measured on the host
        (Calibration.host_adamw_bytes_per_s), else the assumed HOST_ADAMW_BYTES_PER_S.
        """
        _check_amounts(param_count=param_count)
        pcie = 2 * param_count * 4 / self.gpu.host_link_bw_bytes_per_s
        return pcie + param_count * adamw_bytes_per_param() / self.host_adamw_bytes_per_s

    @property
    def host_adamw_bytes_per_s(self) -> float:
        """One GPU's share of the host's AdamW memory traffic (measured, else assumed)."""
        return self.calibration.host_adamw_bytes_per_s or HOST_ADAMW_BYTES_PER_S

    def op_time_s(self, kind: str, flops: float, bytes_moved: float, precision: str,
                  gemm: tuple | None = None, attention: tuple | None = None, backward: bool = False,
                  on_scores: bool = False) -> float:
        """Time of one op of `kind` (see OP_KINDS) from its counts and, when known, its shape.

        gemm = (M, K, N) or (batch, M, K, N); attention = (batch, heads, seq_q, seq_kv,
        head_dim, causal). Without a shape, GEMM and attention ops use their fitted
        efficiency on the given FLOPs and bytes. `view` ops launch nothing and cost 0.
        `on_scores`: a memory-bound op over an unfused attention's score tensor, which
        streams at score_bw_bytes_per_s.
        """
        if kind not in OP_KINDS:
            raise MeshplanError(f"unknown op kind {kind!r}; use one of {', '.join(OP_KINDS)}")
        _check_amounts(flops=flops, bytes_moved=bytes_moved)
        if kind == "view":
            return 0.0
        if kind in GEMM_KINDS and gemm is not None:
            m, k, n, batch = gemm_dims(gemm)
            return self.matmul_time_s(m, k, n, precision, batch)
        if kind == "attention" and attention is not None:
            batch, heads, seq_q, seq_kv, head_dim, causal = _attention_args(attention)
            return self.attention_time_s(batch, heads, seq_q, seq_kv, head_dim, precision, causal, backward)
        if flops == 0 and bytes_moved == 0:
            return 0.0
        if kind in GEMM_KINDS:
            return self._gemm_s(flops, bytes_moved, precision)
        if kind == "attention":
            return self._attention_s(flops, bytes_moved, precision, backward)
        bandwidth = self.score_bw_bytes_per_s if on_scores else self.memory_bw_bytes_per_s
        return self.kernel_overhead_s + max(bytes_moved / bandwidth, flops / self.vector_peak_flops())

    # -- the fitted forms -----------------------------------------------------------------
    def _gemm_s(self, flops: float, moved_bytes: float, precision: str) -> float:
        """Fitted math + exposed-traffic time, never below the bandwidth roofline (GEMVs)."""
        fit = self.calibration.gemm_fit(precision)
        math_s = flops / (self.peak_flops(precision) * fit.peak_fraction * fit.sustained)
        traffic_s = moved_bytes / self.memory_bw_bytes_per_s
        return self.kernel_overhead_s + max(math_s + fit.traffic_weight * traffic_s, traffic_s)

    def _attention_s(self, flops: float, moved_bytes: float, precision: str, backward: bool) -> float:
        fit = self.calibration.attention_bwd if backward else self.calibration.attention_fwd
        math_s = flops / (self.peak_flops(precision) * fit.peak_fraction)
        return max(fit.fixed_s, self.kernel_overhead_s) + max(math_s, moved_bytes / self.memory_bw_bytes_per_s)


def gemm_dims(gemm) -> tuple:
    """A GEMM shape, (M, K, N) or (batch, M, K, N), as (m, k, n, batch)."""
    if len(gemm) == 3:
        return (*gemm, 1)
    if len(gemm) == 4:
        batch, m, k, n = gemm
        return m, k, n, batch
    raise MeshplanError(f"gemm must be (M, K, N) or (batch, M, K, N), got {gemm!r}")


def _attention_args(attention) -> tuple:
    if len(attention) != 6:
        raise MeshplanError(f"attention must be (batch, heads, seq_q, seq_kv, head_dim, causal), got {attention!r}")
    batch, heads, seq_q, seq_kv, head_dim, causal = attention
    return batch, heads, seq_q, seq_kv, head_dim, bool(causal)

"""What float8 training (precision "fp8", planner.fp8) costs a block's linear layer.

Per linear and micro-batch, torchao's float8 linear (torchao/float8/float8_linear.py,
matmul_with_hp_or_float8_args) does:
- forward: casts its input (M x K) and weight (K x N) to float8, one scaled GEMM;
- backward: casts the output gradient (M x N) twice (scaled along each dimension, for the
  input-gradient and the weight-gradient GEMM), the weight again and the saved input again,
  two scaled GEMMs. A weight FSDP2 gathered in float8 (tensorwise) arrives cast: its two
  casts are skipped (`tensor_already_casted_to_fp8`), and the shard is cast before each gather
  (fsdp_utils.WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather).
- saved for backward: `ctx.save_for_backward(input_hp, weight_hp_t)`, the 16-bit input and
  weight bf16 training keeps too: float8 adds no activation memory (its casts are freed after
  each GEMM; the scales are a few floats per tensor, or per row).
A cast (float8_scaling_utils.hp_tensor_to_float8_dynamic) takes the amax (float8_utils
tensor_to_amax: max(abs(x)) over the tensor, or each row under rowwise), a scale from it,
then x.to(float32) * scale, clamped and cast (float8_training_tensor._ToFloat8ConstrFunc):
- compiled (torch.compile fuses it, as torchtitan requires for float8): an amax reduction
  reading the 16-bit tensor and a pass reading it again and writing a byte an element:
  CAST_BYTES_COMPILED bytes per element; the casts of one direction (forward, backward) fuse
  into CAST_KERNELS_COMPILED kernels (the amax reductions, then the casts). Checked against
  torchao's H100 microbenchmark of a compiled float8 linear's forward + backward over bf16
  (torchao/float8/README.md, "Performance"): M, K, N = 1024, 2048, 1024 measured 0.80x
  (priced 0.58x for the linear alone, without the benchmark's norm and sigmoid), 4096, 8192,
  16384 measured 1.39x (priced 1.51x) (tests/simulate/test_fp8.py);
- eager: abs (read 2, write 2 bytes an element), max (read 2), .to(float32) (2, 4), the
  multiply (4, 4), clamp (4, 4), .to(float8) (4, 1): CAST_BYTES_EAGER, plus the scale's
  scalar ops - why torchao's float8 is slower than bf16 without compile.
The GEMM: float8 operands, a 16-bit output, at the GPU's fp8 peak times the calibration's fp8
GEMM fit (ComputeModel.scaled_matmul_time_s: the 16-bit fit, transferred, until
`meshplan profile --device cuda` measures float8 GEMMs).
"""
from __future__ import annotations

from dataclasses import dataclass

from cost_models.compute import ComputeModel, gemm_dims
from planner.fp8 import converts
from planner.simulate.experts import is_expert_op

CAST_BYTES_COMPILED = 2 + 2 + 1
CAST_KERNELS_COMPILED = 2
CAST_BYTES_EAGER = (2 + 2) + 2 + (2 + 4) + (4 + 4) + (4 + 4) + (4 + 1)
CAST_KERNELS_EAGER = 6
SCALE_OPS_EAGER = 4       # amax_to_scale: .to(float64), clamp, division, .to(float32)
# casts per linear (input, weight; output gradient twice, weight, input): forward, backward
FORWARD_CASTS, BACKWARD_CASTS = ("input", "weight"), ("grad_output", "grad_output", "weight", "input")


# Under tensor parallelism the casts of DTensor-sharded operands reduce their amax over the TP
# group (torch.max(abs(x)) of a sharded DTensor is a partial, then an all-reduce: float8_utils
# tensor_to_amax). Counted per float8 linear and micro-batch (forward, backward) with
# torch's CommDebugMode on a tp2 Llama (4 blocks x 7 linears): tensorwise +112 all-reduces
# (4 a linear: the weight each way, the row-parallel input, the column-parallel output
# gradient), rowwise +56 (2 a linear: the weight scaled along its sharded side).
TP_AMAX_ALL_REDUCES = {"tensorwise": (2, 2), "rowwise": (1, 1)}


@dataclass(frozen=True)
class Float8:
    """How a plan's block linears run in float8 (planner.fp8)."""

    recipe: str = "tensorwise"
    compiled: bool = False           # torch.compile fuses each cast (Plan.compile)
    weight_gathered: bool = False    # FSDP2 float8 all-gather (planner.fp8.fsdp_float8_all_gather)

    @classmethod
    def of(cls, plan, execution) -> "Float8 | None":
        """How `plan` runs its float8 linears on an engine (`execution`), None without fp8."""
        from planner.fp8 import fsdp_float8_all_gather
        if plan.precision != "fp8":
            return None
        return cls(plan.fp8_recipe, bool(plan.compile) or execution.fp8_fused_casts,
                   fsdp_float8_all_gather(plan, execution))

    def tp_amax_collectives(self, k: int, n: int) -> tuple[list, list]:
        """(forward, backward) amax all-reduces over the TP group of one float8 linear with
        weight k x n (unsharded): one fp32 a tensor (tensorwise), one a row of the weight's
        unsharded side (rowwise)."""
        nbytes = 4 if self.recipe == "tensorwise" else 4 * max(k, n)
        fwd, bwd = TP_AMAX_ALL_REDUCES[self.recipe]
        return [("all_reduce", nbytes)] * fwd, [("all_reduce", nbytes)] * bwd

    def casts_s(self, compute: ComputeModel, elements: list) -> float:
        """The bf16 -> float8 casts of one direction, of tensors of `elements` values each
        (memory-bound kernels: fused into CAST_KERNELS_COMPILED compiled, CAST_KERNELS_EAGER
        per cast eager)."""
        if not elements:
            return 0.0
        if self.compiled:
            moved = CAST_BYTES_COMPILED * sum(elements)
            return CAST_KERNELS_COMPILED * compute.memory_bound_time_s(moved / CAST_KERNELS_COMPILED)
        return sum(CAST_KERNELS_EAGER * compute.memory_bound_time_s(CAST_BYTES_EAGER * e / CAST_KERNELS_EAGER)
                   for e in elements)

    def cast_ops(self, casts: int) -> int:
        """Launches (host ops) of one direction's `casts` casts."""
        if not casts:
            return 0
        return CAST_KERNELS_COMPILED if self.compiled else casts * (CAST_KERNELS_EAGER + SCALE_OPS_EAGER)

    def linear_s(self, compute: ComputeModel, m: int, k: int, n: int, batch: int = 1,
                 backward: bool = True) -> tuple[float, float, int, int]:
        """(forward s, backward s, extra forward host ops, extra backward host ops) of one
        float8 linear with GEMM shape (m, k, n); the ops beyond the traced linear's."""
        sizes = {"input": batch * m * k, "weight": k * n, "grad_output": batch * m * n}

        def casts(names):
            kept = [sizes[x] for x in names if not (x == "weight" and self.weight_gathered)]
            return self.casts_s(compute, kept), self.cast_ops(len(kept))

        cast_fwd, ops_fwd = casts(FORWARD_CASTS)
        fwd = compute.scaled_matmul_time_s(m, k, n, batch) + cast_fwd
        if not backward:
            return fwd, 0.0, ops_fwd, 0
        cast_bwd, ops_bwd = casts(BACKWARD_CASTS)
        bwd = compute.scaled_matmul_time_s(m, n, k, batch) + compute.scaled_matmul_time_s(k, m, n, batch) + cast_bwd
        return fwd, bwd, ops_fwd, ops_bwd


def precompute_scales_s(compute: ComputeModel, comm, fp8_params_local: float, linears: int, group) -> float:
    """torchao.float8.precompute_float8_dynamic_scale_for_fsdp after each optimizer step
    (tensorwise with the FSDP2 float8 all-gather): torch._foreach_norm(inf) over the local fp32
    weight shards, then one all-reduce (max) of the amaxes over the FSDP group."""
    if not linears:
        return 0.0
    return compute.memory_bound_time_s(4 * fp8_params_local) + comm.all_reduce_s(4 * linears, group)


def pre_gather_cast_s(compute: ComputeModel, fp8_params_local: float) -> float:
    """Casting a layer's fp32 weight shards to float8 before FSDP2 gathers them
    (WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather): read 4 bytes, write 1."""
    return compute.memory_bound_time_s(5 * fp8_params_local) if fp8_params_local else 0.0


def runs_in_fp8(op) -> bool:
    """A traced op that is an nn.Linear torchao converts (planner.fp8.converts: sides divisible
    by 16), when its layer is a block; a routed expert's batched product is no nn.Linear."""
    if op.kind != "linear" or op.gemm is None or not op.param_count or is_expert_op(op):
        return False
    _, k, n, _ = gemm_dims(op.gemm)
    return converts(k, n)


def weight_count(op) -> float:
    """A linear's weight elements (its bias, if any, is not cast)."""
    _, k, n, _ = gemm_dims(op.gemm)
    return float(min(op.param_count, k * n))

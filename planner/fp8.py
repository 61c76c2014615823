"""Float8 training (precision "fp8"): which GPUs run it, which layers it converts, and the
torchao names the runtime, the simulator and the engine interop share.

meshplan's fp8 is torchao's float8 training (torchao/float8, `convert_to_float8_training`),
as torchtitan and Megatron-LM/Transformer Engine run FP8: every nn.Linear inside the
transformer blocks runs its three GEMMs (output, input gradient, weight gradient) in float8
through `torch._scaled_mm`; everything else - embedding, norms, attention, the output head
(torchtitan filters `output`), the optimizer - stays bf16 (PRECISION_DTYPES["fp8"]).
Recipes (Float8LinearConfig.from_recipe_name, torchao/float8/config.py):
- "tensorwise": one scale per tensor; FSDP2 can all-gather the weights already cast to
  float8 (`enable_fsdp_float8_all_gather`, torchao/float8/fsdp_utils.py), with one
  all-reduce of every weight's amax after the optimizer step
  (`precompute_float8_dynamic_scale_for_fsdp`);
- "rowwise": one scale per row (more accurate); all communication stays bf16.
"""
from __future__ import annotations

from cost_models.errors import MeshplanError
from cost_models.hardware import GPUS

# torch._scaled_mm needs both weight dimensions divisible by 16 (torchtitan's
# module_filter_fn, torchtitan/components/quantization/utils.py, skips other linears).
FP8_DIM_MULTIPLE = 16


def converts(in_features: int, out_features: int) -> bool:
    """Whether a block's nn.Linear of this shape runs in float8 (else it stays bf16)."""
    return in_features % FP8_DIM_MULTIPLE == 0 and out_features % FP8_DIM_MULTIPLE == 0


def fp8_gpus() -> list[str]:
    """The catalogue GPUs with float8 tensor cores (an fp8 peak in cost_models.hardware)."""
    return [name for name, gpu in GPUS.items() if "fp8" in gpu.peak_flops]


def check_gpu(gpu, precision: str) -> None:
    """--precision fp8 on a GPU without float8 tensor cores: one line naming those with them."""
    if precision == "fp8" and "fp8" not in gpu.peak_flops:
        raise MeshplanError(f"{gpu.display_name} has no float8 tensor cores, so --precision fp8 cannot run on it: "
                            f"use bf16, or a GPU with FP8 ({', '.join(fp8_gpus())})")


def fsdp_float8_all_gather(plan, execution=None) -> bool:
    """FSDP2 gathers the converted weights in float8: tensorwise under ZeRO 1-3 (FSDP2 wraps
    the blocks) in meshplan's runtime (runtime.fp8), or an engine whose Execution says it
    gathers fp8 parameters; rowwise gathers bf16."""
    gathers = execution is None or execution.fp8_param_gather
    return plan.precision == "fp8" and plan.fp8_recipe == "tensorwise" and plan.zero >= 1 and gathers


def precision_words(plan) -> str:
    """"bf16", or "fp8 tensorwise" naming the scaling: how reports name a plan's precision."""
    return f"fp8 {plan.fp8_recipe}" if plan.precision == "fp8" else plan.precision


def torchao_missing_message() -> str:
    return ("--precision fp8 trains with torchao's float8 (torchao.float8), which is not installed: "
            "pip install 'meshplan[fp8]' (torchao>=0.10) or use bf16")

"""Float8 training in the runtime (precision "fp8", planner.fp8): torchao's float8 linears.

Each block's nn.Linear whose sides are multiples of 16 becomes a torchao Float8Linear
(`torchao.float8.convert_to_float8_training` with `Float8LinearConfig.from_recipe_name(
plan.fp8_recipe)`), before tensor parallelism and FSDP wrap the part, as torchtitan's
Float8LinearConverter converts the model before parallelize (components/quantization/float8.py);
the embedding, the head and anything outside the blocks stay bf16 (torchtitan filters
`output`). With the tensorwise recipe under ZeRO 1-3, FSDP2 gathers the weights in float8
(`enable_fsdp_float8_all_gather`) and `precompute_float8_dynamic_scale_for_fsdp` computes
every weight's scale in one all-reduce after each optimizer step (torchao/float8/fsdp_utils.py).
Tensor parallelism applies the plain DTensor styles to the Float8Linear modules, so its
collectives stay bf16 (what torchtitan does for rowwise; its Float8ColwiseParallel /
Float8RowwiseParallel, which move tensorwise float8 activations, are not used).
On CPU, torch._scaled_mm runs float8 GEMMs (torch >= 2.13) so the same code path is tested.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from cost_models.errors import MeshplanError
from planner.fp8 import converts, fp8_gpus, fsdp_float8_all_gather, torchao_missing_message
from planner.plan import Plan

# torch._scaled_mm's float8 kernels need compute capability 8.9 (Ada) or 9.0 (Hopper) and above
MIN_CUDA_CAPABILITY = (8, 9)


def require_torchao():
    """torchao.float8, or one line (exit 2) saying how to install it."""
    try:
        import torchao.float8 as float8
    except ImportError:
        raise MeshplanError(torchao_missing_message()) from None
    return float8


def check_device(device: torch.device) -> None:
    """A CUDA GPU without float8 tensor cores cannot run precision fp8: one line."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CUDA_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise MeshplanError(f"{name} has no float8 tensor cores (compute capability < 8.9), so precision fp8 "
                            f"cannot run on it: use bf16, or a GPU with FP8 ({', '.join(fp8_gpus())})")


def config_for(plan: Plan):
    """torchao's Float8LinearConfig for the plan's recipe (and FSDP2 float8 all-gather)."""
    float8 = require_torchao()
    config = float8.Float8LinearConfig.from_recipe_name(plan.fp8_recipe)
    if fsdp_float8_all_gather(plan):
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def convert_blocks(blocks: dict, plan: Plan) -> int:
    """Swap every block's convertible nn.Linear for a Float8Linear; returns how many."""
    float8 = require_torchao()
    from torchao.float8.float8_linear import Float8Linear
    config = config_for(plan)
    count = 0
    for block in blocks.values():
        float8.convert_to_float8_training(block, config=config, module_filter_fn=_keep)
        count += sum(1 for m in block.modules() if isinstance(m, Float8Linear))
    return count


def _keep(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and converts(module.in_features, module.out_features)


def after_optimizer_step(modules, plan: Plan) -> None:
    """The tensorwise FSDP float8 all-gather's scales for the next step: one amax all-reduce."""
    if plan.precision == "fp8" and fsdp_float8_all_gather(plan):
        float8 = require_torchao()
        for module in modules:
            float8.precompute_float8_dynamic_scale_for_fsdp(module)

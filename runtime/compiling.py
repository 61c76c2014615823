"""torch.compile per block (a plan's `compile`, `meshplan train --compile`), as torchtitan does it.

torchtitan/distributed/compile.py `apply_compile` compiles each TransformerBlock in place
(`block.compile(fullgraph=True)`: nn.Module.compile, so module names and checkpoint keys are
unchanged) after tensor parallelism and activation checkpointing and before FSDP; the
engine (runtime.engine) calls `compile_blocks` at that point. Every block has the same code
and parameter shapes, so dynamo compiles one graph and reuses it for the others.

How it composes:
- activation checkpointing: the block's forward is the checkpoint wrapper
  (runtime.parallelize.apply_checkpointing); dynamo traces torch.utils.checkpoint as a
  higher-order op, and a selective policy is honoured inside the compiled graph;
- DTensor tensor parallelism: the block's DTensor parameters and its ParallelStyle hooks are
  traced (the hooks are part of the module call dynamo compiles); with selective
  recomputation, not with full or attention-core recomputation, which `check_plan` refuses;
- FSDP2 / replicate: applied after compile; their hooks are skipped by dynamo
  (torch._dynamo.config.skip_fsdp_hooks) and run eagerly around the compiled block;
- pipelining: a stage runs its blocks, compiled, as it runs any module;
- context parallelism: refused (`check_plan`): its attention's saved-tensor hooks break the
  full graph.

`check_compiler` refuses a compile that cannot work, before any process group starts:
inductor on CPU writes C++ and needs a compiler (torch._inductor.config.cpp.cxx, or $CXX);
on CUDA it writes Triton kernels and needs triton.
"""
from __future__ import annotations

import os
import shutil

import torch

from cost_models.errors import MeshplanError
from planner.engines.meshplan import runtime_limits


def check_compiler(device_type: str) -> None:
    """One line when torch.compile's inductor backend cannot build kernels on `device_type`."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise MeshplanError("--compile on CUDA needs triton, which inductor writes its kernels in: "
                                "pip install triton (the version your torch names), or drop --compile")
        return
    from torch._inductor import config
    cxx = config.cpp.cxx
    names = [os.environ.get("CXX"), *(cxx if isinstance(cxx, (list, tuple)) else (cxx,))]
    if not any(name and shutil.which(name) for name in names):
        tried = ", ".join(n for n in names if n) or "none"
        raise MeshplanError(f"--compile on CPU needs a C++ compiler for inductor's kernels (tried {tried}): "
                            f"install g++ or set CXX, or drop --compile")


def check_plan(plan) -> None:
    """Refuse a compiled plan that cannot train (planner.engines.meshplan.runtime_limits, the
    one list the simulator and the search read too)."""
    reason = runtime_limits(plan)
    if reason:
        raise MeshplanError(f"--{reason}")


def compile_blocks(blocks: dict) -> None:
    """torch.compile each block in place (`blocks`: {number: module}), fullgraph, as
    torchtitan's apply_compile does (it also lets dynamo capture data-dependent scalars, which
    a Mixture-of-Experts block's token counts are)."""
    torch._dynamo.config.capture_scalar_outputs = True
    for block in blocks.values():
        block.compile(fullgraph=True)


def compiled(module: torch.nn.Module) -> bool:
    """Whether `module` was compiled in place (nn.Module.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None

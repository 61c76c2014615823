"""Which PyTorch releases meshplan runs on, and the one place that knows their differences.

Supported (checked in CI at both ends, see .ci/run):
- planning and simulation (`planner`, every `meshplan` command but `train`): torch >= 2.7;
- the training runtime (`runtime`, `meshplan train`): torch >= 2.10.

Why two floors: the planner only traces models on fake/meta tensors, and 2.7 plans and
simulates exactly as 2.13 does. The runtime drives FSDP2, DTensor and pipelining, which
changed under it release by release (measured on CPU/gloo): 2.7 and 2.8 have no
FSDP-based `replicate` (ZeRO 0 with tensor parallelism) and log FSDP2 gradient norms dp
times too large; 2.9's `replicate` wants a 2-D (replicate, shard) mesh - HSDP with a
shard dimension of 1 (torch/distributed/_composable/replicate_with_fsdp.py), which the
runtime's mesh does not have. 2.10 and 2.11 pass every runtime test through the
workarounds below (`pipeline_first_stage_input`; `fsdp_param_groups` for the tests).

`planner/__init__.py` imports this module first, so on a torch below the planner's floor
importing meshplan stops here with one line naming the release needed (`UnsupportedTorch`,
an ImportError), not deep inside a traceback. The runtime's floor is checked where every
run starts (`runtime.mesh.check_world`), so planner tests and tools that borrow runtime
constants still import on the planner's floor. pyproject.toml's `torch>=` pin must equal
PLANNER_MIN_TORCH (a test checks it).
"""
from __future__ import annotations

import functools
import os
import re
import sys

import torch
import torch.nn.functional as F

from cost_models.errors import MeshplanError

PLANNER_MIN_TORCH = (2, 7)
RUNTIME_MIN_TORCH = (2, 10)


class UnsupportedTorch(MeshplanError, ImportError):
    """The installed torch is older than the part of meshplan being imported needs.

    A MeshplanError, so `meshplan` prints it as one `meshplan: error:` line with exit
    code 2; an ImportError, so a library user's `import planner` fails as an import."""


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string; pre-releases and local builds
    ("2.7.0a0+git...", "2.13.0+cpu") count as their release."""
    version = str(torch.__version__ if version is None else version)
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise UnsupportedTorch(f"cannot read the torch version {version!r}")
    return int(match[1]), int(match[2])


def require_torch(floor: tuple[int, int], what: str, version: str | None = None) -> None:
    """Raise UnsupportedTorch (one line) unless torch is at least `floor`."""
    version = str(torch.__version__ if version is None else version)
    if torch_release(version) < floor:
        need = ".".join(map(str, floor))
        raise UnsupportedTorch(f"{what} needs torch>={need}, but torch {version} is installed: "
                               f"pip install 'torch>={need}'")


def _report_uncaught_in_one_line():
    """Make an UnsupportedTorch that nobody catches end the process as a `meshplan` user
    error does: one `meshplan: error:` line on stderr, exit code 2. Needed because the
    check runs while the `planner` package itself is imported - before `python -m
    planner.cli` (or the `meshplan` script) reaches the code that reports errors."""
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if not issubclass(kind, UnsupportedTorch):
            return previous(kind, exc, tb)
        print(f"meshplan: error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)     # after an uncaught exception the interpreter would exit 1

    sys.excepthook = hook


@functools.cache
def cpu_sdpa_fuses_gqa() -> bool:
    """Does CPU `F.scaled_dot_product_attention(..., enable_gqa=True)` run the fused flash
    kernel? 2.13 does; 2.7 decomposes it (repeat k/v, bmm, softmax, bmm), which saves other
    tensors for backward and hides the attention op from the tracer, though its flash
    kernel takes grouped k/v shapes when called directly (see trace.kernels.GroupedFlash; 2.8 is
    the same). Probed on a tiny call rather than read from the version, so whichever
    release changed it is handled."""
    from torch.utils._python_dispatch import TorchDispatchMode   # private; no public path

    class Seen(TorchDispatchMode):
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func)
            return func(*args, **(kwargs or {}))

    q = torch.zeros(1, 2, 4, 8, requires_grad=True)
    kv = torch.zeros(1, 1, 4, 8, requires_grad=True)
    with Seen() as seen:
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in seen.ops


def fsdp_replicate():
    """torch's FSDP-based `replicate` (ZeRO 0 that takes DTensor, i.e. tensor-parallel,
    parameters). Private: torch has no public equivalent (through 2.14 it lives only in
    torch.distributed._composable.replicate_with_fsdp; DDP, the public replicator, does not
    take DTensor parameters). Its signature as used here is 2.12's, the runtime floor."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    return replicate


def selective_checkpoint_ignores_profiler_ranges():
    """Make selective activation checkpointing ignore the profiler's record_function ops, as
    it ignores metadata ops (torch/utils/checkpoint.py, SAC_IGNORED_OPS; private, the same
    set on 2.10 and 2.13). An expert slice data-parallel over edp (runtime.expert_parallel)
    is an FSDP2 / replicate unit inside its block, so its hooks run inside the block's
    checkpointed region; 2.13 dispatches their profiler ranges through the checkpoint's
    modes, and under ZeRO 0 and 1 the recompute opens more of them than the forward did:
    "profiler._record_function_enter_new.default invocation index 2 encountered during
    backward but not found in storage" (measured; 2.10 runs it). A profiler range computes
    nothing, so nothing is lost by not caching or counting it. Idempotent."""
    from torch.utils import checkpoint
    checkpoint.SAC_IGNORED_OPS |= {torch.ops.profiler._record_function_enter_new.default,
                                   torch.ops.profiler._record_function_exit._RecordFunction}


def pipeline_first_stage_input(t: torch.Tensor) -> torch.Tensor:
    """A batch as torch's pipeline schedule may take it on its first stage: contiguous.
    2.10 and 2.11 record the first stage's input metadata from `x.to("meta")` of the first
    micro-batch (which lays a non-dense slice - `rows[:, :-1]`, micro-batch > 1 - out
    contiguously) and then check every micro-batch's strides against it, so a
    (b, seq) slice of the (b, seq + 1) token rows failed with "stride mismatch: expected
    (32, 1) actual (33, 1)" (torch/distributed/pipelining/stage.py `_validate_fwd_input`,
    removed in 2.12). A copy of the token ids on every release: it costs nothing."""
    return t.contiguous()


def pipeline_passes_integer_tensors() -> bool:
    """Can a pipeline stage receive an integer tensor (a factory model's labels, which ride
    through the stages that do not use them: runtime.split)? torch 2.10-2.12 mark every
    received stage input `requires_grad`, which integer tensors refuse ("only Tensors of
    floating point dtype can require gradients"; measured on 2.10, 2.11 and 2.12 with
    tests/runtime/test_runtime_factory.py); 2.13 runs them."""
    return torch_release() >= (2, 13)


def pipeline_divides_partial_grads() -> bool:
    """Can torch's pipeline schedule divide the gradients by the number of micro-batches
    itself (`scale_grads=True`, its default)? It does so in place on each gradient
    (torch/distributed/pipelining/stage.py `scale_grads`), and under tensor parallelism a
    replicated weight's gradient is still a Partial(sum) DTensor then. 2.11 made in-place
    division linear for Partial (torch/distributed/tensor/_ops/_pointwise_ops.py
    `linear_pointwise_ops`); 2.10 refuses it ("in-place operations that require placement
    changes are not supported"). Where this is False the runtime builds its schedules with
    `scale_grads=False` and divides each gradient's local tensor itself right after the
    schedule's step - the same arithmetic at the same point (after the stage's gradient
    reduction; runtime.pipeline.divide_grads)."""
    return torch_release() >= (2, 11)


def fsdp_param_groups(state) -> list:
    """The FSDPParamGroups of one FSDP2 (or FSDP-based replicate) module state - private, read
    only by tests that count what each rank holds. 2.12 lets a state hold several
    (`_fsdp_param_groups`); 2.10 and 2.11 hold at most one (`_fsdp_param_group`)
    (torch/distributed/fsdp/_fully_shard/_fsdp_state.py)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


try:
    require_torch(PLANNER_MIN_TORCH, "meshplan")
except UnsupportedTorch:
    _report_uncaught_in_one_line()
    raise


def traces_attention_core() -> bool:
    """Whether the tracer can find an attention core to recompute (checkpoint mode
    "attention"): the models label its ops with `torch.fx.traceback.annotate`, which 2.10
    added (torch/fx/traceback.py; 2.7-2.9 lack it); without it the mode would be priced as
    no recompute at all, so planner.simulate refuses it in one line."""
    import torch.fx.traceback as fx_traceback
    return hasattr(fx_traceback, "annotate")

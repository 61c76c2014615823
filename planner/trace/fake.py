"""Running model code on fake CPU tensors: fake parameters and buffers, the precision's
autocast, and the module path recorded on every traced node."""
from __future__ import annotations

import contextlib

import torch
import torch.fx.traceback as fx_traceback
import torch.nn as nn

from planner.plan import low_precision_dtype
from planner.trace.inputs import TensorSpec


def state_dtype(dtype: torch.dtype, low: torch.dtype | None) -> torch.dtype:
    """A floating parameter's dtype in the trace: `low` when parameters are held in the low
    precision (cast "params"), else its own."""
    return low if low is not None and dtype.is_floating_point else dtype


def fake_state(module: nn.Module, low: torch.dtype | None = None) -> tuple[list[str], list[torch.Tensor], list[bool]]:
    """Names, fake copies (call inside a FakeTensorMode) and is-parameter flags of the
    module's parameters and buffers; tied parameters appear once. Parameters take the
    dtype `low` when given (see planner.plan.CASTS)."""
    names, tensors, is_param = [], [], []
    for name, p in module.named_parameters():
        fake = torch.empty_strided(p.shape, p.stride(), dtype=state_dtype(p.dtype, low), device="cpu")
        names.append(name)
        tensors.append(nn.Parameter(fake, requires_grad=p.requires_grad))
        is_param.append(True)
    for name, b in module.named_buffers():
        names.append(name)
        tensors.append(torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu"))
        is_param.append(False)
    return names, tensors, is_param


@contextlib.contextmanager
def batch_norm_in_fp32(model: nn.Module, low: torch.dtype | None):
    """Under cast "params" (`low` given), every BatchNorm runs in fp32 on an fp32 copy of its
    input and hands on its output in `low`: the runtime keeps BatchNorm out of FSDP2's low
    precision (runtime.parallelize.data_parallel), as FSDP1's MixedPrecision does by default
    (torch/distributed/fsdp/api.py, MixedPrecision._module_classes_to_ignore), because the
    batch-norm kernels take 16-bit inputs only with fp32 weights and statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if low is not None else []
    saved = {id(m): m.__dict__.get("forward") for m in norms}
    for m in norms:
        inner = saved[id(m)] or type(m).forward.__get__(m)

        def forward(x, *args, _inner=inner, **kwargs):
            return _inner(x.float(), *args, **kwargs).to(low)

        m.forward = forward
    try:
        yield
    finally:
        for m in norms:
            if saved[id(m)] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = saved[id(m)]


def autocast(precision: str, enabled: bool = True):
    dtype = low_precision_dtype(precision)
    if dtype is None or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


@contextlib.contextmanager
def module_stack(model: nn.Module):
    """Record, on every fx node created inside a module's forward, the stack of
    (module path, class name) it ran in: `node.meta["nn_module_stack"]`."""
    names = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), (path, type(mod).__name__))
    stack = []

    def push(mod, args):
        entry = names.get(id(mod))
        if entry is not None:
            stack.append(entry)
            fx_traceback.current_meta["nn_module_stack"] = tuple(stack)

    def pop(mod, args, out):
        if names.get(id(mod)) is not None and stack:
            stack.pop()
            fx_traceback.current_meta["nn_module_stack"] = tuple(stack)

    pre = torch.nn.modules.module.register_module_forward_pre_hook(push)
    post = torch.nn.modules.module.register_module_forward_hook(pop)
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        pre.remove()
        post.remove()


def make_state(spec: TensorSpec, is_param: bool) -> torch.Tensor:
    t = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="cpu")
    return nn.Parameter(t, requires_grad=spec.requires_grad) if is_param else t

"""Measured activation memory: the bytes a layer keeps for backward under each
checkpoint mode, run forward and backward on fake tensors."""
from __future__ import annotations

import contextlib
import gc
from typing import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from planner.arch.layers import every_other_product_policy
from planner.plan import CHECKPOINT_MODES
from planner.trace.fake import autocast, make_state
from planner.trace.inputs import backward_from
from planner.trace.kernels import kernel_choices
from planner.trace.program import Program
from planner.trace.ops import is_attention, op_name, tensors_in

aten = torch.ops.aten
_SAC_SAVE = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                       aten._scaled_mm.default, aten.convolution.default})


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


# Ops that copy a tensor (autocast's cast of a weight is `_to_copy`).
_PARAM_COPY_OPS = frozenset({"_to_copy", "clone", "copy", "contiguous", "_copy_from_and_resize"})


class _StorageRecorder(TorchDispatchMode):
    """Records every storage an op creates (weakly), and which are copies of parameters
    (a cast or clone of a parameter, or of such a copy)."""

    def __init__(self, param_keys: set):
        super().__init__()
        self.param_keys = param_keys
        self.created: dict[StorageWeakRef, int] = {}
        self.param_copies: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy_of_param = (op_name(func) in _PARAM_COPY_OPS and isinstance(args[0], torch.Tensor)
                         and _storage_key(args[0]) in self.param_keys | self.param_copies)
        for t in tensors_in(out):
            key = _storage_key(t)
            if key not in self.created:
                self.created[key] = t.untyped_storage().nbytes()
            if copy_of_param:
                self.param_copies.add(key)
        return out


def _with_kernels(kernels, fn, *args):
    """fn under `kernel_choices(kernels)`, entered inside the function a checkpoint replays:
    the recomputation in backward runs outside any mode the forward was called in."""
    with kernel_choices(kernels):
        return fn(*args)


def _selective_policy(weight_keys: Callable[[], set]):
    """Selective recompute, as the runtime applies it (runtime/parallelize.py), torchtitan's
    op-level policy (planner.arch.layers.every_other_product_policy): save the fused attention
    kernels' outputs and those of every other matmul/convolution that consumes a weight (a
    parameter or autocast's copy of one) - the linear layers; recompute the rest: the other
    linear layers, norms, activations, casts. With flash attention there is no T x T score
    matrix to spare, so recomputing the attention kernel would cost time and save nothing."""

    def weight_product(op, args) -> bool:
        if op not in _SAC_SAVE:
            return False
        keys = weight_keys()
        return any(isinstance(a, torch.Tensor) and _storage_key(a) in keys for a in args)

    return every_other_product_policy(lambda op, args: is_attention(op_name(op)) or weight_product(op, args),
                                      weight_product)


def measure_saved(program: Program, precision: str, kernels: str = "cuda",
                  checkpointable: bool = True) -> dict[str, int]:
    """Activation bytes kept for backward under each checkpoint mode (none / attention /
    selective / full), and autocast's saved parameter copies (see `planner.ir.LayerCost`).
    A layer that is never checkpointed keeps the same bytes in every mode (measured once),
    and so does "attention" in a block without a recompute_attention flag (nothing reruns)."""
    none, copies = _measure_variant(program, precision, kernels, None)
    saved = {mode: none for mode in CHECKPOINT_MODES}
    if checkpointable:
        for mode in ("full", "selective") + (("attention",) if _recomputes_attention(program) else ()):
            saved[mode], _ = _measure_variant(program, precision, kernels, mode)
    return {**saved, "param_copies": copies}


def _recomputes_attention(program: Program) -> bool:
    return hasattr(program.module, "recompute_attention")


@contextlib.contextmanager
def _attention_recomputed(module: nn.Module):
    """The block with its attention core rerun in backward, as the runtime sets it."""
    before, module.recompute_attention = module.recompute_attention, True
    try:
        yield
    finally:
        module.recompute_attention = before


def _measure_variant(program: Program, precision: str, kernels: str, variant: str | None) -> tuple[int, int]:
    fake = FakeTensorMode()
    with fake:
        state = [make_state(s, is_p) for s, is_p in zip(program.state_specs, program.state_is_param)]
        inputs = [s.make() for s in program.input_specs]
    state_keys = {_storage_key(t) for t in state}
    param_keys = {_storage_key(t) for t, is_p in zip(state, program.state_is_param) if is_p}
    input_sizes = {_storage_key(t): t.untyped_storage().nbytes() for t in inputs}
    saved: dict[StorageWeakRef, int] = {}

    def pack(t):
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    recorder = _StorageRecorder(param_keys)
    with fake, autocast(precision, program.autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        if variant is None:
            out = _with_kernels(kernels, program.fn, state, inputs)
        elif variant == "attention":
            with _attention_recomputed(program.module):
                out = _with_kernels(kernels, program.fn, state, inputs)
        else:
            weights = lambda: param_keys | recorder.param_copies   # noqa: E731
            context = ((lambda: create_selective_checkpoint_contexts(_selective_policy(weights)))
                       if variant == "selective" else None)
            kwargs = dict(context_fn=context) if context else {}
            out = checkpoint(_with_kernels, kernels, program.fn, state, inputs, use_reentrant=False,
                             preserve_rng_state=False, **kwargs)
    outputs = tensors_in(out)
    del out, inputs
    gc.collect(0)  # autograd frees by refcount; a young-generation pass catches fresh cycles cheaply
    if variant is None:
        result = sum(b for k, b in saved.items() if k not in state_keys and k not in recorder.param_copies)
        copies = sum(b for k, b in saved.items() if k in recorder.param_copies)
    else:
        # alive storages: what the saved-tensor hooks cannot see - a checkpoint keeps its
        # inputs by reference (the attention core's q, k, v), and packs what it saves
        # through its own hooks. Autocast's weight copies are counted apart, as above.
        output_keys = {_storage_key(t) for t in outputs}
        candidates = {**recorder.created, **input_sizes}
        result = sum(b for k, b in candidates.items()
                     if not k.expired() and k not in state_keys and k not in output_keys
                     and k not in recorder.param_copies)
        copies = 0
    # the step must complete: backward consumes what was saved, and an attention core
    # recomputed in it picks the kernels its forward picked
    with fake, kernel_choices(kernels):
        backward_from(outputs)
    return result, copies

"""The tracer: model -> fx graph -> aten ops grouped into layers, each costed once per signature.

How it works, and why:

1. **Layers.** Repeated blocks are found structurally: the children of an
   `nn.ModuleList`/`ModuleDict`/`Sequential` that are all of one class (a transformer's
   `blocks`/`layers`/`h`). Each call of such a child is a block layer. The top-level code
   around them (embeddings before the first block, norm/head/loss after the last) forms the
   non-repeated layers. A model without repeated blocks that is an `nn.Sequential` gets one
   layer per child; any other model is one layer.
2. **Skeleton trace (the routes).** `torch.fx.symbolic_trace` with every block as a leaf is
   tried first; when the model has Python control flow that fx cannot see through
   (branches on shapes, iteration over proxies, HF's mask and cache code) we fall back to
   `make_fx` on the module itself, which executes that Python with concrete shapes. Either
   program is then lowered by `make_fx` under `FakeTensorMode` (CPU device, the precision's
   autocast): this is the shape propagation, and it yields the aten ops that actually run,
   casts included. During that lowering every block call is replaced by one opaque
   `meshplan::unit` op whose outputs have the block's real output shapes, computed by running
   the block once per signature. So the skeleton costs O(depth) Python calls but only
   O(unique blocks) tensor work: GPT-3 175B traces in seconds.
3. **Signatures.** A block's signature hashes its module class, parameter/buffer names,
   shapes and dtypes, its plain attributes (numbers, strings; attributes naming the layer's
   index, such as HF's `layer_idx`, are excluded - they only pick a cache slot) and the
   shapes/dtypes of its inputs. Equal signatures are costed once.
4. **Costing one signature.** The layer is traced alone with `make_fx` (aten ops with module
   paths, dtypes after autocast), each op classified and given FLOPs/bytes from its shapes
   (conventions in `planner.ir`), and the layer is then run forward and backward on fake
   tensors once per checkpoint mode (planner.plan.CHECKPOINT_MODES) - plain, with its
   attention core recomputed, op-level selective, fully checkpointed - to *measure* the
   activation memory autograd keeps (see `planner.ir.LayerCost`): saved tensors are seen
   by `saved_tensors_hooks`, what a checkpoint keeps by which storages created in the
   forward are still alive after it (a dispatch mode holds weak references to them).
   The attention core's ops are those the model labels ATTENTION_CORE
   (planner.arch.layers.causal_attention); a block recomputes them when its
   `recompute_attention` flag is set.

Fake tensors live on the CPU device, so kernels are chosen by CPU dispatch: SDPA runs the
CPU flash-attention kernel, which saves what GPU flash attention saves (q, k, v, output,
logsumexp), and autocast uses the CPU op lists (matmuls and attention in low precision, as
on CUDA). Where CPU and CUDA dispatch save different tensors, `kernels="cuda"` (the
default) substitutes the CUDA choice - fused RMSNorm, flash attention with dropout, fused
dropout (`_CudaKernels`) - and `kernels="cpu"` keeps plain CPU dispatch (grouped-query
attention fused as 2.13 fuses it, also on 2.7 and 2.8: `_FusedCpuGqa`), which is what the
tests compare byte for byte with real CPU steps run under the same `kernel_choices`. Parameters are never materialised:
models are built on the meta device and swapped for fake tensors with
`torch.func.functional_call`.

Inputs: zoo decoders take `(idx, targets)`, Hugging Face causal LMs `input_ids`/`labels`.
A `file.py:factory` model defines `example_inputs(micro_batch, seq)` next to the factory,
returning a tensor, a tuple of positional arguments or a dict of keyword arguments; it is
called under the meta device (only shapes and dtypes are used). The traced step starts
backward from the first tensor the model returns (its loss, or ones as the gradient of
a non-scalar output).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import inspect
import linecache
import operator
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cost_models.errors import MeshplanError
from planner import hf
from planner.ir import ATTENTION_BWD_FACTOR, Layer, LayerCost, OpInfo, TracedModel
from planner.arch.layers import ATTENTION_CORE
from planner.models import Decoder
from planner.plan import CHECKPOINT_MODES
from planner.torch_compat import cpu_sdpa_fuses_gqa
from planner.zoo import ModelSpec, load_model

aten = torch.ops.aten
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How a low precision is applied: "autocast" keeps fp32 parameters and casts per op (each
# forward casts every weight); "params" holds the parameters themselves in the low precision
# (FSDP2's MixedPrecisionPolicy, Megatron-LM/DeepSpeed fp16 with fp32 master weights in the
# optimizer): no per-op casts, and norms and the residual stream run in the low precision.
CASTS = ("autocast", "params")
ROUTES = ("torch.fx.symbolic_trace", "make_fx")


# ----------------------------------------------------------------------------- public API

def trace_model(model, micro_batch: int, seq: int, precision: str = "bf16", inputs=None,
                kernels: str = "cuda", cast: str = "autocast") -> TracedModel:
    """Trace one training step (forward + backward) of `model` for a micro-batch.

    `model`: an nn.Module (built on the meta device, ideally), a `ModelSpec`, anything
    `planner.zoo.load_model` accepts, or a Hugging Face config (dict with `model_type`,
    config.json path or model directory). `inputs` overrides the example inputs: a tensor,
    a tuple of positional arguments, a dict of keyword arguments, or a callable
    `(micro_batch, seq) -> one of those`. `kernels`: "cuda" measures what a GPU step saves
    (fused RMSNorm and dropout, flash attention with dropout); "cpu" what a CPU step saves.
    `cast`: how the low precision is applied, "autocast" or "params" (see CASTS).
    """
    start = time.perf_counter()
    _check_step(micro_batch, seq, precision)
    if kernels not in KERNELS:
        raise MeshplanError(f"kernels {kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if cast not in CASTS:
        raise MeshplanError(f"cast {cast!r} is unknown; use one of {', '.join(CASTS)}")
    low = PRECISION_DTYPES[precision] if cast == "params" else None
    module, name, call = _resolve(model, micro_batch, seq, inputs)
    units = find_units(module)
    with hf.eager_masks(module):
        skeleton, route = _trace_skeleton(module, name, call, units, precision, kernels, low)
        layers, programs = _split_layers(skeleton, module, low)
        costs: dict[str, LayerCost] = {}
        for layer in layers:
            if layer.signature not in costs:
                never_checkpointed = layer.kind in ("embedding", "head")
                costs[layer.signature] = _cost_program(layer.signature, programs[layer.signature], precision,
                                                       module, kernels, checkpointable=not never_checkpointed)
    params = list(module.parameters())  # tied parameters once
    return TracedModel(
        name=name, micro_batch=micro_batch, seq=seq, precision=precision, cast=cast, route=route,
        layers=layers, costs=costs, param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        trace_seconds=time.perf_counter() - start)


def trace_hf(config, micro_batch: int, seq: int, precision: str = "bf16", kernels: str = "cuda") -> TracedModel:
    """Trace a Hugging Face causal LM from its config alone (dict, config.json or directory)."""
    return trace_model(hf.hf_model_from_config(config), micro_batch, seq, precision, kernels=kernels)


def flop_counter_reference(model, micro_batch: int, seq: int, inputs=None) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step as `FlopCounterMode` counts them on meta tensors.

    The independent cross-check of our per-op FLOPs: on meta, SDPA runs its math
    decomposition, so attention is counted as full T x T bmms with a 2x backward (compare
    with `TracedModel.flop_counter_flops()`)."""
    from torch.utils.flop_counter import FlopCounterMode

    module, _, call = _resolve(model, micro_batch, seq, inputs)
    args, kwargs = call.build(device="meta")
    try:
        with hf.eager_masks(module), FlopCounterMode(display=False) as fwd:
            out = _primary_output(module(*args, **kwargs))
        with FlopCounterMode(display=False) as bwd:
            _backward_from([out])
        return fwd.get_total_flops(), bwd.get_total_flops()
    finally:
        for p in module.parameters():
            p.grad = None


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class TensorSpec:
    """Shape, strides, dtype and requires_grad of a tensor: enough to recreate it fake."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    requires_grad: bool = False

    @classmethod
    def of(cls, t: torch.Tensor, requires_grad: bool | None = None) -> "TensorSpec":
        rg = t.requires_grad if requires_grad is None else requires_grad
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, bool(rg))

    def make(self, device: str | torch.device = "cpu") -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)
        return t.requires_grad_() if self.requires_grad else t

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize

    def key(self) -> str:
        return f"T{self.shape}{self.stride}{self.dtype}{'g' if self.requires_grad else ''}"


@dataclass
class _Call:
    """The arguments of a call, tensors replaced by their specs: (args, kwargs) as a pytree."""

    tree: Any
    leaves: list

    @classmethod
    def from_example(cls, args: tuple, kwargs: dict) -> "_Call":
        leaves, tree = tree_flatten((tuple(args), dict(kwargs)))
        leaves = [TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        return cls(tree, leaves)

    def tensor_specs(self) -> list[TensorSpec]:
        return [x for x in self.leaves if isinstance(x, TensorSpec)]

    def rebuild(self, tensors: list) -> tuple[tuple, dict]:
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorSpec) else x for x in self.leaves]
        return tree_unflatten(leaves, self.tree)

    def build(self, device="cpu") -> tuple[tuple, dict]:
        return self.rebuild([s.make(device) for s in self.tensor_specs()])


def _check_step(micro_batch, seq, precision):
    for key, value in (("micro_batch", micro_batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeshplanError(f"{key} must be a whole number >= 1, got {value!r}")
    if precision not in PRECISION_DTYPES:
        raise MeshplanError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISION_DTYPES)}")


def _resolve(model, micro_batch: int, seq: int, inputs) -> tuple[nn.Module, str, _Call]:
    """The module (on meta unless the caller built it elsewhere), a display name, and its call."""
    if isinstance(model, (str, Path, dict)) and hf.is_hf_config(model):
        model = hf.hf_model_from_config(model)
    elif isinstance(model, (str, dict)):
        model = load_model(model)
    factory_module = None
    if isinstance(model, ModelSpec):
        name = model.name
        if model.factory is not None:
            factory_module = sys.modules.get(getattr(model.factory, "__module__", None))
        model = model.build("meta")
    elif isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "name", None) if isinstance(model, Decoder) else None
        name = name or (hf.hf_model_name(model) if hf.is_hf_model(model) else type(model).__name__)
        factory_module = sys.modules.get(type(model).__module__)
    else:
        raise MeshplanError(f"cannot trace a {type(model).__name__}: pass an nn.Module, a preset name, "
                            "a JSON config, file.py:factory or a Hugging Face config")
    return model, name, _example_call(model, name, micro_batch, seq, inputs, factory_module)


def _example_call(model, name, micro_batch, seq, inputs, factory_module) -> _Call:
    if inputs is not None:
        return _call_from_user(inputs, micro_batch, seq, name)
    if isinstance(model, Decoder):
        if seq > model.config.max_seq:
            raise MeshplanError(f"sequence length {seq} exceeds {name}'s max_seq {model.config.max_seq}")
        idx = TensorSpec((micro_batch, seq), (seq, 1), torch.int64)
        return _Call.from_example((idx.make("meta"), idx.make("meta")), {})
    if hf.is_hf_model(model):
        limit = hf.hf_max_positions(model)
        if limit is not None and seq > limit:
            raise MeshplanError(f"sequence length {seq} exceeds {name}'s max_position_embeddings {limit}")
        ids = torch.empty(micro_batch, seq, dtype=torch.int64, device="meta")
        return _Call.from_example((), dict(input_ids=ids, labels=ids.clone(), use_cache=False))
    maker = getattr(factory_module, "example_inputs", None)
    if not callable(maker):
        raise MeshplanError(f"model {name!r} is not a zoo or Hugging Face model: define "
                            "example_inputs(micro_batch, seq) next to its factory, or pass inputs=")
    return _call_from_user(maker, micro_batch, seq, name)


def _call_from_user(inputs, micro_batch, seq, name) -> _Call:
    if callable(inputs):
        try:
            with torch.device("meta"):
                inputs = inputs(micro_batch, seq)
        except MeshplanError:
            raise
        except Exception as exc:  # the user's function: its errors are theirs to fix
            raise MeshplanError(f"example_inputs of {name!r} failed: {type(exc).__name__}: {exc}")
    if isinstance(inputs, torch.Tensor):
        return _Call.from_example((inputs,), {})
    if isinstance(inputs, dict):
        return _Call.from_example((), inputs)
    if isinstance(inputs, (tuple, list)):
        return _Call.from_example(tuple(inputs), {})
    raise MeshplanError(f"example inputs of {name!r} must be a tensor, a tuple or a dict, "
                        f"not {type(inputs).__name__}")


def _primary_output(out):
    """The tensor a training step calls backward on: the loss, else the first tensor."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise MeshplanError(f"the model returned no tensor ({type(out).__name__}); nothing to train")


def _backward_from(outputs: list):
    """Backward from every float output that needs grad (ones as the incoming gradient).

    Runs autograd's engine directly: `torch.autograd.backward` is itself a torch function,
    and a TorchFunctionMode's handler runs it with the mode popped, so the kernel choices
    (`kernel_choices`) would not reach a checkpoint that recomputes in backward."""
    outs = tuple(t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad)
    if outs:
        torch.autograd.graph._engine_run_backward(outs, tuple(torch.ones_like(t) for t in outs), False, False,
                                                  (), True, True)


# ----------------------------------------------------------------------------- units (blocks)

# Attributes that only number a layer (HF's layer_idx picks a KV-cache slot): two blocks
# differing only here compute the same thing.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num",
                          "block_idx", "block_id", "block_index"})


def _is_repeated(container: nn.Module) -> bool:
    """A trunk of blocks: a ModuleList/ModuleDict of 2+ callable modules (their classes
    may differ - hybrid stacks - signatures tell the blocks apart), or an nn.Sequential
    of 2+ modules of one class (a Sequential of mixed classes is a plain pipeline)."""
    children = list(container.children())
    if len(children) < 2 or any(isinstance(c, (nn.ModuleList, nn.ModuleDict)) for c in children):
        return False
    if isinstance(container, nn.Sequential):
        return len({type(c) for c in children}) == 1
    return isinstance(container, (nn.ModuleList, nn.ModuleDict))


def find_units(model: nn.Module) -> dict[str, str]:
    """Module path -> layer kind ("block" or "other") of the modules that become layers.

    Blocks: children of the outermost trunks (`_is_repeated`). Without any, an
    nn.Sequential model's children become layers of kind "other"."""
    units: dict[str, str] = {}

    def visit(module: nn.Module, path: str):
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if _is_repeated(child):
                units.update({f"{child_path}.{n}": "block" for n, _ in child.named_children()})
            else:
                visit(child, child_path)

    if _is_repeated(model):
        return {n: "block" for n, _ in model.named_children()}
    visit(model, "")
    if not units and isinstance(model, nn.Sequential):
        units = {n: "other" for n, _ in model.named_children()}
    return units


def _plain(value, depth=0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)) and depth < 2 and len(value) <= 64:
        return all(_plain(v, depth + 1) for v in value)
    return False


@functools.lru_cache(maxsize=None)
def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_signature(module: nn.Module) -> str:
    """Hash of what makes two modules compute the same thing on the same inputs."""
    h = hashlib.sha1()
    for name, sub in module.named_modules():
        h.update(f"|{name}:{_class_name(type(sub))}:{sub.training}".encode())
        for key, value in sorted(vars(sub).items()):
            if not key.startswith("_") and key not in _INDEX_ATTRS and key != "training" and _plain(value):
                h.update(f"{key}={value!r};".encode())
        for kind, tensors in (("P", sub._parameters), ("B", sub._buffers)):
            for key, t in tensors.items():
                if t is not None:
                    h.update(f"{kind}{key}{tuple(t.shape)}{t.dtype}{t.requires_grad};".encode())
    return h.hexdigest()


def _value_key(value) -> str:
    if isinstance(value, TensorSpec):
        return value.key()
    if _plain(value):
        return repr(value)
    return _class_name(type(value))


def _digest(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- fake execution helpers

def _state_dtype(dtype: torch.dtype, low: torch.dtype | None) -> torch.dtype:
    """A floating parameter's dtype in the trace: `low` when parameters are held in the low
    precision (cast "params"), else its own."""
    return low if low is not None and dtype.is_floating_point else dtype


def _fake_state(module: nn.Module, low: torch.dtype | None = None) -> tuple[list[str], list[torch.Tensor], list[bool]]:
    """Names, fake copies (call inside a FakeTensorMode) and is-parameter flags of the
    module's parameters and buffers; tied parameters appear once. Parameters take the
    dtype `low` when given (see CASTS)."""
    names, tensors, is_param = [], [], []
    for name, p in module.named_parameters():
        fake = torch.empty_strided(p.shape, p.stride(), dtype=_state_dtype(p.dtype, low), device="cpu")
        names.append(name)
        tensors.append(nn.Parameter(fake, requires_grad=p.requires_grad))
        is_param.append(True)
    for name, b in module.named_buffers():
        names.append(name)
        tensors.append(torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu"))
        is_param.append(False)
    return names, tensors, is_param


def _autocast(precision: str, enabled: bool = True):
    dtype = PRECISION_DTYPES[precision]
    if dtype is None or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


@contextlib.contextmanager
def _module_stack(model: nn.Module):
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


class _CudaKernels(TorchFunctionMode):
    """Pick the kernels a CUDA training step picks where the CPU picks others.

    We measure on fake CPU tensors but the numbers stand for a GPU step. Three CPU
    dispatch choices save different tensors than CUDA's: (1) SDPA with dropout has no CPU
    fused kernel, and the math path saves the T x T probabilities; CUDA flash attention
    supports dropout, so we run the flash kernel; the same for grouped-query attention
    where the installed torch decomposes it on CPU. (2) CPU dropout saves a mask in the
    input's dtype; CUDA's fused `native_dropout` saves a bool mask. (3) `F.rms_norm` is
    composite on CPU and saves the normalised activations; CUDA (torch >= 2.8) runs
    `_fused_rms_norm`, which saves only the input and rstd (as `meshplan::fused_rms_norm` does).
    Everything else passes through unchanged. One known difference is left, as too small to
    matter: CUDA's `native_layer_norm` keeps a 16-bit input's mean and rstd in fp32, the CPU
    and meta kernels in the input's dtype - 4 bytes a token per LayerNorm under-counted
    (GPT, h 4096: 8 of the 100-140 KB a block saves per token, under 0.01 %)."""

    @property
    def choices(self) -> dict:
        return _CUDA_CHOICES

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = self.choices.get(func)
        if replacement is not None:
            out = replacement(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """The flash kernel where CPU dispatch would decompose SDPA: with dropout, and with
    grouped k/v on a torch whose CPU SDPA does not fuse GQA (see cpu_sdpa_fuses_gqa)."""
    if not (dropout_p or _gqa_decomposed(enable_gqa)):
        return None
    if attn_mask is not None or query.dim() != 4 or query.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if key.shape[1] != query.shape[1] and not cpu_sdpa_fuses_gqa():
        return _GroupedFlash.apply(query, key, value, dropout_p, is_causal, scale)
    return aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


def _gqa_decomposed(enable_gqa):
    return enable_gqa and not cpu_sdpa_fuses_gqa()


cpu_sdpa_fuses_gqa()   # probe (cached) at import, outside the fake and dispatch modes traces run under


class _GroupedFlash(torch.autograd.Function):
    """Flash attention over grouped k/v for a torch whose CPU flash kernel does not take
    them (2.7 accepts the shapes but computes wrong outputs and gradient shapes). The
    kernel runs on k/v repeated to the query heads - two extra copies in the traced
    forward - but what it keeps for backward is what a GQA-fusing kernel keeps (q, the
    grouped k and v, output, logsumexp), so activation memory is what 2.13 counts."""

    @staticmethod
    def forward(ctx, query, key, value, dropout_p, is_causal, scale):
        groups = query.shape[1] // key.shape[1]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), dropout_p, is_causal,
            scale=scale)[:2]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.args = groups, dropout_p, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        groups, dropout_p, is_causal, scale = ctx.args
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), out, lse,
            dropout_p, is_causal, scale=scale)
        fold = lambda g: g.unflatten(1, (key.shape[1], groups)).sum(2)  # noqa: E731
        return dq, fold(dk), fold(dv), None, None, None


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    if not training or not p or inplace or not input.dtype.is_floating_point:
        return None
    return aten.native_dropout(input, p, True)[0]


@torch.library.custom_op("meshplan::fused_rms_norm", mutates_args=())
def _fused_rms_norm_op(x: torch.Tensor, weight: torch.Tensor | None, dims: list[int],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as CUDA's `_fused_rms_norm` runs it: statistics in (at least) fp32, and -
    see its autograd below - only the input, rstd and weight saved for backward. An op of
    its own, so that it stays one node (with this autograd) in traced aten graphs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    rstd = torch.rsqrt(x.to(acc).pow(2).mean(dims, keepdim=True) + eps)
    y = (x.to(acc) * rstd).to(x.dtype)
    return (y * weight if weight is not None else y), rstd


@_fused_rms_norm_op.register_fake
def _fused_rms_norm_fake(x, weight, dims, eps):
    stats = [1 if i - x.dim() in dims else s for i, s in enumerate(x.shape)]
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(stats, dtype=torch.promote_types(x.dtype, torch.float32))


def _fused_rms_norm_setup(ctx, inputs, output):
    x, weight, dims, _ = inputs
    ctx.save_for_backward(x, output[1], weight)
    ctx.dims = dims


def _fused_rms_norm_backward(ctx, grad, _grad_rstd):
    x, rstd, weight = ctx.saved_tensors
    xhat = x.to(rstd.dtype) * rstd
    grad_weight = None
    if weight is not None and ctx.needs_input_grad[1]:
        batch_dims = tuple(range(grad.dim() - len(ctx.dims)))
        grad_weight = (grad.to(rstd.dtype) * xhat).sum(batch_dims).to(weight.dtype)
    g = (grad * weight if weight is not None else grad).to(rstd.dtype)
    grad_x = rstd * (g - xhat * (g * xhat).mean(ctx.dims, keepdim=True))
    return grad_x.to(x.dtype), grad_weight, None, None


_fused_rms_norm_op.register_autograd(_fused_rms_norm_backward, setup_context=_fused_rms_norm_setup)


def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):
    if not input.dtype.is_floating_point:
        return None
    dims = list(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return _fused_rms_norm_op(input, weight, dims, eps)[0]


_CUDA_CHOICES = {F.scaled_dot_product_attention: _flash_attention, F.dropout: _fused_dropout,
                 F.rms_norm: _fused_rms_norm}
KERNELS = ("cuda", "cpu")


class _FusedCpuGqa(_CudaKernels):
    """Plain CPU dispatch, but grouped-query SDPA runs the fused CPU kernel on every
    supported torch (2.13 dispatches it there itself), so a trace does not depend on the
    release."""

    @property
    def choices(self) -> dict:
        return {F.scaled_dot_product_attention: _flash_for_gqa}


def _flash_for_gqa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        return None     # CPU's own choice: the math path
    return _flash_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def kernel_choices(kernels: str = "cuda"):
    """Context in which ops dispatch as on `kernels`: "cuda" (what a GPU step runs, see
    `_CudaKernels`) or "cpu" (plain CPU dispatch, grouped-query attention fused)."""
    if kernels == "cuda":
        return _CudaKernels()
    return contextlib.nullcontext() if cpu_sdpa_fuses_gqa() else _FusedCpuGqa()


# ----------------------------------------------------------------------------- the opaque unit op

_UNIT_OUTPUTS: dict[str, list[TensorSpec]] = {}


@torch.library.custom_op("meshplan::unit", mutates_args=())
def _unit_op(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """A whole block, as one node of the skeleton graph; it only ever runs on fake tensors."""
    raise RuntimeError("meshplan::unit stands for a traced block and has no real kernel")


@_unit_op.register_fake
def _unit_op_fake(inputs, key):
    return [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device="cpu") for s in _UNIT_OUTPUTS[key]]


@dataclass
class _UnitCall:
    """One call of a block during the skeleton trace."""

    path: str
    kind: str
    module: nn.Module
    signature: str
    call: _Call          # its inputs (specs) and their structure
    out_tree: Any
    out_leaves: list     # TensorSpec for tensors, values otherwise


class _UnitStubs:
    """While active, calling a unit records the call and returns the outputs of one
    `meshplan::unit` op instead of running the block; the first call of each signature
    runs the real block (untraced) to learn its output shapes."""

    def __init__(self, units: dict[str, str], model: nn.Module):
        self.units = {path: (model.get_submodule(path), kind) for path, kind in units.items()}
        self.calls: list[_UnitCall] = []
        self.outputs: dict[str, tuple[Any, list]] = {}
        self.token = f"{id(self)}:{time.perf_counter_ns()}"
        self._module_sigs: dict[int, str] = {}
        self._saved: dict[int, Any] = {}

    def __enter__(self):
        for path, (mod, kind) in self.units.items():
            own = self._saved[id(mod)] = mod.__dict__.get("forward")
            forward = own if own is not None else type(mod).forward.__get__(mod)
            mod.forward = functools.partial(self._stub, path, kind, mod, forward)
        return self

    def __exit__(self, *exc):
        for mod, _ in self.units.values():
            saved = self._saved.pop(id(mod), None)
            if saved is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
        for key in [k for k in _UNIT_OUTPUTS if k.startswith(self.token)]:
            del _UNIT_OUTPUTS[key]

    def _module_sig(self, mod):
        if id(mod) not in self._module_sigs:
            self._module_sigs[id(mod)] = module_signature(mod)
        return self._module_sigs[id(mod)]

    def _stub(self, path, kind, mod, forward, *args, **kwargs):
        call = _Call.from_example(args, kwargs)
        sig = f"{type(mod).__name__}:" + _digest(self._module_sig(mod), *map(_value_key, call.leaves))
        if sig not in self.outputs:
            with disable_proxy_modes_tracing():
                out = forward(*args, **kwargs)
            leaves, tree = tree_flatten(out)
            specs = [TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves]
            self.outputs[sig] = (tree, specs)
            _UNIT_OUTPUTS[f"{self.token}:{sig}"] = [s for s in specs if isinstance(s, TensorSpec)]
        tree, specs = self.outputs[sig]
        self.calls.append(_UnitCall(path, kind, mod, sig, call, tree, specs))
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        with torch.no_grad():
            outs = iter(_unit_op(tensors, f"{self.token}:{sig}"))
        leaves = []
        for spec in specs:
            if isinstance(spec, TensorSpec):
                t = next(outs)
                leaves.append(t.requires_grad_() if spec.requires_grad else t)
            else:
                leaves.append(spec)
        return tree_unflatten(leaves, tree)


# ----------------------------------------------------------------------------- skeleton trace

class _LeafTracer(fx.Tracer):
    """symbolic_trace that keeps each unit (block) as one call_module node."""

    def __init__(self, unit_modules):
        super().__init__()
        self.unit_ids = {id(m) for m in unit_modules}

    def is_leaf_module(self, m, qualname):
        return id(m) in self.unit_ids or super().is_leaf_module(m, qualname)


@dataclass
class _Skeleton:
    gm: fx.GraphModule        # aten graph; placeholders = state tensors, then input tensors
    state_names: list
    state_is_param: list
    state_requires_grad: list
    call: _Call
    calls: list               # _UnitCall per meshplan::unit node, in graph order


def _symbolic_root(module: nn.Module, call: _Call, units: dict[str, str]) -> nn.Module:
    """Route 1: an fx GraphModule of the model with each block as one call_module node.

    The call's tensor arguments become placeholders; its other arguments and the defaults
    of the ones it leaves out are baked in as concrete values."""
    slot = object()
    args, kwargs = call.rebuild([slot] * len(call.tensor_specs()))
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    concrete = {}
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if bound.get(p.name):
                raise _RouteUnsupported(f"fx cannot take arguments through *{p.name}")
        elif p.name not in bound:
            concrete[p.name] = None if p.default is inspect.Parameter.empty else p.default
        elif bound[p.name] is not slot:
            if any(x is slot for x in tree_flatten(bound[p.name])[0]):
                raise _RouteUnsupported(f"fx cannot take tensors nested in argument {p.name!r}")
            concrete[p.name] = bound[p.name]
    tracer = _LeafTracer([module.get_submodule(p) for p in units])
    graph = tracer.trace(module, concrete_args=concrete or None)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


class _RouteUnsupported(Exception):
    """A route cannot take this model (raised by the tracer itself, not a bug)."""


def _trace_skeleton(module, name, call, units, precision, kernels, low=None) -> tuple[_Skeleton, str]:
    """Try the routes in order; one MeshplanError naming each route's failure if all fail."""
    failures = []
    for route in ROUTES:
        try:
            root = _symbolic_root(module, call, units) if route == ROUTES[0] else module
            return _lower(root, module, call, units, precision, kernels, low), route
        except MeshplanError:
            raise
        except Exception as exc:  # a failure in the model's code (or torch's) sends us to the next route
            if _raised_by_tracer(exc) and not isinstance(exc, _RouteUnsupported):
                raise  # a bug in meshplan: do not disguise it as the model's fault
            failures.append(_describe_failure(route, exc))
    raise MeshplanError(f"cannot trace {name}: " + "; ".join(failures))


def _raised_by_tracer(exc: BaseException) -> bool:
    frames = list(traceback.walk_tb(exc.__traceback__))
    return bool(frames) and os.path.abspath(frames[-1][0].f_code.co_filename) == _HERE


def _lower(root: nn.Module, model: nn.Module, call: _Call, units, precision, kernels, low=None) -> _Skeleton:
    """make_fx of `root` on fake CPU tensors under autocast (or with parameters in the low
    dtype `low`), blocks as meshplan::unit ops."""
    fake = FakeTensorMode()
    with fake:
        names, state, is_param = _fake_state(root, low)
        tensors = [s.make() for s in call.tensor_specs()]

    def step(state_list, tensor_list):
        args, kwargs = call.rebuild(tensor_list)
        out = functional_call(root, dict(zip(names, state_list)), args, kwargs)
        return _primary_output(out)

    stubs = _UnitStubs(units, model)
    with fake, _autocast(precision, low is None), _module_stack(model), stubs, kernel_choices(kernels):
        gm = make_fx(step, tracing_mode="real")(state, tensors)
    unit_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.meshplan.unit.default]
    assert len(unit_nodes) == len(stubs.calls), "every block call is one unit node"
    return _Skeleton(gm, names, is_param, [t.requires_grad for t in state], call, stubs.calls)


# ----------------------------------------------------------------------------- errors

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)
_STDLIB_DIR = os.path.dirname(os.__file__)


def _user_frame(exc: BaseException):
    """The deepest traceback frame in model code (not torch, not meshplan's tracer, not
    the standard library): where the untraceable construct is."""
    best = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = os.path.abspath(frame.f_code.co_filename)
        if (filename.startswith(_TORCH_DIR) or filename == _HERE or filename.startswith(_STDLIB_DIR)
                or filename.startswith("<")):
            continue
        best = (filename, lineno, frame.f_code.co_name)
    return best


def _describe_failure(route: str, exc: BaseException) -> str:
    """One clause of the error: route, where in the model code, what failed."""
    message = " ".join(str(exc).split())
    for marker in (" While executing", " Original traceback", " Exception raised from"):
        message = message.split(marker)[0]
    if len(message) > 200:
        message = message[:197] + "..."
    if "_local_scalar_dense" in message or "data-dependent" in message.lower() or "DataDependent" in type(exc).__name__:
        message += " (Python control flow or .item() on tensor values)"
    where = ""
    frame = _user_frame(exc)
    if frame is not None:
        filename, lineno, func = frame
        code = linecache.getline(filename, lineno).strip()
        where = f" at {os.path.basename(filename)}:{lineno} in {func}" + (f" (`{code}`)" if code else "")
    return f"{route} failed{where}: {type(exc).__name__}: {message}"


# ----------------------------------------------------------------------------- layers

@dataclass
class _Program:
    """A layer as something we can trace and run: fn(state, tensors) -> outputs."""

    fn: Callable
    state_names: list         # model paths of the parameters/buffers it takes
    state_specs: list         # TensorSpec of each (requires_grad = trainable parameter)
    state_is_param: list
    input_specs: list         # TensorSpec of each input tensor
    autocast: bool            # module code: run under autocast; an aten replay already has the casts
    graph: fx.GraphModule | None = None   # its aten graph when already known
    output_specs: list = field(default_factory=list)
    module: nn.Module | None = None       # a block's module (its recompute_attention flag)


def _split_layers(sk: _Skeleton, model: nn.Module, low=None) -> tuple[list[Layer], dict[str, _Program]]:
    """Cut the skeleton into layers in execution order; one program per signature."""
    nodes = [n for n in sk.gm.graph.nodes if n.op == "call_function"]
    unit_index = {}
    for node in nodes:
        if node.target is torch.ops.meshplan.unit.default:
            unit_index[node] = len(unit_index)
    rg = _skeleton_requires_grad(sk, unit_index)
    pieces: list[tuple[str, Any]] = []
    current: list = []
    for node in nodes:
        if node in unit_index:
            pieces.append(("segment", current))
            pieces.append(("unit", node))
            current = []
        elif node.target is operator.getitem and node.args[0] in unit_index:
            continue
        else:
            current.append(node)
    pieces.append(("segment", current))

    layers, programs = [], {}
    n_units = len(unit_index)
    seen_units = 0
    for piece_kind, item in pieces:
        if piece_kind == "unit":
            call = sk.calls[unit_index[item]]
            layer = Layer(call.path, call.kind, call.signature, len(layers), (call.path,))
            if call.signature not in programs:
                programs[call.signature] = _unit_program(call, low)
            seen_units += 1
        else:
            if not _has_work(item):
                continue
            if n_units == 0:
                name, kind = "model", "other"
            elif seen_units == 0:
                name, kind = "embed", "embedding"
            elif seen_units == n_units:
                name, kind = "head", "head"
            else:
                name, kind = f"between.{seen_units}", "other"
            program, digest = _segment_program(sk, item, rg)
            signature = f"{name}:{digest}"
            layer = Layer(name, kind, signature, len(layers), _segment_modules(item))
            programs[signature] = program
        layers.append(layer)
    return layers, programs


def _has_work(nodes) -> bool:
    return any(_kind_of_target(n.target) != "view" and n.target is not operator.getitem for n in nodes)


def _segment_modules(nodes) -> tuple:
    out = []
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or ()
        if stack and stack[-1][0] and stack[-1][0] not in out:
            out.append(stack[-1][0])
    return tuple(out)


def _skeleton_requires_grad(sk: _Skeleton, unit_index) -> dict:
    """requires_grad of every skeleton value (below autograd, make_fx does not record it)."""
    placeholders = [n for n in sk.gm.graph.nodes if n.op == "placeholder"]
    n_state = len(sk.state_names)
    flags = {}
    for i, node in enumerate(placeholders):
        if i < n_state:
            flags[node] = sk.state_requires_grad[i]
        else:
            flags[node] = sk.call.tensor_specs()[i - n_state].requires_grad
    unit_flags = {}
    for node, k in unit_index.items():
        unit_flags[node] = [s.requires_grad for s in sk.calls[k].out_leaves if isinstance(s, TensorSpec)]
    return _propagate_requires_grad(sk.gm.graph, flags, unit_flags)


def _unit_program(call: _UnitCall, low=None) -> _Program:
    module = call.module
    names, specs, is_param = [], [], []
    for name, p in module.named_parameters():
        names.append(name)
        spec = TensorSpec.of(p, p.requires_grad)
        specs.append(replace(spec, dtype=_state_dtype(spec.dtype, low)))
        is_param.append(True)
    for name, b in module.named_buffers():
        names.append(name)
        specs.append(TensorSpec.of(b, False))
        is_param.append(False)

    def fn(state, tensors):
        args, kwargs = call.call.rebuild(tensors)
        return functional_call(module, dict(zip(names, state)), args, kwargs)

    return _Program(fn, [f"{call.path}.{n}" for n in names], specs, is_param, call.call.tensor_specs(),
                    autocast=low is None, output_specs=[s for s in call.out_leaves if isinstance(s, TensorSpec)],
                    module=module)


def _segment_program(sk: _Skeleton, nodes: list, rg: dict) -> tuple[_Program, str]:
    """A sub-graph of the skeleton as a runnable aten GraphModule: its inputs are the
    values it uses from outside (state tensors first), its outputs the values used later."""
    inside = set(nodes)
    placeholders = [n for n in sk.gm.graph.nodes if n.op == "placeholder"]
    state_index = {n: i for i, n in enumerate(placeholders[:len(sk.state_names)])}
    external = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp not in inside and inp not in external:
                external.append(inp)
    state_inputs = [n for n in external if n in state_index]
    other_inputs = [n for n in external if n not in state_index]
    graph = fx.Graph()
    env = {}
    for node in state_inputs + other_inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    gm = fx.GraphModule(torch.nn.Module(), graph)

    def fn(state, tensors):
        return gm(*state, *tensors)

    def spec(node, requires_grad):
        return TensorSpec.of(node.meta["val"], requires_grad)

    state_names = [sk.state_names[state_index[n]] for n in state_inputs]
    state_is_param = [sk.state_is_param[state_index[n]] for n in state_inputs]
    state_specs = [spec(n, sk.state_requires_grad[state_index[n]]) for n in state_inputs]
    input_specs = [spec(n, _flag(rg.get(n))) for n in other_inputs]
    output_specs = [spec(n, _flag(rg.get(n))) for n in outputs if isinstance(n.meta.get("val"), torch.Tensor)]
    digest = _digest(str(graph), *map(_value_key, state_specs + input_specs))
    return _Program(fn, state_names, state_specs, state_is_param, input_specs, autocast=False,
                    graph=gm, output_specs=output_specs), digest


def _flag(value) -> bool:
    return any(value) if isinstance(value, list) else bool(value)


# ----------------------------------------------------------------------------- op classification

_VIEW_OPS = frozenset({"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "squeeze",
                       "unsqueeze", "split", "split_with_sizes", "slice", "select", "alias", "detach", "as_strided",
                       "unbind", "chunk", "narrow", "diagonal", "unfold", "view_as", "expand_as", "_reshape_alias",
                       "lift_fresh", "unsafe_split", "unsafe_chunk", "movedim", "flatten", "unflatten"})
_MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"})
# Allocations without a kernel (torch.empty and friends): no bytes move.
_ALLOCATION_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                             "empty_permuted"})
_NORM_OPS = frozenset({"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "fused_rms_norm",
                       "native_group_norm",
                       "group_norm", "native_batch_norm", "_native_batch_norm_legit", "batch_norm",
                       "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
                       "instance_norm"})
_REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
                            "prod", "logsumexp", "cumsum", "cumprod", "_softmax", "softmax", "_log_softmax",
                            "log_softmax", "_safe_softmax", "argmax", "argmin", "norm", "linalg_vector_norm",
                            "all", "any", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                            "_adaptive_avg_pool2d", "max_pool3d_with_indices", "avg_pool3d"})
_COPY_OPS = frozenset({"_to_copy", "clone", "copy", "copy_", "cat", "stack", "native_dropout", "dropout",
                       "masked_fill", "where", "contiguous", "repeat", "_unsafe_index", "index_select", "gather",
                       "constant_pad_nd", "pad", "fill", "fill_", "zero_", "tril", "triu", "flip", "roll"})
# Ops whose outputs never require grad however their inputs do.
_NON_DIFFERENTIABLE = frozenset({"detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                                 "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
                                 "new_empty_strided", "lift_fresh_copy", "argmax", "argmin", "bernoulli",
                                 "_local_scalar_dense", "sym_size", "scalar_tensor"})
# Ops a weight passes through before the op that consumes it (autocast's cast, transposes).
_TRANSPARENT_OPS = _VIEW_OPS | {"_to_copy", "clone", "contiguous"}
_SAC_SAVE = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                       aten._scaled_mm.default, aten.convolution.default})


def _op_name(target) -> str:
    """aten.addmm.default -> "addmm"."""
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _is_attention(name: str) -> bool:
    """The SDPA kernels (flash, efficient, cuDNN, CPU flash, math): q, k, v as (B, H, T, D)."""
    return "scaled_dot_product" in name and "backward" not in name


def _kind_of_target(target) -> str:
    """Kind from the op alone (the layer context refines linear/matmul, norm and loss)."""
    name = _op_name(target)
    if target is operator.getitem:
        return "view"
    if _is_attention(name):
        return "attention"
    if name in _MATMUL_OPS:
        return "matmul"
    if name in ("convolution", "_convolution", "conv2d", "conv1d", "conv3d"):
        return "conv"
    if name in ("embedding", "embedding_bag", "_embedding_bag"):
        return "embedding"
    if "loss" in name:
        return "loss"
    if name in _NORM_OPS:
        return "norm"
    if name in _VIEW_OPS or name in _ALLOCATION_OPS or _returns_view(target):
        return "view"
    if name in _REDUCTION_OPS:
        return "reduction"
    if name in _COPY_OPS or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return "elementwise"
    return "other"


def _returns_view(target) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


# ----------------------------------------------------------------------------- per-op numbers

def _tensors_in(value) -> list[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _dense_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor covers (a broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _arg_vals(node: fx.Node):
    return tree_flatten((node.args, node.kwargs))[0]


def _propagate_requires_grad(graph: fx.Graph, placeholder_flags: dict, unit_flags: dict | None = None) -> dict:
    """requires_grad of each value, from its inputs: a float output of a differentiable op
    with an input that requires grad. Multi-output ops get a list (one flag per output)."""
    flags: dict = dict(placeholder_flags)
    unit_flags = unit_flags or {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node in unit_flags:
            flags[node] = unit_flags[node]
            continue
        if node.target is operator.getitem:
            src = flags.get(node.args[0], False)
            flags[node] = src[node.args[1]] if isinstance(src, list) and node.args[1] < len(src) else _flag(src)
            continue
        grad_in = (_op_name(node.target) not in _NON_DIFFERENTIABLE
                   and any(_flag(flags.get(a, False)) for a in node.all_input_nodes))
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            flags[node] = [grad_in and isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in val]
        else:
            flags[node] = grad_in and isinstance(val, torch.Tensor) and val.dtype.is_floating_point
    return flags


def _trace_to_state(node, state_of: dict):
    """Follow a value back through casts and views to a state placeholder: (name, #transposes)."""
    transposes = 0
    while isinstance(node, fx.Node):
        if node in state_of:
            return state_of[node], transposes
        if node.op != "call_function" or _op_name(node.target) not in _TRANSPARENT_OPS or not node.args:
            return None
        name = _op_name(node.target)
        if name in ("t", "transpose", "permute"):
            transposes += 1
        node = node.args[0]
    return None


def _matmul_info(node, flags, state_of):
    """FLOPs, gemm shape and weight (if any) of mm/addmm/bmm/baddbmm/_scaled_mm."""
    name = _op_name(node.target)
    a, b = (node.args[1], node.args[2]) if name in ("addmm", "baddbmm") else (node.args[0], node.args[1])
    va, vb = _val(a), _val(b)
    if name in ("bmm", "baddbmm"):
        batch, m, k = va.shape
        n = vb.shape[-1]
        gemm, fwd = (batch, m, k, n), 2 * batch * m * k * n
    else:
        m, k = va.shape
        n = vb.shape[-1]
        gemm, fwd = (m, k, n), 2 * m * k * n
    grads = sum(_flag(flags.get(x, False)) for x in (a, b))
    weight, shardable = None, {}
    for operand, out_dim_if_even in ((b, 1), (a, 0)):
        found = _trace_to_state(operand, state_of)
        if found is None:
            continue
        weight, transposes = found
        wval = _val(operand)
        if wval.dim() == 2:
            out_dim = out_dim_if_even if transposes % 2 == 0 else 1 - out_dim_if_even
            shardable = {"colwise": out_dim, "rowwise": 1 - out_dim}
        break
    return fwd, fwd * grads, gemm, weight, shardable


def _attention_info(node, flags):
    q, k, v = (_val(x) for x in node.args[:3])
    batch, heads, tq, d = q.shape[0], q.shape[-3] if q.dim() == 4 else 1, q.shape[-2], q.shape[-1]
    tk, dv = k.shape[-2], v.shape[-1]
    causal = False
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "is_causal":
            causal = bool(node.kwargs.get("is_causal", node.args[i] if i < len(node.args) else arg.default_value))
    fwd = 2 * batch * heads * tq * tk * (d + dv)
    needs_grad = any(_flag(flags.get(x, False)) for x in node.args[:3])
    bwd = ATTENTION_BWD_FACTOR * fwd if needs_grad else 0
    if causal:
        pairs = tq * tk - tq * (tq - 1) // 2 if tk >= tq else tk * (tk + 1) // 2
        causal_fwd = 2 * batch * heads * pairs * (d + dv)
    else:
        causal_fwd = fwd
    return fwd, bwd, causal_fwd, (batch, heads, tq, tk, d, causal)


def _conv_info(node, flags):
    x, w = _val(node.args[0]), _val(node.args[1])
    out = _tensors_in(node.meta.get("val"))[0]
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    per_out = 1
    for s in w.shape[1:]:
        per_out *= s
    fwd = 2 * (x.numel() if transposed else out.numel()) * per_out
    grads = sum(_flag(flags.get(a, False)) for a in node.args[:2])
    return fwd, fwd * grads


def _analyse(gm: fx.GraphModule, program: _Program) -> tuple[list[OpInfo], nx.DiGraph]:
    """OpInfo for every op of a layer's aten graph, and the op dependency graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_state = len(program.state_names)
    state_of = {node: name for node, name in zip(placeholders[:n_state], program.state_names)}
    state_spec = {node: spec for node, spec in zip(placeholders[:n_state], program.state_specs)}
    state_param = {node: is_p for node, is_p in zip(placeholders[:n_state], program.state_is_param)}
    placeholder_flags = {n: s.requires_grad for n, s in zip(placeholders[:n_state], program.state_specs)}
    placeholder_flags.update({n: s.requires_grad for n, s in zip(placeholders[n_state:], program.input_specs)})
    flags = _propagate_requires_grad(gm.graph, placeholder_flags)

    owner = {}  # node -> op name it belongs to (getitem folds into its source)
    ops: dict[str, OpInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and node.args[0] in owner:
            owner[node] = owner[node.args[0]]
            continue
        owner[node] = node.name
        ops[node.name] = _op_info(node, flags, state_of)
    _attribute_params(gm, state_of, state_spec, state_param, owner, ops)
    _refine_kinds(gm, owner, ops)

    graph = nx.DiGraph()
    returned = set()
    for node in gm.graph.nodes:
        if node in owner:
            graph.add_node(owner[node], kind=ops[owner[node]].kind)
            for inp in node.all_input_nodes:
                if inp in owner and owner[inp] != owner[node]:
                    graph.add_edge(owner[inp], owner[node])
        elif node.op == "output":
            returned.update(owner[n] for n in node.all_input_nodes if n in owner)
    while True:  # views nobody reads (autograd's detach of saved outputs): not ops of the layer
        dead = [n for n in graph.nodes if ops[n].kind == "view" and graph.out_degree(n) == 0 and n not in returned]
        if not dead:
            break
        graph.remove_nodes_from(dead)
    return [ops[n] for n in ops if n in graph], graph


def _op_info(node: fx.Node, flags: dict, state_of: dict) -> OpInfo:
    kind = _kind_of_target(node.target)
    stack = node.meta.get("nn_module_stack") or ()
    module_path = stack[-1][0] if stack else ""
    ins = [x for x in _arg_vals(node) if isinstance(x, fx.Node)]
    in_vals = [_val(x) for x in ins if isinstance(_val(x), torch.Tensor)]
    outs = _tensors_in(node.meta.get("val"))
    info = OpInfo(
        name=node.name, kind=kind, target=str(node.target), module_path=module_path,
        input_shapes=[tuple(v.shape) for v in in_vals],
        output_shape=tuple(outs[0].shape) if outs else (),
        dtype=str(outs[0].dtype).replace("torch.", "") if outs else "",
        requires_grad=_flag(flags.get(node, False)),
        attention_core=bool((node.meta.get("custom") or {}).get(ATTENTION_CORE)))
    if kind != "view":
        info.bytes_read = sum(_dense_bytes(v) for v in in_vals)
        info.bytes_written = sum(_dense_bytes(v) for v in outs)
    if kind == "embedding" and in_vals:  # a lookup reads the indices and the rows it gathers
        info.bytes_read = sum(_dense_bytes(v) for v in in_vals[1:]) + info.bytes_written
    if kind == "matmul":
        fwd, bwd, gemm, weight, shardable = _matmul_info(node, flags, state_of)
        info.fwd_flops, info.bwd_flops, info.causal_fwd_flops, info.gemm = fwd, bwd, fwd, gemm
        if weight is not None:
            info.kind, info.shardable = "linear", shardable
    elif kind == "attention":
        info.fwd_flops, info.bwd_flops, info.causal_fwd_flops, info.attention = _attention_info(node, flags)
    elif kind == "conv":
        info.fwd_flops, info.bwd_flops = _conv_info(node, flags)
        info.causal_fwd_flops = info.fwd_flops
    elif kind == "embedding" and _trace_to_state(node.args[0], state_of) is not None:  # (vocab, hidden) table
        info.shardable = {"vocab": 0, "hidden": 1}
    return info


def _attribute_params(gm, state_of, state_spec, state_param, owner, ops):
    """Charge each parameter to the first op that consumes it through casts and views."""
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    for node, name in state_of.items():
        if not node.users:
            continue
        consumers, frontier = [], list(node.users)
        while frontier:
            user = frontier.pop()
            if user in owner and ops[owner[user]].kind not in ("view",) and _op_name(user.target) not in _TRANSPARENT_OPS:
                consumers.append(owner[user])
            elif user in owner:
                frontier.extend(user.users)
        if not consumers:
            consumers = [owner[u] for u in node.users if u in owner]
        if not consumers:
            continue
        op = ops[min(consumers, key=order.get)]
        spec = state_spec[node]
        op.params = op.params + (name,)
        if state_param[node]:
            op.param_count += _numel(spec.shape)
            op.param_bytes += _numel(spec.shape) * spec.dtype.itemsize


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _refine_kinds(gm, owner, ops):
    """Context the op alone lacks: ops inside a *Norm module are a norm; a log-softmax that
    feeds a loss is part of the loss."""
    for node in gm.graph.nodes:
        if node not in owner or owner[node] != node.name:
            continue
        op = ops[node.name]
        stack = node.meta.get("nn_module_stack") or ()
        in_norm = bool(stack) and stack[-1][1].lower().endswith("norm")
        if in_norm and op.kind in ("elementwise", "reduction"):
            op.kind = "norm"
        if _op_name(node.target) in ("_log_softmax", "log_softmax"):
            if any(u in owner and ops[owner[u]].kind == "loss" for u in node.users):
                op.kind = "loss"


# ----------------------------------------------------------------------------- costing a layer

def _trace_program(program: _Program, precision: str, model: nn.Module, kernels: str) -> fx.GraphModule:
    """The layer's aten graph, with module paths, under the precision's autocast."""
    if program.graph is not None:
        return program.graph
    fake = FakeTensorMode()
    with fake:
        state = [_make_state(s, is_p) for s, is_p in zip(program.state_specs, program.state_is_param)]
        tensors = [s.make() for s in program.input_specs]
    with fake, _autocast(precision, program.autocast), _module_stack(model), kernel_choices(kernels):
        return make_fx(lambda st, ts: _tensors_in(program.fn(st, ts)), tracing_mode="real")(state, tensors)


def _make_state(spec: TensorSpec, is_param: bool) -> torch.Tensor:
    t = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="cpu")
    return nn.Parameter(t, requires_grad=spec.requires_grad) if is_param else t


def _cost_program(signature: str, program: _Program, precision: str, model: nn.Module,
                  kernels: str, checkpointable: bool = True) -> LayerCost:
    """Everything a cost model needs about one layer signature. The embedding and the head
    are never checkpointed (the runtime checkpoints blocks): they keep one saved size."""
    gm = _trace_program(program, precision, model, kernels)
    ops, graph = _analyse(gm, program)
    memory = measure_saved(program, precision, kernels, checkpointable)
    attention = [op for op in ops if op.kind == "attention"]
    return LayerCost(
        signature=signature,
        fwd_flops=sum(op.fwd_flops for op in ops),
        bwd_flops=sum(op.bwd_flops for op in ops),
        param_count=sum(op.param_count for op in ops),
        param_bytes=sum(op.param_bytes for op in ops),
        bytes_read=sum(op.bytes_read for op in ops),
        bytes_written=sum(op.bytes_written for op in ops),
        saved_bytes=memory["none"],
        saved_bytes_full_ckpt=memory["full"],
        saved_bytes_selective=memory["selective"],
        saved_bytes_attention=memory["attention"],
        saved_param_copy_bytes=memory["param_copies"],
        input_bytes=sum(s.nbytes for s in program.input_specs),
        output_bytes=sum(s.nbytes for s in program.output_specs),
        attn_fwd_flops=sum(op.fwd_flops for op in attention),
        attn_causal_fwd_flops=sum(op.causal_fwd_flops for op in attention),
        recompute_fwd_flops_selective=sum(op.fwd_flops for op in ops if not (
            op.kind in ("linear", "conv") and op.params or op.kind == "attention")),
        recompute_fwd_flops_attention=sum(op.fwd_flops for op in ops if op.attention_core),
        ops=ops, graph=graph)


# ----------------------------------------------------------------------------- measuring saved activations

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
        copy_of_param = (_op_name(func) in _PARAM_COPY_OPS and isinstance(args[0], torch.Tensor)
                         and _storage_key(args[0]) in self.param_keys | self.param_copies)
        for t in _tensors_in(out):
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
    """Selective recompute, as the runtime applies it (runtime/parallelize.py): save the
    output of every matmul/convolution that consumes a weight (a parameter or autocast's
    copy of one) - the linear layers - and of the fused attention kernels; recompute the
    rest: norms, activations, casts. With flash attention there is no T x T score matrix
    to spare, so recomputing the attention kernel would cost time and save nothing."""

    def policy(ctx, op, *args, **kwargs):
        if _is_attention(_op_name(op)):
            return CheckpointPolicy.MUST_SAVE
        if op in _SAC_SAVE:
            keys = weight_keys()
            if any(isinstance(a, torch.Tensor) and _storage_key(a) in keys for a in args):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def measure_saved(program: _Program, precision: str, kernels: str = "cuda",
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


def _recomputes_attention(program: _Program) -> bool:
    return hasattr(program.module, "recompute_attention")


@contextlib.contextmanager
def _attention_recomputed(module: nn.Module):
    """The block with its attention core rerun in backward, as the runtime sets it."""
    before, module.recompute_attention = module.recompute_attention, True
    try:
        yield
    finally:
        module.recompute_attention = before


def _measure_variant(program: _Program, precision: str, kernels: str, variant: str | None) -> tuple[int, int]:
    fake = FakeTensorMode()
    with fake:
        state = [_make_state(s, is_p) for s, is_p in zip(program.state_specs, program.state_is_param)]
        inputs = [s.make() for s in program.input_specs]
    state_keys = {_storage_key(t) for t in state}
    param_keys = {_storage_key(t) for t, is_p in zip(state, program.state_is_param) if is_p}
    input_sizes = {_storage_key(t): t.untyped_storage().nbytes() for t in inputs}
    saved: dict[StorageWeakRef, int] = {}

    def pack(t):
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    recorder = _StorageRecorder(param_keys)
    with fake, _autocast(precision, program.autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        if variant is None:
            out = _with_kernels(kernels, program.fn, state, inputs)
        elif variant == "attention":
            with _attention_recomputed(program.module):
                out = _with_kernels(kernels, program.fn, state, inputs)
        else:
            policy = _selective_policy(lambda: param_keys | recorder.param_copies)
            context = (functools.partial(create_selective_checkpoint_contexts, policy)
                       if variant == "selective" else None)
            kwargs = dict(context_fn=context) if context else {}
            out = checkpoint(_with_kernels, kernels, program.fn, state, inputs, use_reentrant=False,
                             preserve_rng_state=False, **kwargs)
    outputs = _tensors_in(out)
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
        _backward_from(outputs)
    return result, copies

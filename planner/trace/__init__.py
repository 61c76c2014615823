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

With cast "params" (parameters held in 16 bits, as under ZeRO 1-3) floating inputs enter
in 16 bits, as FSDP2 casts them, and every BatchNorm runs in fp32 (`fake.batch_norm_in_fp32`),
as the runtime keeps it.

The modules, in the order a trace runs them: `inputs` (the model and its example call),
`signature` (which modules are layers, block signatures), `skeleton` (the routes, blocks
as `meshplan::unit` ops, the failure message), `layers` (the skeleton cut into layer
programs), `ops` (each op's kind, FLOPs and bytes), `saved` (measured activation memory);
`fake` and `kernels` are how every program runs (fake tensors, autocast, kernel choices).
This module: the entry points and the costing of one layer signature.
"""
from __future__ import annotations

import time

import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from cost_models.errors import MeshplanError
from planner import hf
from planner.ir import LayerCost, TracedModel, selective_reruns
from planner.plan import CASTS, compute_precision, low_precision_dtype
from planner.trace.fake import autocast, batch_norm_in_fp32, make_state, module_stack
from planner.trace.inputs import (TensorSpec, backward_from, check_step, primary_output,
                                  resolve)
from planner.trace.kernels import KERNELS, kernel_choices
from planner.trace.layers import split_layers
from planner.trace.program import Program
from planner.trace.ops import analyse, tensors_in
from planner.trace.saved import measure_saved
from planner.trace.signature import find_units, module_signature
from planner.trace.skeleton import ROUTES, trace_skeleton

__all__ = ["KERNELS", "ROUTES", "TensorSpec", "find_units", "flop_counter_reference",
           "kernel_choices", "measure_saved", "module_signature", "trace_hf", "trace_model"]


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
    Precision "fp8" traces as bf16 (its graph is bf16's; which linears run float8 GEMMs is
    the simulator's business, planner.simulate.fp8), and the result says bf16.
    """
    start = time.perf_counter()
    check_step(micro_batch, seq, precision)
    precision = compute_precision(precision)
    if kernels not in KERNELS:
        raise MeshplanError(f"kernels {kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if cast not in CASTS:
        raise MeshplanError(f"cast {cast!r} is unknown; use one of {', '.join(CASTS)}")
    low = low_precision_dtype(precision) if cast == "params" else None
    module, name, call = resolve(model, micro_batch, seq, inputs)
    call = call.cast_floating(low)   # parameters held in 16 bits: inputs cast as FSDP2 casts them
    units = find_units(module)
    with hf.eager_masks(module), batch_norm_in_fp32(module, low):
        skeleton, route = trace_skeleton(module, name, call, units, precision, kernels, low)
        layers, programs = split_layers(skeleton, module, low)
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

    module, _, call = resolve(model, micro_batch, seq, inputs)
    args, kwargs = call.build(device="meta")
    try:
        with hf.eager_masks(module), FlopCounterMode(display=False) as fwd:
            out = primary_output(module(*args, **kwargs))
        with FlopCounterMode(display=False) as bwd:
            backward_from([out])
        return fwd.get_total_flops(), bwd.get_total_flops()
    finally:
        for p in module.parameters():
            p.grad = None


# ----------------------------------------------------------------------------- costing a layer

def _trace_program(program: Program, precision: str, model: nn.Module, kernels: str) -> fx.GraphModule:
    """The layer's aten graph, with module paths, under the precision's autocast."""
    if program.graph is not None:
        return program.graph
    fake = FakeTensorMode()
    with fake:
        state = [make_state(s, is_p) for s, is_p in zip(program.state_specs, program.state_is_param)]
        tensors = [s.make() for s in program.input_specs]
    with fake, autocast(precision, program.autocast), module_stack(model), kernel_choices(kernels):
        return make_fx(lambda st, ts: tensors_in(program.fn(st, ts)), tracing_mode="real")(state, tensors)


def _cost_program(signature: str, program: Program, precision: str, model: nn.Module,
                  kernels: str, checkpointable: bool = True) -> LayerCost:
    """Everything a cost model needs about one layer signature. The embedding and the head
    are never checkpointed (the runtime checkpoints blocks): they keep one saved size."""
    gm = _trace_program(program, precision, model, kernels)
    ops, graph = analyse(gm, program)
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
        recompute_fwd_flops_selective=sum(op.fwd_flops for op, rerun in zip(ops, selective_reruns(ops)) if rerun),
        recompute_fwd_flops_attention=sum(op.fwd_flops for op in ops if op.attention_core),
        ops=ops, graph=graph)

"""Apply a plan's tensor parallelism, activation checkpointing and ZeRO stage to a model part.

Everything here is PyTorch's own machinery:
- tensor (+ sequence) parallelism: DTensor `parallelize_module` with the plan's
  `tp_layout` turned into ColwiseParallel / RowwiseParallel / SequenceParallel /
  PrepareModuleInput/Output styles (see `_style`); a region's input projections share
  one replicated input (`_shared_regions`), and a vocabulary-parallel head keeps its
  logits split for `loss_parallel` (`vocab_parallel_loss`), so a block and the head issue
  Megatron-LM's collectives;
- activation checkpointing: `torch.utils.checkpoint.checkpoint(use_reentrant=False)`
  around a block's forward ("full"); "selective" (op-level, torchtitan's SelectiveAC policy)
  passes a policy through `create_selective_checkpoint_contexts` that keeps the outputs of
  the fused attention kernels and of every other linear layer and recomputes everything
  else (the other linear layers, norms, activations, residual adds, an unfused attention's
  scores); "attention" sets the block's
  `recompute_attention` flag, so only its attention core runs under the checkpoint
  (Korthikanti et al. 2022 as Megatron-LM runs it; planner.arch.layers.attention_core);
- ZeRO 3 / 2 / 1: FSDP2 `fully_shard` per block and on the part's root, with
  `reshard_after_forward` True / False / False, `MixedPrecisionPolicy` for bf16/fp16 (each
  BatchNorm its own unit in fp32, output cast to 16 bits) and `CPUOffloadPolicy` when the
  plan offloads the optimizer; ZeRO 1 is Megatron-LM's
  distributed optimizer: the engine keeps parameters gathered and gradients unsharded
  until the step's last micro-batch (`Engine._sync`; a pipeline stage does the same),
  so each step all-gathers once and reduce-scatters once (planner.simulate.fsdp);
- ZeRO 0: FSDP2-family `replicate` (DDP semantics on DTensor parameters, so it
  composes with tensor parallelism and torch.distributed.checkpoint).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from cost_models.errors import MeshplanError
from planner.arch import TOP_ROLES, get_arch
# the layout rules live with the model families, so the planner checks a plan with them too
from planner.arch.layers import every_other_product_policy
from planner.arch.layout import megatron_layout, resolve_layout, vocab_dim  # noqa: F401  (the engine's and tests')
from planner.models import ModelConfig
from planner.plan import PRECISION_DTYPES, Plan
from planner.torch_compat import fsdp_replicate, selective_checkpoint_ignores_profiler_ranges
from runtime.expert_parallel import expert_modules

def _style(role: str, style: str, sp: bool):
    """The DTensor ParallelStyle for one module (None: leave it a plain module)."""
    seq, rep = Shard(1), Replicate()
    if role == "in":
        if style == "colwise":
            return ColwiseParallel(input_layouts=seq if sp else rep)
        if style == "rowwise":
            return RowwiseParallel(input_layouts=seq if sp else rep, output_layouts=rep)
        return PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,), use_local_output=True) if sp else None
    if role == "out":
        if style == "rowwise":
            return RowwiseParallel(output_layouts=seq if sp else rep, use_local_output=not sp)
        if style == "colwise":
            return ColwiseParallel(input_layouts=rep, output_layouts=seq if sp else rep, use_local_output=not sp)
        return PrepareModuleOutput(output_layouts=(rep,), desired_output_layouts=(seq,),
                                   use_local_output=False) if sp else None
    if role == "norm":
        return SequenceParallel() if style == "sequence" else None
    if role == "embed":
        if style in ("vocab", "rowwise"):
            return RowwiseParallel(input_layouts=rep, output_layouts=rep)
        if style == "colwise":
            return ColwiseParallel(input_layouts=rep, output_layouts=rep)
        return None
    if role == "head":
        if _head_splits_vocab(style):   # logits stay split over the vocabulary (see vocab_parallel_loss)
            return ColwiseParallel(input_layouts=seq if sp else rep, output_layouts=Shard(-1), use_local_output=False)
        if style == "rowwise":
            return RowwiseParallel(input_layouts=seq if sp else rep, output_layouts=rep)
        return PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,), use_local_output=True) if sp else None
    raise AssertionError(role)

def vocab_parallel_loss(layout: dict | None) -> bool:
    """Whether the head's logits stay a DTensor split over the vocabulary, so the loss must run
    (forward and backward) under `torch.distributed.tensor.parallel.loss_parallel`: each rank
    computes the softmax over its vocabulary slice with all-reduced max and sum, as
    Megatron-LM's vocab-parallel cross-entropy does, instead of all-gathering the logits
    (b x s x vocab) onto every rank of the TP group. The simulator prices the head this way."""
    return layout is not None and _head_splits_vocab(layout.get("head", "replicate"))

def _head_splits_vocab(style: str) -> bool:
    return vocab_dim(style, "head") == 0

def tensor_parallel(part: nn.Module, tp_mesh, layout: dict, cfg: ModelConfig, plan: Plan,
                    first_stage: bool, last_stage: bool):
    """Shard one model part (the whole Decoder, or a pipeline stage of it) over tp_mesh.

    With sequence parallelism the residual stream between blocks is a DTensor sharded on
    the sequence dimension (so `x.shape` inside a block is the global shape and the
    model code runs unchanged); it enters the first block from the replicated embedding
    and crosses pipeline stages as the local sequence shard.
    """
    sp = plan.sequence_parallel
    family = get_arch(cfg.arch)
    styles = {}
    for name, role in TOP_ROLES.items():
        if getattr(part, name, None) is not None:
            style = _style(role, layout[name], sp)
            if style is not None:
                styles[name] = style
    shared = {index: _shared_regions(index, layout, cfg, sp) for index in part.blocks}
    for index in part.blocks:
        reads_shared = {name for _, ins, _ in shared[index] for name in ins}
        for name, role in family.block_roles.items():   # a shared input arrives replicated, sp or not
            if name in family.head_norms:
                style = _head_norm_style(layout[f"blocks.{index}.{family.head_norms[name]}"])
            else:
                style = _style(role, layout[f"blocks.{index}.{name}"], sp and name not in reads_shared)
            if style is not None:
                styles[f"blocks.{index}.{name}"] = style
    if styles:
        parallelize_module(part, tp_mesh, styles)
    for index, regions in shared.items():
        # one hook per norm: Phi's attention and MLP read the same one (planner/arch/phi.py)
        for norm_name in dict.fromkeys(family.region_norms[region] for region, _, _ in regions):
            norm = getattr(part.blocks[index], norm_name)
            parallelize_module(norm, tp_mesh, PrepareModuleOutput(
                output_layouts=(Shard(1) if sp else Replicate(),), desired_output_layouts=(Replicate(),),
                use_local_output=False))
    if sp and len(part.blocks):
        keys = list(part.blocks)
        first, last = part.blocks[keys[0]], part.blocks[keys[-1]]
        entry = Replicate() if first_stage else Shard(1)
        parallelize_module(first, tp_mesh, PrepareModuleInput(
            input_layouts=(entry,), desired_input_layouts=(Shard(1),), use_local_output=False))
        if not last_stage:
            parallelize_module(last, tp_mesh, PrepareModuleOutput(
                output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True))
    retie(part, cfg)

def _head_norm_style(projection_style: str):
    """A norm over each head of a column-parallel projection's output (Qwen3's q_norm, k_norm;
    planner.arch.base.Architecture.head_norms) sees this rank's heads, dimension 2 of its
    (batch, seq, heads, head_dim) input: its weight becomes a replicated DTensor whose
    gradient, a partial sum over the local heads, is reduced over the TP group like a
    sequence-parallel norm's (as torchtitan's torchtitan/models/qwen3/infra/parallelize.py
    does; transformers' configuration_qwen3.py plan calls it "replicated_with_grad_allreduce").
    Over unsplit heads it stays a plain module."""
    return SequenceParallel(sequence_dim=2, use_local_output=True) if projection_style == "colwise" else None

def _shared_regions(index: int, layout: dict, cfg: ModelConfig, sp: bool) -> list:
    """The regions of block `index` whose norm hands its column-parallel input projections one
    replicated DTensor. Each ColwiseParallel would otherwise redistribute the same input on
    its own: in backward every projection's input gradient is all-reduced (reduce-scattered
    under sequence parallelism, which also all-gathers the input once per projection in
    forward) - five times per Llama block (q, k, v; gate, up) where Megatron-LM, and the
    simulator, reduce once per region. Shared, autograd sums the projections' partial
    gradients first and the norm's output hook reduces them once."""
    regions = []
    family = get_arch(cfg.arch)
    for region, ins, out in family.regions:
        norm = family.region_norms[region]
        if all(layout[f"blocks.{index}.{name}"] == "colwise" for name in ins) \
                and (layout[f"blocks.{index}.{norm}"] == "sequence") == sp:
            regions.append((region, ins, out))
    return regions

def retie(part: nn.Module, cfg: ModelConfig):
    """Sharding replaces parameters; tie head to tok again where both live in this part."""
    if cfg.tie_embeddings and part.tok is not None and part.head is not None \
            and part.head.weight is not part.tok.weight:
        a, b = part.tok.weight, part.head.weight
        if isinstance(a, DTensor) != isinstance(b, DTensor) or \
                (isinstance(a, DTensor) and tuple(a.placements) != tuple(b.placements)):
            raise MeshplanError("tied tok/head weights ended up split differently; give them matching tp_layout styles")
        part.head.weight = a

# ---------------------------------------------------------------------------- checkpointing
_SELECTIVE_SAVE_OPS = None

def selective_save_ops():
    global _SELECTIVE_SAVE_OPS
    if _SELECTIVE_SAVE_OPS is None:
        aten = torch.ops.aten
        # the linear layers' products and the fused attention kernels; an unfused attention's
        # batched products (bmm, baddbmm: the s x s scores and their product with the values)
        # are recomputed, as the trace measures it (planner.trace.saved._selective_policy) - and its
        # in-place causal mask would otherwise modify a saved tensor
        names = ["mm", "addmm", "linear", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"]
        _SELECTIVE_SAVE_OPS = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    return _SELECTIVE_SAVE_OPS

_PRODUCT_OPS = None

def _linear_product(op, args) -> bool:
    """A linear layer's matmul: what torchtitan counts to recompute every second one."""
    global _PRODUCT_OPS
    if _PRODUCT_OPS is None:
        _PRODUCT_OPS = {getattr(torch.ops.aten, n).default for n in ("mm", "addmm", "linear")}
    return op in _PRODUCT_OPS

def selective_context():
    """A fresh selective-checkpoint context for one block call (the runtime's policy)."""
    selective_checkpoint_ignores_profiler_ranges()
    return create_selective_checkpoint_contexts(
        every_other_product_policy(lambda op, args: op in selective_save_ops(), _linear_product))

def apply_checkpointing(part: nn.Module, plan: Plan, blocks: dict | None = None):
    """Recompute each block as the plan says (planner.plan.CHECKPOINT_MODES).

    "attention" sets the block's flag (its forward checkpoints the attention core); the
    other modes wrap the whole forward. The wrapper replaces the block's `forward`
    attribute, so module names (and checkpoint keys) stay as they are and FSDP's hooks sit
    outside the recomputed region. `blocks`: {block number: module} (default: a Decoder part's).
    """
    blocks = {int(k): b for k, b in part.blocks.items()} if blocks is None else blocks
    for index, block in blocks.items():
        mode = plan.checkpoint_for(index)
        block.recompute_attention = mode == "attention"
        if mode in ("none", "attention"):
            continue
        inner = block.forward
        kwargs = dict(use_reentrant=False)
        if mode == "selective":
            kwargs["context_fn"] = selective_context

        def forward(*args, _inner=inner, _kw=kwargs, **kw):
            return checkpoint(_inner, *args, **_kw, **kw)

        block.forward = functools.update_wrapper(forward, inner)

# ---------------------------------------------------------------------------- data parallel
def data_parallel(part: nn.Module, rt, plan: Plan, blocks: dict | None = None) -> nn.Module:
    """Wrap a part for the plan's ZeRO stage over the dp (x cp) mesh, each block (`blocks`: {number:
    module}, default a Decoder part's) and the part's root; returns the module to call."""
    dp = plan.dp
    blocks = part.blocks if blocks is None else blocks
    # an expert slice is data-parallel over the edp ranks holding the same one
    # (runtime.expert_parallel, which also scales its gradient so that averaging over edp
    # divides by dp); with edp 1 nothing is left to reduce, and FSDP and replicate would
    # still run their collectives on a one-rank group, so the slices stay out of them
    experts = expert_modules(part) if plan.ep > 1 else []
    wrapped = experts if plan.edp > 1 else []
    ignored = {"ignored_params": {p for m in experts for p in m.parameters()}} if experts and not wrapped else {}
    if plan.zero >= 1:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        dtype = PRECISION_DTYPES[plan.precision]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
            else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=rt.device.type == "cuda") if plan.offload_optimizer else OffloadPolicy()
        kw = dict(mesh=rt.data_mesh, reshard_after_forward=plan.zero == 3, mp_policy=mp, offload_policy=offload)
        if dtype != torch.float32:   # BatchNorm in fp32, its output in 16 bits (planner.trace.fake.batch_norm_in_fp32)
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype)
            for norm in [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
                fully_shard(norm, **{**kw, "mp_policy": fp32})
        for module in wrapped:
            fully_shard(module, **{**kw, "mesh": rt.expert_mesh["edp"]})
        for block in blocks.values():
            fully_shard(block, **kw, **ignored)
        fully_shard(part, **kw, **ignored)
        return part
    if dp * plan.cp == 1:
        return part
    replicate = fsdp_replicate()
    for module in wrapped:
        replicate(module, mesh=rt.expert_mesh["edp"])
    for block in blocks.values():
        replicate(block, mesh=rt.data_mesh, **ignored)
    replicate(part, mesh=rt.data_mesh, **ignored)
    return part

def uses_fsdp_precision(plan: Plan) -> bool:
    """FSDP's MixedPrecisionPolicy casts for us (ZeRO 1-3); otherwise autocast does."""
    return plan.cast == "params"

def autocast_context(plan: Plan, device: torch.device):
    dtype = PRECISION_DTYPES[plan.precision]
    enabled = dtype != torch.float32 and not uses_fsdp_precision(plan)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)

def with_autocast(part: nn.Module, plan: Plan, device: torch.device):
    """Run a pipeline stage's forward under autocast (the schedule calls it, not us)."""
    if PRECISION_DTYPES[plan.precision] == torch.float32 or uses_fsdp_precision(plan):
        return
    inner = part.forward

    def forward(*args, **kwargs):
        with autocast_context(plan, device):
            return inner(*args, **kwargs)

    part.forward = functools.update_wrapper(forward, inner)

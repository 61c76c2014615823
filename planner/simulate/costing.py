"""Per-layer time and activation memory under a tensor-parallel degree.

Maps the traced IR (planner/ir.py) onto the compute model (cost_models/compute.py).
How tensor parallelism divides a layer's ops (Megatron-LM's layout unless the plan's
`tp_layout` says otherwise):
- a column-parallel linear splits its output features (N / tp), a row-parallel one its
  input features (K / tp); attention splits heads; the head's linear is vocab-parallel;
- any other op is divided by tp unless it produces a residual-stream tensor (batch x
  seq x hidden elements), which tensor parallelism replicates - and sequence
  parallelism splits along the sequence, so with it every op is divided by tp;
- selective checkpointing (as the runtime applies it, torchtitan's op-level policy) keeps the
  fused attention outputs and every other weight product's, and recomputes the other
  products and the streaming ops (norms, activations, casts) in backward; attention-core
  recomputation reruns the ops the trace labels `attention_core` (the fused kernel, or
  QK^T, mask, softmax, dropout and the product with V) and keeps everything else;
- each row-parallel linear ends in one all-reduce of the residual stream in forward
  and one in backward (Megatron: two per block each way); with sequence parallelism
  each becomes a reduce-scatter plus an all-gather of the same total volume; where two
  regions read one norm (Phi's parallel block) the second's input-side half is the first's;
- outside the blocks, as `runtime.parallelize` runs them: the vocabulary-parallel embedding
  all-reduces its output in forward (and, under sequence parallelism, gathers the gradient
  in backward); the vocabulary-parallel head reduces its input gradient in backward (under
  sequence parallelism: gathers its input, reduce-scatters the gradient) and its loss
  all-reduces LOSS_PARALLEL_ALLREDUCES per-token statistics. `LayerTiming.tp_comm_fwd` /
  `tp_comm_bwd` list them as (collective, bytes), which tests/parity/test_tp_collectives.py checks
  against the collectives the runtime issues.
Activation memory under TP without SP keeps Korthikanti et al.'s replicated share:
10 of the 34 sbh units of a block's saved activations (LayerNorm inputs, residual and
dropout-free attention/MLP inputs) are not split (Korthikanti et al. 2022, Sec. 4.2).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cost_models.compute import ComputeModel, gemm_dims
from cost_models.errors import MeshplanError
from cost_models.memory import DTYPE_BYTES
from planner.arch import get_arch, module_roles, names_for, shared_input_outputs
from planner.ir import LayerCost, OpInfo, TracedModel, selective_reruns
from planner.simulate import context, experts as moe
from planner.simulate.fusion import FusedKernel, compiled_ops
from planner.simulate.factory_tp import FactorySplit, layer_prefix
from planner.simulate.fp8 import Float8, runs_in_fp8, weight_count

# Megatron-LM's default split of a traced model's linear layers and embeddings, by module
# name, from every family's roles (planner.arch; Hugging Face names included).
_ROLES = module_roles()
COLWISE = {name for name, role in _ROLES.items() if role in ("in", "head")}
ROWWISE = {name for name, role in _ROLES.items() if role == "out"}
# {output projection: an earlier region's} where both regions read one norm (planner.arch.base)
SHARED_INPUT = shared_input_outputs()
VOCAB = names_for("tok")
HEADS = names_for("head")
# A vocabulary-parallel cross-entropy all-reduces three per-token fp32 statistics in forward:
# the logits' max, the target's logit and the sum of exponentials (Megatron-LM's
# mpu.vocab_parallel_cross_entropy; torch's loss_parallel issues the same three).
LOSS_PARALLEL_ALLREDUCES = 3
LOSS_STATISTIC_BYTES = 4
REPLICATED_ACTIVATION_SHARE = 10 / 34   # Korthikanti et al. 2022: sbh*10 of sbh*34 unsplit by TP
# Eager PyTorch issues kernels from Python: each aten op costs host time (dispatch,
# autograd bookkeeping, the launch) whether or not the GPU is busy. The GPU runs ahead of
# the host, so a layer takes max(device time, host time); small layers are host-bound.
# The per-op host time comes from the calibration (ComputeModel.host_s_per_op); backward
# issues about twice the forward's ops (grad input and grad weight per matmul).
HOST_BWD_OPS_PER_FWD_OP = 2.0
# Backward memory traffic of a streaming op as a multiple of its forward's (bytes read +
# written). The default, 2, is the earlier flat assumption: a pointwise op's gradient kernel
# reads the output gradient and the saved input and writes the input gradient (1.5x), and
# norms add a weight-gradient pass that reads x and dy again; kept at 2 because the H100
# steps (benchmarks/accuracy.py) run slow at 1.5 (Llama -10 to -18 %). Ops whose gradient
# kernel is known to touch less, by aten name:
BWD_TRAFFIC_RATIO = {
    "add": 0.0, "sub": 0.0,              # the gradient passes through to both inputs, no kernel (but
                                         # see AUTOCAST_ADD_BWD_TRAFFIC_RATIO)
    "clone": 0.0, "contiguous": 0.0,     # identity gradient
    "_to_copy": 1.0,                     # one cast of the gradient back
    "native_dropout": 1.0,               # the saved mask applied to the gradient
    "masked_fill": 1.0, "masked_fill_": 1.0, "where": 1.0,
    "mul": 5 / 3,                        # reads both inputs and the gradient, writes two gradients
    "_softmax": 1.5,                     # reads the probabilities and their gradient, writes one gradient
}
DEFAULT_BWD_TRAFFIC_RATIO = 2.0
# Megatron's fused dropout + residual add (_as_megatron_kernels), a synthetic op name: its
# gradient kernel is the dropout's alone (the add passes the gradient through), which reads
# the output gradient and the bool mask and writes the input gradient.
FUSED_DROPOUT_ADD = "megatron.bias_dropout_add"
MASK_BYTES_PER_ELEMENT = 1
# Under autocast a residual add mixes the fp32 stream with a 16-bit branch output, so its
# backward casts the gradient for the 16-bit operand: read 4 + write 2 bytes per element
# against the forward's 4 + 2 + 4.
AUTOCAST_ADD_BWD_TRAFFIC_RATIO = 0.6
_DTYPE_TO_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_COMPUTE_KINDS = {"conv": "matmul"}


@dataclass(frozen=True)
class LayerTiming:
    """One micro-batch through one layer on one GPU of its TP group."""

    fwd_s: float
    bwd_s: float
    streaming_fwd_s: float          # what selective repeats (planner.ir.selective_reruns)
    attention_core_fwd_s: float     # the attention core's ops: what attention-core recomputation repeats
    tp_comm_fwd: tuple              # TP collectives of one forward: ((kind, bytes), ...)
    tp_comm_bwd: tuple              # ... and of one backward (a full recomputation repeats the forward's)
    params_per_gpu: float           # after TP sharding
    saved_bytes: float              # activations held for backward, by checkpoint mode below
    saved_bytes_full: float
    saved_bytes_selective: float
    saved_bytes_attention: float
    param_copy_bytes: float
    boundary_bytes: float           # the layer's output: what a pipeline stage boundary sends
    expert_params_per_gpu: float = 0.0   # the routed experts' share of params_per_gpu (split over ep)
    ep_comm_fwd: tuple = ()         # expert-parallel all-to-alls: ((kind, "counts"|"tokens", bytes), ...)
    ep_comm_bwd: tuple = ()         # balanced volumes (planner.simulate.experts.collectives)
    fp8_params_per_gpu: float = 0.0      # weights of the linears that run in float8 (planner.fp8)
    fp8_linears: int = 0
    cp_comm_fwd: tuple = ()         # context-parallel K/V exchange: ((kind, bytes), ...) (planner.simulate.context)
    cp_comm_bwd: tuple = ()
    attention_kernel_s: tuple = (0.0, 0.0)   # the fused attention kernels' (forward, backward) s: what a p2p ring
                                             # hides the K/V exchange behind

    def recompute_s(self, mode: str) -> float:
        return {"none": 0.0, "attention": self.attention_core_fwd_s, "selective": self.streaming_fwd_s,
                "full": self.fwd_s}[mode]

    def saved_for(self, mode: str) -> float:
        return {"none": self.saved_bytes, "attention": self.saved_bytes_attention,
                "selective": self.saved_bytes_selective, "full": self.saved_bytes_full}[mode]


def _module_name(op: OpInfo) -> str:
    return op.module_path.rsplit(".", 1)[-1] if op.module_path else ""


def linear_style(op: OpInfo, tp_layout: dict) -> str:
    """colwise | rowwise | replicate for a linear op, from the plan's layout or Megatron's."""
    return _named_linear_style(_module_name(op), tp_layout)


def _named_linear_style(name: str, tp_layout: dict) -> str:
    if name in tp_layout:   # a vocabulary-parallel head splits its output features
        return "colwise" if tp_layout[name] == "vocab" else tp_layout[name]
    if name in COLWISE:
        return "colwise"
    if name in ROWWISE:
        return "rowwise"
    return "replicate"


def linear_param_share(op: OpInfo, style: str, tp: int) -> float:
    """The share of a linear's parameters one of `tp` ranks keeps under `style`: all of them
    replicated, 1/tp colwise; rowwise splits the weight on its input features, but the bias is
    added once after the reduction, so every rank keeps all of it."""
    if style not in ("colwise", "rowwise") or tp == 1:
        return 1.0
    if style == "rowwise" and _aten_name(op) == "addmm" and op.param_count:
        bias = gemm_dims(op.gemm)[2] if op.gemm is not None else 0
        return ((op.param_count - bias) / tp + bias) / op.param_count
    return 1.0 / tp


def top_level_layout(config, plan) -> dict:
    """Embedding and head vocabulary-parallel when tp divides the vocabulary (else
    replicated), the final norm sequence-parallel with SP: the modules outside the blocks,
    which the block ILP does not decide."""
    return get_arch(config.arch).top_level_layout(plan.tp, config.vocab, plan.sequence_parallel)


def _aten_name(op: OpInfo) -> str:
    """"aten.masked_fill_.Scalar" -> "masked_fill_" (any namespace.name.overload)."""
    parts = op.target.split(".")
    return parts[1] if len(parts) > 2 else op.target


def _precision_of(op: OpInfo, default: str) -> str:
    return _DTYPE_TO_PRECISION.get(str(op.dtype).replace("torch.", ""), default)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _as_megatron_kernels(ops: list) -> list:
    """The ops as Megatron-LM's GPT launches them (megatron/model/transformer.py, and
    VIA-Research/vTrain src/model/gpt_modeling.py, its copy of the measured model), where
    eager PyTorch launches one kernel per op:
    - the causal mask: applied inside its scaled-masked-softmax kernel while it reads the
      scores, and built once per micro-batch (get_batch, Execution.batch_host_ops), so a
      masked fill whose next kernel is a softmax, and the bool ops just before it that build
      the seq x seq mask, cost no launch and no pass over memory;
    - attention's batched products: its [seq, batch, heads, head_dim] layout lets baddbmm
      and bmm read q, k and v as strided views, so the copies eager PyTorch makes just before
      a baddbmm or bmm are not made (the context's copy after the bmm is, in both);
    - a dropout whose next kernel is the residual add over the same shape runs as one kernel
      (bias_dropout_add_fused_train): it reads the branch and the residual and writes the sum
      and the mask, never the dropout's output (priced as FUSED_DROPOUT_ADD).
    Its bias-GeLU fusion moves the bytes the eager addmm + gelu pair moves: nothing to change."""
    kernels = [op for op in ops if op.kind != "view"]
    gone, fused = set(), {}
    for i, op in enumerate(kernels):
        name = _aten_name(op)
        if name in ("baddbmm", "bmm"):
            gone.update(id(k) for k in _run_before(kernels, i, lambda k: _aten_name(k) == "clone"))
        elif name in ("masked_fill", "masked_fill_") and _feeds(kernels, i, "_softmax"):
            mask_shape = tuple(op.output_shape[-2:])
            gone.add(id(op))
            gone.update(id(k) for k in _run_before(
                kernels, i, lambda k: str(k.dtype).endswith("bool") and tuple(k.output_shape) == mask_shape))
        elif name == "native_dropout" and _feeds(kernels, i, "add"):
            add = kernels[i + 1]
            stored = add.bytes_written   # the dropout's output: written, then read back by the add
            fused[id(op)] = replace(op, target=FUSED_DROPOUT_ADD, bytes_read=op.bytes_read + add.bytes_read - stored,
                                    bytes_written=op.bytes_written - stored + add.bytes_written)
            gone.add(id(add))
    return [fused.get(id(op), op) for op in ops if id(op) not in gone]


def score_shapes(ops: list) -> frozenset:
    """The unfused attention score tensors of a layer, as (elements, seq, seq) keys
    (score_key): outputs of batched activation products (QK^T) whose last two dimensions
    are square. The memory-bound ops writing a tensor with such a key (mask, softmax,
    dropout) run on the scores, whether they see them as (batch x heads, seq, seq) or
    (batch, heads, seq, seq). Counting elements keeps a (batch, seq, hidden) activation out
    even when hidden equals seq (it has 1/heads of the elements)."""
    return frozenset(score_key(op.output_shape) for op in ops
                     if op.kind == "matmul" and op.gemm is not None and len(op.gemm) == 4
                     and len(op.output_shape) >= 3 and op.output_shape[-1] == op.output_shape[-2])


def score_key(shape) -> tuple:
    """(elements, last two dimensions) of a tensor shape: what score_shapes matches on."""
    return (_numel(shape), *tuple(int(d) for d in shape[-2:]))


def runs_on_scores(op: OpInfo, scores: frozenset) -> bool:
    """Whether `op` writes one of a layer's attention score tensors (`scores`: score_shapes)."""
    return bool(scores) and len(op.output_shape) >= 2 and score_key(op.output_shape) in scores


def _feeds(kernels: list, index: int, name: str) -> bool:
    """Whether the kernel after `index` is the aten op `name` over the same shape."""
    return index + 1 < len(kernels) and _aten_name(kernels[index + 1]) == name \
        and tuple(kernels[index].output_shape) == tuple(kernels[index + 1].output_shape)


def _run_before(kernels: list, index: int, matches) -> list:
    """The unbroken run of kernels just before `index` that `matches` accepts."""
    run = []
    for kernel in reversed(kernels[:index]):
        if not matches(kernel):
            break
        run.append(kernel)
    return run


class LayerCoster:
    """Times and memory of traced layers on one GPU type, cached per (signature, tp, sp)."""

    def __init__(self, traced: TracedModel, compute: ComputeModel, hidden: int | None, experts: int = 0,
                 fp8: Float8 | None = None, kv_heads: int | None = None):
        self.traced = traced
        # the model's K/V heads (ModelConfig.kv_heads): what context parallelism exchanges; a
        # torch that expands grouped K/V before its attention kernel (2.7) shows the query heads
        self.kv_heads = kv_heads
        self.fp8 = fp8           # the block linears run in float8 (planner.simulate.fp8); None: bf16
        self.compute = compute
        self.hidden = hidden
        self.experts = experts   # routed experts per MoE block (0: a dense model)
        self.residual_numel = traced.micro_batch * traced.seq * hidden if hidden else None
        self._cache = {}

    def timing(self, layer_index: int, tp: int = 1, sequence_parallel: bool = False,
               tp_layout: dict | None = None, extra_host_ops: tuple[int, int] = (0, 0),
               megatron_kernels: bool = False, ep: int = 1, imbalance: float = 1.0,
               compiled: bool = False, cp: int = 1) -> LayerTiming:
        """`ep`, `imbalance`: expert parallelism and the busiest ep rank's load over the average
        (planner.simulate.experts; only an MoE block's routed experts change). `cp`: context
        parallelism over a trace at seq / cp (planner.simulate.context): the attention
        kernels cost the full sequence's causal attention / cp, and the K/V exchange is listed.
        `extra_host_ops`: (forward, backward) launches the framework issues with this layer
        beyond the traced ops (planner.simulate.Execution.loss_host_ops for the head).
        `megatron_kernels`: the layer runs Megatron-LM's kernels where eager PyTorch runs
        several ops (planner.simulate.Execution.megatron_kernels; see _as_megatron_kernels).
        `compiled`: the block runs as torch.compile's kernels (planner.simulate.fusion)."""
        layer = self.traced.layers[layer_index]
        factory = tp > 1 and self.hidden is None   # a file.py:factory model: planner.simulate.factory_tp
        key = (layer.signature, tp, sequence_parallel, tuple(sorted((tp_layout or {}).items())), extra_host_ops,
               megatron_kernels, layer.name if factory else None, ep, imbalance, compiled, cp)
        if key not in self._cache:
            split = None
            if factory:
                if sequence_parallel:
                    raise MeshplanError("sequence parallelism needs a preset or JSON model: the runtime cannot "
                                        "shard a factory model's sequence dimension; drop sequence_parallel")
                split = FactorySplit(self.traced.cost_of(layer), layer_prefix(self.traced, layer_index), layer.name,
                                     tp_layout or {}, layer.kind == "block")
            self._cache[key] = self._timing(self.traced.cost_of(layer), tp, sequence_parallel, tp_layout or {},
                                            extra_host_ops, megatron_kernels, split, ep, imbalance, compiled,
                                            self.fp8 if layer.kind == "block" else None, cp)
        return self._cache[key]

    def op_forward_s(self, op: OpInfo, tp: int = 1, scores: frozenset = frozenset()) -> float:
        """One traced op's forward time on this GPU under tensor-parallel degree `tp`;
        `scores`: its layer's score_shapes."""
        return self._op_time(op, tp, False, {}, self.traced.precision, scores)[0]

    def _timing(self, cost: LayerCost, tp: int, sp: bool, layout: dict,
                extra_host_ops: tuple[int, int] = (0, 0), megatron_kernels: bool = False,
                split: FactorySplit | None = None, ep: int = 1, imbalance: float = 1.0,
                compiled: bool = False, fp8: Float8 | None = None, cp: int = 1) -> LayerTiming:
        precision = self.traced.precision
        fwd = bwd = streaming = core = 0.0
        kernel = [0.0, 0.0]
        fp8_params, fp8_linears, fp8_ops = 0.0, 0, [0, 0]
        comm_fwd, comm_bwd = [], []
        params = 0.0
        ops = _as_megatron_kernels(cost.ops) if megatron_kernels else cost.ops
        if compiled:
            ops = compiled_ops(cost, self._bwd_traffic_ratio)
        ep_fwd, ep_bwd = moe.collectives(ops, self.experts) if ep > 1 else ((), ())
        skewed = moe.imbalance_saved_bytes(ops, self.experts, ep, imbalance)   # the busiest rank's extra rows
        ops = moe.expert_parallel_ops(ops, self.experts, ep, imbalance)
        scores = score_shapes(ops)
        priced = {}   # an op object listed again (a routed expert's, planner.simulate.experts) is priced once
        reruns = selective_reruns(ops)
        for op, rerun in zip(ops, reruns):
            if id(op) not in priced or split:
                in_fp8 = fp8 if fp8 is not None and runs_in_fp8(op) else None
                priced[id(op)] = self._op_time(op, tp, sp, layout, precision, scores,
                                               *(split.place(op) if split else (None, None)), fp8=in_fp8, cp=cp)
                if in_fp8 is not None:
                    fp8_linears += 1
                    fp8_params += weight_count(op) * priced[id(op)][2]
                    fp8_ops[0] += priced[id(op)][3][0]
                    fp8_ops[1] += priced[id(op)][3][1]
            f, b, share = priced[id(op)][:3]
            fwd, bwd = fwd + f, bwd + b
            if rerun:   # what selective checkpointing repeats (planner.ir.selective_reruns)
                streaming += f
            if op.attention_core:
                core += f
            if op.kind == "attention":
                kernel = [kernel[0] + f, kernel[1] + b]
            if tp > 1:
                op_fwd, op_bwd = split.collectives(op) if split else self._tp_collectives(op, sp, layout, precision)
                comm_fwd += op_fwd
                comm_bwd += op_bwd
                if fp8 is not None and runs_in_fp8(op) and linear_style(op, layout) in ("colwise", "rowwise"):
                    amax_fwd, amax_bwd = fp8.tp_amax_collectives(*gemm_dims(op.gemm)[1:3])
                    comm_fwd += amax_fwd
                    comm_bwd += amax_bwd
            params += op.param_count * share
        launched = sum(1 for op in ops if op.kind != "view")
        host_fwd = (launched + extra_host_ops[0] + fp8_ops[0]) * self.compute.host_s_per_op
        host_bwd = (launched * HOST_BWD_OPS_PER_FWD_OP + extra_host_ops[1] + fp8_ops[1]) * self.compute.host_s_per_op
        fwd = self.compute.host_bound_s(fwd, host_fwd)
        bwd = self.compute.host_bound_s(bwd, host_bwd)
        streaming, core = min(streaming, fwd), min(core, fwd)
        replicated = 0.0 if sp or tp == 1 else REPLICATED_ACTIVATION_SHARE
        act_share = split.activation_share(tp) if split else replicated + (1 - replicated) / tp
        boundary_share = 1 / tp if sp else 1.0
        return LayerTiming(
            fwd_s=fwd, bwd_s=bwd, streaming_fwd_s=streaming, attention_core_fwd_s=core,
            tp_comm_fwd=tuple(comm_fwd), tp_comm_bwd=tuple(comm_bwd),
            params_per_gpu=params, saved_bytes=cost.saved_bytes * act_share + skewed,
            saved_bytes_full=cost.saved_bytes_full_ckpt * boundary_share,
            saved_bytes_selective=cost.saved_bytes_selective * act_share + skewed,
            saved_bytes_attention=cost.saved_bytes_attention * act_share + skewed,
            param_copy_bytes=cost.saved_param_copy_bytes / tp if tp > 1 and not split else cost.saved_param_copy_bytes,
            boundary_bytes=cost.output_bytes * boundary_share,
            # with ep 1 the experts are data-parallel over dp like the rest: nothing to tell apart
            expert_params_per_gpu=moe.expert_param_count(ops) if ep > 1 else 0.0, ep_comm_fwd=ep_fwd,
            ep_comm_bwd=ep_bwd, fp8_params_per_gpu=fp8_params, fp8_linears=fp8_linears,
            attention_kernel_s=tuple(kernel),
            **context.exchange(ops, tp, cp, lambda op: DTYPE_BYTES[_precision_of(op, precision)], self.kv_heads))

    def _tp_collectives(self, op: OpInfo, sp: bool, layout: dict, precision: str) -> tuple[list, list]:
        """(forward, backward) collectives over the TP group that `op` causes, as
        [(kind, bytes of the unsharded tensor)] (see the module docstring). A block region's
        pair - its input projections' gathered input (and reduced input gradient) and its
        output projection's reduced output - is charged on the output (row-parallel)
        projection, so q, k and v sharing one input count once. What crosses the region's
        input is the residual stream's dtype (fp32 under autocast: the norm's output, before
        the projections cast it); what leaves it is the projection's output dtype."""
        if self.residual_numel is None:
            return [], []
        stream = self.residual_numel * self._stream_bytes_per_element()
        out = self.residual_numel * DTYPE_BYTES[_precision_of(op, precision)]
        if self._vocab_parallel_embedding(op, layout):
            return [("all_reduce", out)], [("all_gather", out)] if sp else []
        if op.kind != "linear":
            return [], []
        style = linear_style(op, layout)
        if _module_name(op) in HEADS:
            return self._head_collectives(op, style, sp, stream, precision)
        if style != "rowwise":
            return [], []
        if _named_linear_style(SHARED_INPUT.get(_module_name(op), ""), layout) == "rowwise":
            # its input is an earlier sharded region's (Phi's parallel MLP): gathered and reduced there
            return [("reduce_scatter" if sp else "all_reduce", out)], [("all_gather", out)] if sp else []
        if sp:
            return [("all_gather", stream), ("reduce_scatter", out)], [("all_gather", out), ("reduce_scatter", stream)]
        return [("all_reduce", out)], [("all_reduce", stream)]

    def _stream_bytes_per_element(self) -> int:
        """The residual stream's element size: fp32 parameters under autocast keep it fp32."""
        if self.traced.cast == "autocast":
            return DTYPE_BYTES["fp32"]
        return DTYPE_BYTES[self.traced.precision]

    def _head_collectives(self, op: OpInfo, style: str, sp: bool, stream: float, precision: str):
        """The output head's collectives: it reads the (replicated, or under sequence
        parallelism sequence-split) final norm output."""
        gather_input = [("all_gather", stream)] if sp else []
        if style == "colwise":   # vocabulary-parallel: logits stay split, the loss reduces statistics
            tokens = self.residual_numel // self.hidden
            statistics = [("all_reduce", tokens * LOSS_STATISTIC_BYTES)] * LOSS_PARALLEL_ALLREDUCES
            return gather_input + statistics, [("reduce_scatter" if sp else "all_reduce", stream)]
        if style == "rowwise":   # partial logits summed; the input gradient gathered from feature shards
            logits = _numel(op.output_shape) * DTYPE_BYTES[_precision_of(op, precision)]
            return gather_input + [("all_reduce", logits)], [("all_gather", stream)]
        return gather_input, []

    @staticmethod
    def _vocab_parallel_embedding(op: OpInfo, layout: dict) -> bool:
        name = _module_name(op)
        return op.kind == "embedding" and name in VOCAB and layout.get(name, "vocab") == "vocab"

    def _op_time(self, op: OpInfo, tp: int, sp: bool, layout: dict, precision: str,
                 scores: frozenset = frozenset(), split: bool | None = None, style: str | None = None,
                 fp8: Float8 | None = None, cp: int = 1):
        """(forward s, backward s, parameter share kept on this GPU[, (forward, backward) extra
        host ops of a float8 linear]) for one op, `fp8` for a linear that runs in float8; `scores`:
        the shapes of its layer's attention score tensors (score_shapes). `split` and `style`
        (a factory model's, planner.simulate.factory_tp) say whether the op works on 1/tp of
        its tensor and how a linear is split, in place of Megatron's rules. `cp`: the trace is at
        seq / cp and a fused attention kernel's queries see the full causal key range, load
        balanced: the whole sequence's causal attention / cp (planner.simulate.context)."""
        kind = _COMPUTE_KINDS.get(op.kind, op.kind)
        if kind == "view":
            return 0.0, 0.0, 1.0
        if kind == "linear" and op.gemm is not None and fp8 is not None:
            return self._linear_time(op, tp, layout, precision, style if split is not None else None, fp8)
        if kind in ("linear", "matmul") and op.gemm is not None:
            fwd, bwd, share = (self._linear_time(op, tp, layout, precision, style if split is not None else None)
                               if kind == "linear" else self._activation_matmul_time(op, tp, sp, precision))
            # a routed expert's GEMM runs at the profiled grouped rate (Calibration.grouped_gemm_factor)
            factor = self.compute.grouped_gemm_factor if moe.is_expert_op(op) else 1.0
            return fwd * factor, bwd * factor, share
        if kind == "attention" and op.attention is not None:
            b, h, sq, skv, d, causal = op.attention
            heads = max(1, h // tp)
            args = (b, heads, sq * cp, skv * cp, d, precision, bool(causal))
            return (self.compute.attention_time_s(*args) / cp,
                    self.compute.attention_time_s(*args, backward=True) / cp, 1.0)
        if kind == "embedding" and split is None:   # a vocabulary-parallel table is split; any other replicated
            share = 1.0 / tp if self._vocab_parallel_embedding(op, layout) else 1.0
        else:
            share = 1.0 / tp if (self._split_by_tp(op, sp) if split is None else split) else 1.0
        moved = (op.bytes_read + op.bytes_written) * share
        on_scores = runs_on_scores(op, scores)
        fwd = self.compute.op_time_s(kind, op.fwd_flops * share, moved, _precision_of(op, precision),
                                     on_scores=on_scores)
        if not op.requires_grad and kind not in ("linear", "matmul"):
            return fwd, 0.0, share
        ratio = self._bwd_traffic_ratio(op)
        bwd = (self.compute.op_time_s(kind, op.bwd_flops * share, ratio * moved, _precision_of(op, precision),
                                      on_scores=on_scores)
               if (moved and ratio) or op.bwd_flops else 0.0)
        return fwd, bwd, share

    def _bwd_traffic_ratio(self, op: OpInfo) -> float:
        if isinstance(op, FusedKernel):
            return op.bwd_traffic_ratio
        if op.target == FUSED_DROPOUT_ADD:   # forward: x, residual, sum, mask; backward: gradient, mask, gradient
            element = DTYPE_BYTES[_precision_of(op, self.traced.precision)]
            return (2 * element + MASK_BYTES_PER_ELEMENT) / (3 * element + MASK_BYTES_PER_ELEMENT)
        name = _aten_name(op)
        if name in ("add", "sub") and self.traced.cast == "autocast" and self.traced.precision != "fp32":
            return AUTOCAST_ADD_BWD_TRAFFIC_RATIO
        return BWD_TRAFFIC_RATIO.get(name, DEFAULT_BWD_TRAFFIC_RATIO)

    def _linear_time(self, op: OpInfo, tp: int, layout: dict, precision: str, factory_style: str | None = None,
                     fp8: Float8 | None = None):
        """(forward s, backward s, parameter share); with `fp8` (a float8 linear,
        planner.simulate.fp8) also the (forward, backward) host ops its casts add."""
        m, k, n, batch = gemm_dims(op.gemm)
        style = "replicate" if tp == 1 else factory_style or (linear_style(op, layout) if self.hidden else "replicate")
        if style == "colwise":
            n = max(1, n // tp)
        elif style == "rowwise":
            k = max(1, k // tp)
        share = linear_param_share(op, style, tp)
        if fp8 is not None:
            fwd, bwd, ops_fwd, ops_bwd = fp8.linear_s(self.compute, m, k, n, batch,
                                                     backward=bool(op.requires_grad or op.param_count))
            if bwd and _aten_name(op) == "addmm":
                bwd += self.compute.memory_bound_time_s(batch * m * n * DTYPE_BYTES[_precision_of(op, precision)])
            return fwd, bwd, share, (ops_fwd, ops_bwd)
        fwd = self.compute.matmul_time_s(m, k, n, precision, batch)
        bwd = self._matmul_bwd_s(m, k, n, precision, batch) if op.requires_grad or op.param_count else 0.0
        if bwd and _aten_name(op) == "addmm":   # the bias gradient: the output gradient summed over tokens
            bwd += self.compute.memory_bound_time_s(batch * m * n * DTYPE_BYTES[_precision_of(op, precision)])
        return fwd, bwd, share

    def _activation_matmul_time(self, op: OpInfo, tp: int, sp: bool, precision: str):
        """A product of two activations (attention's QK^T and PV when not fused): timed from
        its shape, so a baddbmm with beta=0 is not charged for reading its output; tensor
        parallelism splits its batch (the heads)."""
        m, k, n, batch = gemm_dims(op.gemm)
        if self._split_by_tp(op, sp):
            batch = max(1, batch // tp)
        fwd = self.compute.matmul_time_s(m, k, n, precision, batch)
        return fwd, self._matmul_bwd_s(m, k, n, precision, batch) if op.requires_grad else 0.0, 1.0

    def _matmul_bwd_s(self, m: int, k: int, n: int, precision: str, batch: int) -> float:
        """The two products of a matmul's backward: the first operand's gradient (m x n @ n x k)
        and the second's (k x m @ m x n; a linear's weight gradient)."""
        return (self.compute.matmul_time_s(m, n, k, precision, batch)
                + self.compute.matmul_time_s(k, m, n, precision, batch))

    def _split_by_tp(self, op: OpInfo, sp: bool) -> bool:
        if self.residual_numel is None:
            return False
        if sp:
            return True
        return not self._is_residual_stream(op.output_shape)

    def _is_residual_stream(self, shape) -> bool:
        """A batch x seq x hidden tensor. The element count alone is not enough: attention's
        context (heads x seq x head_dim per sample) has as many elements, and it is split by heads."""
        return bool(shape) and int(shape[-1]) == self.hidden and _numel(shape) == self.residual_numel

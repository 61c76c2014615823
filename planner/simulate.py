"""simulate(plan, model, cluster): step time, throughput and per-GPU memory of one plan.

Time: each virtual pipeline stage gets a forward and a backward time per micro-batch
(its layers' op times from the compute model, plus recomputation, plus exposed
tensor-parallel collectives, plus FSDP collectives not hidden behind the layer they
overlap with); `planner.schedule` then plays the plan's schedule as an event
simulation, so bubbles and transfers fall out of the timeline. After a rank's last
backward comes the data-parallel tail: the gradient all-reduce not hidden behind
backward (DDP overlaps all buckets but the last) and the optimizer step.

Memory (per GPU, most loaded rank of each pipeline stage): model states by ZeRO stage
(cost_models.memory, as the runtime allocates them), activations = the traced saved
bytes of the stage's layers x the micro-batches the schedule keeps in flight, the
autocast low-precision weight copies, FSDP's gathered parameters, and the largest
transient of a backward walk through the stage; reserved = allocated x the allocator's
empirical overhead.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

import torch

from cost_models.cluster import ClusterSpec, parse_cluster
from cost_models.comm import CommModel, pair_group
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.memory import DTYPE_BYTES, gathered_param_bytes, model_state_bytes
from planner import fsdp
from planner.batch_scaling import BASE_MICRO_BATCHES, scaled_trace
from planner.torch_compat import traces_attention_core
from planner.costing import LayerCoster, LayerTiming, top_level_layout
from planner.ir import Layer, TracedModel
from planner.plan import Plan, even_stages
from planner.schedule import build_schedule, in_flight_counts, simulate_pipeline
from planner.zoo import ModelSpec, load_model

# PyTorch's caching allocator keeps freed blocks and rounds allocations up. Empirical:
# peak_reserved_bytes / peak_allocated_bytes over the 19 single-H100 steps in
# shared/reference/h100/measured.jsonl has median 1.063 (range 1.010-1.177).
ALLOCATOR_RESERVED_RATIO = 1.06
# Memory the CUDA context and cuBLAS/NCCL workspaces take outside the allocator (empirical
# order of magnitude on H100 with CUDA 12/13); subtracted from capacity before `fits`.
CUDA_CONTEXT_BYTES = 0.6e9
DDP_BUCKET_BYTES = 25 * 2 ** 20   # torch DDP's default bucket_cap_mb
SHALLOW_BLOCKS = 2   # blocks traced for a zoo decoder (see trace_spec)


@dataclass(frozen=True)
class Execution:
    """How a training framework runs a plan, where frameworks differ. The default is
    meshplan's runtime; MEGATRON_2021 is Megatron-LM as the measured runs used it.

    overlap_dp_comm: the gradient all-reduce runs in buckets during backward (torch DDP)
        rather than after it.
    cast: how the low precision is applied (planner.trace.CASTS); None = `plan.cast`.
        "params" with ZeRO 0 is Megatron's fp16 training: fp16 parameters and gradients,
        fp32 master weights in the optimizer (the model-state memory stays meshplan's).
    blocking_p2p: a pipeline send holds its rank until the transfer is done (Megatron waits
        on every batched isend/irecv, then torch.cuda.synchronize()); else sends run
        beside compute and delay only the receiver (torch.distributed.pipelining).
    p2p_scatter_gather: with tp > 1 each rank of a TP group sends 1/tp of the (replicated)
        boundary activation and the receivers all-gather it over the TP group
        (Megatron's scatter/gather optimisation, Narayanan et al. 2021 Sec. 4.1).
    batch_host_ops: launches per micro-batch, on every pipeline stage, that fetch the batch
        and build its masks; charged at the calibration's host time per op and never hidden
        behind the GPU, because the framework synchronises the device around them.
    loss_host_ops: (forward, backward) launches per micro-batch that the framework's loss
        adds to the traced head (whose loss is one log_softmax + nll_loss); they join the
        head's host time, so they hide behind a device-bound head.
    recompute_stops_early: a fully checkpointed block's recomputation stops once the last
        tensor backward needs is rebuilt (torch.utils.checkpoint, non-reentrant), so the
        block's last collective - its MLP output's reduction - is not issued again
        (measured: tests/test_comm_volume.py); Megatron-LM's reentrant checkpoint reruns the
        whole forward.
    replicate_copies_params: ZeRO 0 with dp > 1 runs torch's FSDP-based `replicate`, which
        keeps a second (unsharded) copy of the parameters from forward to backward
        (planner.fsdp.drive; measured: tests/test_state_bytes.py); Megatron-LM's DDP reduces
        gradients of the one copy.
    megatron_kernels: the framework runs Megatron-LM's kernels where eager PyTorch runs
        several ops (planner.costing._as_megatron_kernels): the causal mask applied inside
        its softmax kernel and built once per micro-batch, attention's batched products
        reading q, k and v as strided views (no copies), and each residual branch's dropout
        fused with its residual add.
    """

    overlap_dp_comm: bool = True
    cast: str | None = None
    blocking_p2p: bool = False
    p2p_scatter_gather: bool = False
    batch_host_ops: int = 0
    loss_host_ops: tuple[int, int] = (0, 0)
    megatron_kernels: bool = False
    recompute_stops_early: bool = True
    replicate_copies_params: bool = True


MESHPLAN_RUNTIME = Execution()
# Megatron-LM's per-micro-batch host work, counted launch by launch in its code (2021-22):
# - batch (pretrain_gpt.get_batch, every stage): the sizes' H2D copy, broadcast and D2H
#   read-back, the tokens' H2D copy and broadcast, two .contiguous() for tokens/labels, and
#   get_ltor_masks_and_position_ids' ones, tril, ones (loss mask), arange and `< 0.5`: 12.
#   Its 'batch-generator' and 'forward-compute' timers call torch.cuda.synchronize().
# - loss forward: mpu.vocab_parallel_cross_entropy issues 20 launches (max, three
#   all-reduces, sub_, masks, clone, two masked fills, arange, gather, clone, exp, sum, log,
#   sub, div_) where the trace has 2; loss_func and average_losses_across_data_parallel_group
#   add 8 (mul, two sums, div, clone, cat, all-reduce, div) and the schedule 1 (/ num
#   micro-batches): 18 + 8 + 1 = 27.
# - loss backward: the cross-entropy's 7 (arange, float, rsub, index, sub, index_put, mul_),
#   the loss scaling (1) and the gradients of loss_func's and the schedule's ops (5), where the
#   trace's two loss ops count for ~3: 10.
MEGATRON_BATCH_HOST_OPS = 12
MEGATRON_LOSS_HOST_OPS = (27, 10)
# Megatron's kernels (megatron_kernels), on by default in its arguments (the --no-*-fusion
# flags turn them off; examples/sc21 and vTrain's model keep them on):
# - attention: FusedScaleMaskSoftmax runs its CUDA kernels
#   (megatron/fused_kernels/scaled_upper_triang_masked_softmax*.cu, scaled_masked_softmax*.cu)
#   for fp16/bf16 scores: scale, causal mask and softmax in one pass over the scores; q, k
#   and v stay [seq, batch, heads, head_dim] views into the QKV projection's output, which
#   baddbmm and bmm read strided;
# - residual branches: bias_dropout_add_fused_train (torch.jit.script), one kernel.
MEGATRON_2021 = Execution(overlap_dp_comm=False, cast="params", blocking_p2p=True, p2p_scatter_gather=True,
                          batch_host_ops=MEGATRON_BATCH_HOST_OPS, loss_host_ops=MEGATRON_LOSS_HOST_OPS,
                          megatron_kernels=True, recompute_stops_early=False, replicate_copies_params=False)


@dataclass
class StageMemory:
    stage: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    transient_bytes: float
    peak_allocated_bytes: float
    peak_reserved_bytes: float
    host_bytes: float = 0.0


@dataclass
class SimResult:
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    hfu: float
    fits: bool
    capacity_bytes: float
    phases: dict
    stages: list
    timeline: object = field(repr=False, default=None)
    # per pipeline rank, what one step communicates: {group: {collective: bytes}}
    # (_Simulation.comm_bytes); a GPU of a TP or DP group moves what its peers move
    comm_bytes: list = field(default_factory=list)

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak_reserved_bytes)

    def to_dict(self) -> dict:
        worst = self.worst_stage
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "hfu": self.hfu, "fits": self.fits,
            "capacity_bytes": self.capacity_bytes, "phases": self.phases,
            "memory": {
                "peak_allocated_bytes": worst.peak_allocated_bytes,
                "peak_reserved_bytes": worst.peak_reserved_bytes,
                "breakdown": {k: getattr(worst, k) for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                             "activations_bytes", "transient_bytes")},
            },
            "stages": [asdict(s) for s in self.stages],
            "comm_bytes_per_stage": self.comm_bytes,
        }


@lru_cache(maxsize=256)
def _trace_cached(model_key: str, micro_batch: int, seq: int, precision: str, cast: str):
    """A zoo decoder beyond the base micro-batch sizes is scaled from its traces at them
    (planner.batch_scaling: exact, and milliseconds instead of a trace)."""
    spec = _SPECS[model_key]
    if spec.config is not None and micro_batch > max(BASE_MICRO_BATCHES):
        at_2, at_3 = (_trace_cached(model_key, b, seq, precision, cast) for b in BASE_MICRO_BATCHES)
        scaled = scaled_trace(at_2, at_3, micro_batch)
        if scaled is not None:
            return scaled
    return trace_spec(spec, micro_batch, seq, precision, cast)


def trace_spec(spec: ModelSpec, micro_batch: int, seq: int, precision: str, cast: str = "autocast") -> TracedModel:
    """Trace a model; a zoo decoder is traced two blocks deep and expanded to its depth.

    Its blocks are identical (one signature), so the trace of a 2-block copy holds every
    distinct layer; expanding it gives what the full trace gives (a test checks they are
    equal) in a fraction of the time (0.3 s instead of 1.4 s for GPT-3 175B), which is
    what lets the planner trace once per micro-batch size.
    """
    from planner.trace import trace_model
    if spec.config is None or spec.config.layers <= SHALLOW_BLOCKS:
        return trace_model(spec, micro_batch, seq, precision, cast=cast)
    shallow = ModelSpec(spec.name, replace(spec.config, layers=SHALLOW_BLOCKS))
    return expand_blocks(trace_model(shallow, micro_batch, seq, precision, cast=cast), spec.config.layers)


def expand_blocks(traced: TracedModel, blocks: int) -> TracedModel:
    """Repeat the (identical) blocks of a shallow trace until there are `blocks` of them."""
    first = traced.blocks[0]
    template = traced.layers[first]
    if len({traced.layers[i].signature for i in traced.blocks}) != 1:
        raise MeshplanError("expand_blocks needs a trace whose blocks are identical")
    before = traced.layers[:first]
    after = traced.layers[traced.blocks[-1] + 1:]
    prefix = template.name + "."
    new_blocks = [Layer(f"blocks.{i}", "block", template.signature, 0,
                        tuple(f"blocks.{i}" + m[len(template.name):] if m == template.name or m.startswith(prefix)
                              else m for m in template.modules))
                  for i in range(blocks)]
    layers = [replace(layer, index=i) for i, layer in enumerate([*before, *new_blocks, *after])]
    extra = blocks - len(traced.blocks)
    block_cost = traced.costs[template.signature]
    return replace(traced, layers=layers, param_count=traced.param_count + extra * block_cost.param_count,
                   param_bytes=traced.param_bytes + extra * block_cost.param_bytes)


_SPECS: dict = {}


def _model_key(spec: ModelSpec) -> str:
    key = spec.name + (repr(spec.config.to_dict()) if spec.config else f"@{id(spec.factory)}")
    _SPECS[key] = spec
    return key


def simulate(plan: Plan, model, cluster, compute: ComputeModel | None = None,
             comm: CommModel | None = None, execution: Execution = MESHPLAN_RUNTIME) -> SimResult:
    """Simulate one training step of `plan`, run as `execution` says (default: meshplan's runtime)."""
    return prepare(plan, model, cluster, compute, comm, execution).run()


def prepare(plan: Plan, model, cluster, compute: ComputeModel | None = None, comm: CommModel | None = None,
            execution: Execution = MESHPLAN_RUNTIME) -> "_Simulation":
    """The simulation of `plan`, ready to `run()` (the planner also reads its per-layer costs).

    Traces and per-layer costs are cached per (model, micro-batch, seq, precision) and per
    compute model, so simulating many plans of one model re-costs nothing."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    cluster = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    if plan.seq > (spec.config.max_seq if spec.config else plan.seq):
        raise MeshplanError(f"seq {plan.seq} exceeds the model's max_seq {spec.config.max_seq}")
    if "attention" in plan.checkpoint and not traces_attention_core():
        raise MeshplanError(f"checkpoint mode 'attention' needs torch.fx.traceback.annotate, which torch "
                            f"{torch.__version__} lacks: use selective or full, or torch >= 2.12")
    traced = _trace_cached(_model_key(spec), plan.micro_batch, plan.seq, plan.precision,
                           execution.cast or plan.cast)
    # a TP group across nodes is slow but legal: price it (the planner keeps tp in a node)
    plan.check_fits(len(traced.blocks), cluster.world_size)
    compute = compute or ComputeModel(cluster.gpu)
    comm = comm or CommModel(cluster)
    coster = _coster_cached(traced, compute, spec.config.hidden if spec.config else None)
    return _Simulation(plan, traced, cluster, compute, comm, coster, execution, spec.config)


_COSTERS: dict = {}


def _coster_cached(traced: TracedModel, compute: ComputeModel, hidden) -> LayerCoster:
    key = (id(traced), id(compute), hidden)
    entry = _COSTERS.get(key)
    if entry is None or entry[0] is not traced or entry[1] is not compute:
        if len(_COSTERS) > 256:
            _COSTERS.clear()
        entry = _COSTERS[key] = (traced, compute, LayerCoster(traced, compute, hidden))
    return entry[2]


# SimResult.phases: the slowest pipeline rank's step split into parts that add up to the
# step time (recompute_s is the part of compute_s spent recomputing), in words for people.
PHASE_WORDS = {"compute_s": "compute", "recompute_s": "recomputation",
               "exposed_tp_comm_s": "exposed tensor-parallel communication",
               "exposed_dp_comm_s": "exposed data-parallel communication",
               "pipeline_bubble_s": "pipeline bubble", "optimizer_s": "optimizer step"}


class LayerTimes(NamedTuple):
    """One micro-batch through a layer (or summed over a stage's layers): forward and
    backward as the schedule runs them, and the parts of them that are recomputation and
    exposed TP and FSDP communication (what the phases report)."""

    fwd_s: float
    bwd_s: float
    recompute_s: float
    tp_comm_s: float
    fsdp_comm_s: float


class HeldStates(NamedTuple):
    """Model-state bytes on one GPU: parameters as the optimizer holds them (FSDP: its fp32
    shard), FSDP's unsharded parameters kept across micro-batches, gradients, optimizer state."""

    params_bytes: float
    unsharded_bytes: float
    grads_bytes: float
    optimizer_bytes: float


class FsdpExposure(NamedTuple):
    """Exposed FSDP communication of one micro-batch through a layer, by what the action
    issues (planner.fsdp.play says which actions issue what)."""

    forward_gather_s: float = 0.0
    backward_gather_s: float = 0.0
    backward_scatter_s: float = 0.0
    backward_gather_scatter_s: float = 0.0

    def backward_s(self, gathers: bool, scatters: bool) -> float:
        if gathers:
            return self.backward_gather_scatter_s if scatters else self.backward_gather_s
        return self.backward_scatter_s if scatters else 0.0


class _Simulation:
    def __init__(self, plan, traced, cluster, compute, comm, coster, execution=MESHPLAN_RUNTIME, config=None):
        self.execution = execution
        # an empty tp_layout is Megatron's, with the embedding and head replicated where tp does
        # not divide the vocabulary, as the runtime does it (runtime.parallelize.megatron_layout)
        self.tp_layout = plan.tp_layout or (top_level_layout(config, plan) if config and plan.tp > 1 else {})
        # a tied embedding's parameters, split over TP when the token embedding is
        self.tied_params = config.vocab * config.hidden if config and config.tie_embeddings else 0
        self.tied_split = plan.tp if plan.tp > 1 and self.tp_layout.get("tok", "vocab") == "vocab" else 1
        self._untied_heads = {}   # layer index -> the head's timing less the tied weight
        self.plan, self.traced, self.cluster = plan, traced, cluster
        self.compute, self.comm, self.coster = compute, comm, coster
        degrees = {"pp": plan.pp, "dp": plan.dp, "tp": plan.tp}
        order = tuple(plan.rank_order)
        self.tp_group = comm.group(degrees, "tp", order)
        self.dp_group = comm.group(degrees, "dp", order)
        self.pp_cross_node = comm.group(degrees, "pp", order).crosses_nodes
        self.act_bytes = DTYPE_BYTES[plan.precision]
        # DDP all-reduces each .grad in its parameter's dtype: fp32 for our runtime's
        # fp32 parameters under autocast, 16-bit where the parameters themselves are
        # (Megatron-LM's fp16 training); FSDP2 reduces in fp32 (charged in fsdp_exposed)
        self.grad_dtype_bytes = self.act_bytes if traced.cast == "params" else 4
        # FSDP2's flags as the runtime drives them (planner.fsdp), and each virtual stage's
        # gathers and reductions under the plan's schedule
        self.fsdp_drive = fsdp.drive(plan.zero, plan.pp > 1, plan.dp, execution.replicate_copies_params)
        self._traffic = {}

    @property
    def actions(self):
        """The plan's schedule: per pipeline rank, its forward and backward actions in order."""
        return build_schedule(self.plan.schedule, self.plan.pp, self.plan.grad_accum, self.plan.interleave)

    # -- layers to stages ----------------------------------------------------------------
    def stage_layers(self) -> list[list[int]]:
        """Layer indices per virtual stage; non-block layers join the nearest block's stage."""
        plan, layers = self.plan, self.traced.layers
        blocks = self.traced.blocks
        ranges = plan.stages or even_stages(len(blocks), plan.virtual_stages) if blocks else [[0, 0]]
        owner = {}
        for stage, (start, end) in enumerate(ranges):
            for b in blocks[start:end]:
                owner[b] = stage
        stages = [[] for _ in range(plan.virtual_stages)]
        current = 0
        for layer in layers:
            if layer.index in owner:
                current = owner[layer.index]
            elif layer.index > max(blocks, default=-1):
                current = plan.virtual_stages - 1
            stages[current].append(layer.index)
        return stages

    def timing(self, index: int) -> LayerTiming:
        head = self.traced.layers[index].kind == "head"
        extra = self.execution.loss_host_ops if head else (0, 0)
        timing = self.coster.timing(index, self.plan.tp, self.plan.sequence_parallel, self.tp_layout, extra,
                                    self.execution.megatron_kernels)
        if head and self.tied_params and self.plan.pp == 1:
            # the head's weight is the embedding's, held once where both live on one rank (the
            # trace lists it under both ops); with pipeline stages the last stage keeps a copy
            if index not in self._untied_heads:
                self._untied_heads[index] = replace(timing, params_per_gpu=timing.params_per_gpu
                                                    - self.tied_params / self.tied_split)
            return self._untied_heads[index]
        return timing

    def rank_layers(self, rank: int, stages) -> list[int]:
        """The layers pipeline rank `rank` holds: those of each of its virtual stages."""
        return [i for c in range(self.plan.interleave) for i in stages[c * self.plan.pp + rank]]

    def checkpoint_mode(self, index: int) -> str:
        layer = self.traced.layers[index]
        if layer.kind != "block":
            return "none"
        return self.plan.checkpoint_for(self.traced.block_number[index])

    # -- time ----------------------------------------------------------------------------
    def layer_times(self, index: int, mode: str | None = None) -> LayerTimes:
        """One micro-batch through one layer, under the plan's checkpoint mode for the layer
        or the `mode` given: forward, backward (recompute included), and the parts of those
        spent recomputing and in exposed TP and FSDP communication - the planner's estimate.
        FSDP's collectives are averaged over the step's micro-batches as if each ran forward
        then backward (a pipeline's warm-up forwards can only add ZeRO-3 gathers); `run()`
        charges them to the actions of the real schedule that issue them."""
        base = self.base_layer_times(index, mode)
        if not self.fsdp_communicates:
            return base
        traffic = fsdp.play(self.fsdp_drive, fsdp.in_sequence(self.plan.grad_accum))
        exposed = self.fsdp_exposure(index, base)
        n = self.plan.grad_accum
        fsdp_fwd = exposed.forward_gather_s * len(traffic.forward_gathers) / n
        fsdp_bwd = sum(exposed.backward_s(mb in traffic.backward_gathers, mb in traffic.backward_reduces)
                       for mb in range(n)) / n
        return base._replace(fwd_s=base.fwd_s + fsdp_fwd, bwd_s=base.bwd_s + fsdp_bwd, fsdp_comm_s=fsdp_fwd + fsdp_bwd)

    def base_layer_times(self, index: int, mode: str | None = None) -> LayerTimes:
        """layer_times without FSDP's communication."""
        t = self.timing(index)
        mode = self.checkpoint_mode(index) if mode is None else mode
        tp_fwd, tp_bwd = self.tp_comm_s(t.tp_comm_fwd), self.tp_comm_s(t.tp_comm_bwd)
        if mode == "full":   # the recomputed forward issues its collectives again
            tp_bwd += self.tp_comm_s(self.recomputed_collectives(t))
        recompute = t.recompute_s(mode)
        return LayerTimes(t.fwd_s + tp_fwd, t.bwd_s + recompute + tp_bwd, recompute, tp_fwd + tp_bwd, 0.0)

    def recomputed_collectives(self, t: LayerTiming) -> tuple:
        """The forward collectives a full recomputation of the layer issues again."""
        return t.tp_comm_fwd[:-1] if self.execution.recompute_stops_early else t.tp_comm_fwd

    def tp_comm_s(self, collectives) -> float:
        """TP collectives ((kind, bytes), ...) in a row on the TP group: inside a layer they sit
        between the kernels that produce and consume them, so none is hidden."""
        return sum(self.comm.time_s(kind, nbytes, self.tp_group) for kind, nbytes in collectives)

    @property
    def fsdp_communicates(self) -> bool:
        """FSDP issues collectives: ZeRO 1-3 over more than one data-parallel rank (ZeRO 0's
        replicate copies its parameters locally and all-reduces: dp_tail_s)."""
        return self.fsdp_drive is not None and self.plan.zero >= 1 and self.plan.dp > 1

    def fsdp_traffic(self, stage: int) -> fsdp.Traffic | None:
        """What FSDP gathers and reduces for virtual stage `stage` in one step (None: no
        FSDP collectives: ZeRO 0/1, or one data-parallel rank)."""
        if not self.fsdp_communicates:
            return None
        if stage not in self._traffic:
            pp = self.plan.pp
            chunk_actions = tuple((a.kind, a.micro_batch) for a in self.actions[stage % pp] if a.chunk == stage // pp)
            self._traffic[stage] = fsdp.play(self.fsdp_drive, chunk_actions)
        return self._traffic[stage]

    def fsdp_exposure(self, index: int, base: LayerTimes) -> FsdpExposure:
        """A layer's FSDP collectives, each hidden behind the compute of the pass it serves
        (FSDP2 issues the next all-gather while this layer computes)."""
        t = self.timing(index)
        gather_bytes, scatter_bytes = self.fsdp_bytes(t)
        gather = self.comm.all_gather_s(gather_bytes, self.dp_group)
        if self.plan.offload_optimizer:   # the fp32 shard comes from the host before each gather
            gather += t.params_per_gpu / self.plan.dp * 4 / self.cluster.gpu.host_link_bw_bytes_per_s
        scatter = self.comm.reduce_scatter_s(scatter_bytes, self.dp_group)
        return FsdpExposure(max(0.0, gather - base.fwd_s), max(0.0, gather - base.bwd_s),
                            max(0.0, scatter - base.bwd_s), max(0.0, gather + scatter - base.bwd_s))

    def fsdp_extra_s(self, stage_exposure: list) -> dict:
        """Exposed FSDP time of each action that issues a collective: {(kind, mb, stage): s}."""
        extra = {}
        for stage, exposed in enumerate(stage_exposure):
            traffic = self.fsdp_traffic(stage)
            if traffic is None:
                continue
            for mb in range(self.plan.grad_accum):
                if mb in traffic.forward_gathers and exposed.forward_gather_s:
                    extra[("F", mb, stage)] = exposed.forward_gather_s
                backward = exposed.backward_s(mb in traffic.backward_gathers, mb in traffic.backward_reduces)
                if backward:
                    extra[("B", mb, stage)] = backward
        return extra

    def fsdp_tail_s(self, rank: int, stages, timeline) -> float:
        """A pipeline stage reduce-scatters its accumulated gradients once, after its last
        backward (perform_reduce_grad); the step waits for it before the optimizer. With
        several chunks on a rank, an earlier chunk's reduction runs beside the rank's later
        backwards: the reductions queue on one stream from each chunk's last backward."""
        plan = self.plan
        if not (self.fsdp_communicates and self.fsdp_drive.reduce_after_last):
            return 0.0   # reduced inside the backwards (fsdp_extra_s), or no FSDP collectives
        last_backward = {}
        for event in timeline.events:
            if event.rank == rank and event.kind == "B":
                last_backward[event.chunk] = max(last_backward.get(event.chunk, 0.0), event.end_s)
        stream_free = 0.0
        for chunk, end in sorted(last_backward.items(), key=lambda item: item[1]):
            stage = chunk * plan.pp + rank
            traffic = self.fsdp_traffic(stage)
            if traffic is None or not traffic.reduce_after_last:
                continue
            scatter = sum(self.comm.reduce_scatter_s(self.fsdp_bytes(self.timing(i))[1], self.dp_group)
                          for i in stages[stage])
            stream_free = max(stream_free, end) + scatter
        return max(0.0, stream_free - timeline.finish_s[rank])

    def fsdp_bytes(self, t: LayerTiming) -> tuple[float, float]:
        """(all-gather, reduce-scatter) buffer bytes of one layer under FSDP2: parameters
        gathered in the compute dtype, gradients reduced in fp32 (its reduce dtype)."""
        return t.params_per_gpu * self.act_bytes, t.params_per_gpu * 4

    def run(self) -> SimResult:
        plan = self.plan
        stages = self.stage_layers()
        fwd, bwd, parts, stage_params, exposure = [], [], [], [], []
        batch_s = self.execution.batch_host_ops * self.compute.host_s_per_op
        for v, layers in enumerate(stages):
            base = [self.base_layer_times(i) for i in layers]
            parts.append(LayerTimes(*(sum(t[k] for t in base) for k in range(len(LayerTimes._fields)))))
            exposures = [self.fsdp_exposure(i, b) for i, b in zip(layers, base)] if self.fsdp_traffic(v) else []
            exposure.append(FsdpExposure(*(sum(e[k] for e in exposures) for k in range(len(FsdpExposure._fields)))))
            stage_params.append(sum(self.timing(i).params_per_gpu for i in layers))
            fwd.append(batch_s + parts[-1].fwd_s)
            bwd.append(parts[-1].bwd_s + self.grad_accumulation_s(stage_params[-1]))
        boundary = max((self.timing(s[-1]).boundary_bytes for s in stages if s), default=0.0)
        extra = self.fsdp_extra_s(exposure)
        timeline = simulate_pipeline(self.actions, fwd, bwd, self.p2p_s(boundary), self.execution.blocking_p2p, extra)
        tails, dp_exposed, optimizer, fsdp_exposed = [], [], [], []
        for rank in range(plan.pp):
            params = sum(stage_params[c * plan.pp + rank] for c in range(plan.interleave))
            last_bwd = sum(bwd[c * plan.pp + rank] for c in range(plan.interleave))
            fsdp_exposed.append(sum(s for (_, _, stage), s in extra.items() if stage % plan.pp == rank))
            dp_exposed.append(self.dp_tail_s(params, last_bwd) + self.fsdp_tail_s(rank, stages, timeline)
                              + self.tied_grad_s(rank)
                              + self.comm.all_reduce_s(self.norm_grad_bytes(rank, stages), self.tp_group))
            optimizer.append(self.optimizer_s(params))
            tails.append(timeline.finish_s[rank] + dp_exposed[-1] + optimizer[-1])
        step = max(tails)
        slowest = tails.index(step)
        memory = [self.stage_memory(rank, stages) for rank in range(plan.pp)]
        result = self.result(step, timeline, slowest, dp_exposed, optimizer, parts, memory, fsdp_exposed[slowest])
        result.comm_bytes = [self.comm_bytes(rank, stages) for rank in range(plan.pp)]
        return result

    def comm_bytes(self, rank: int, stages) -> dict:
        """What one step makes pipeline rank `rank` communicate: {group: {collective: bytes}}
        over the TP group ("tp"), the DP group ("dp"), to the next and previous pipeline stage
        ("pp": what it sends) and, with a tied embedding split over stages, to its other
        copy ("tied"). Bytes are each collective's full buffer on one rank (nccl-tests'
        convention, as CommModel prices them), summed over the step's micro-batches."""
        plan, n = self.plan, self.plan.grad_accum
        volume = {"tp": Counter(), "dp": Counter(), "pp": Counter(), "tied": Counter()}
        chunks = [c * plan.pp + rank for c in range(plan.interleave)]
        params = 0.0
        for index, stage in ((i, v) for v in chunks for i in stages[v]):
            t = self.timing(index)
            params += t.params_per_gpu
            again = self.recomputed_collectives(t) if self.checkpoint_mode(index) == "full" else ()
            for kind, nbytes in t.tp_comm_fwd + t.tp_comm_bwd + again:
                volume["tp"][kind] += n * nbytes
            traffic = self.fsdp_traffic(stage)
            if traffic is not None:
                gather_bytes, scatter_bytes = self.fsdp_bytes(t)
                volume["dp"]["all_gather"] += traffic.gathers_per_step * gather_bytes
                volume["dp"]["reduce_scatter"] += traffic.reduce_scatters_per_step * scatter_bytes
        if plan.dp > 1 and plan.zero == 0:
            volume["dp"]["all_reduce"] += self.dp_tail_bytes(params)
        if self.holds_tied_copy(rank):
            volume["tied"]["all_reduce"] += self.tied_grad_bytes()
        norm_grads = self.norm_grad_bytes(rank, stages)
        if norm_grads:
            volume["tp"]["all_reduce"] += norm_grads
        for v in chunks:   # activations forward to stage v + 1, gradients back to stage v - 1
            for boundary_of in ([v] if v < len(stages) - 1 else []) + ([v - 1] if v > 0 else []):
                for group, kind, nbytes in self.p2p_parts(self.timing(stages[boundary_of][-1]).boundary_bytes):
                    volume[group][kind] += n * nbytes
        return {group: dict(kinds) for group, kinds in volume.items() if kinds}

    def grad_accumulation_s(self, params: float) -> float:
        """Per backward: adding a micro-batch's weight gradients into the ones accumulated so far
        (autograd's AccumulateGrad, Megatron's main_grad.add_: read both, write the sum, in the
        gradients' dtype). Every micro-batch but the first adds; spread evenly over them.
        FSDP2 adds in fp32 (its reduce dtype): each micro-batch's reduce-scattered 1/dp shard
        (ZeRO 2/3 without a pipeline), else the whole unsharded gradient it keeps."""
        n = self.plan.grad_accum
        if n <= 1 or not params:
            return 0.0
        if self.fsdp_drive is not None and self.plan.zero >= 1:
            added_bytes = 3 * params * 4 / (1 if self.holds_unsharded else self.plan.dp)
        else:
            added_bytes = 3 * params * self.grad_dtype_bytes
        return (n - 1) / n * self.compute.memory_bound_time_s(added_bytes)

    def p2p_s(self, boundary_bytes: float) -> float:
        """One micro-batch's boundary activation (or its gradient) to the next stage."""
        return sum(self.comm.p2p_s(nbytes, self.pp_cross_node) if group == "pp" else
                   self.comm.all_gather_s(nbytes, self.tp_group) for group, _, nbytes in self.p2p_parts(boundary_bytes))

    def p2p_parts(self, boundary_bytes: float) -> list:
        """The transfers that carry one boundary activation (or gradient) to the next stage:
        [(group, collective, bytes)]; Megatron's scatter/gather sends 1/tp of it and all-gathers."""
        plan = self.plan
        if plan.pp == 1:
            return []
        if not (self.execution.p2p_scatter_gather and plan.tp > 1 and not plan.sequence_parallel):
            return [("pp", "send", boundary_bytes)]
        return [("pp", "send", boundary_bytes / plan.tp), ("tp", "all_gather", boundary_bytes)]

    def dp_tail_s(self, params: float, last_bwd_s: float) -> float:
        """ZeRO 0's gradient all-reduce, in buckets during the last backward (DDP,
        replicate) or after it; ZeRO 1-3's reduce-scatters are FSDP's (fsdp_extra_s,
        fsdp_tail_s)."""
        plan = self.plan
        if plan.dp == 1 or plan.zero >= 1:
            return 0.0
        grad_bytes = self.dp_tail_bytes(params)
        all_reduce = self.comm.all_reduce_s(grad_bytes, self.dp_group)
        last_bucket = self.comm.all_reduce_s(min(grad_bytes, DDP_BUCKET_BYTES), self.dp_group)
        return max(all_reduce - last_bwd_s, last_bucket) if self.execution.overlap_dp_comm else all_reduce

    def dp_tail_bytes(self, params: float) -> float:
        """ZeRO 0's gradient all-reduce buffer bytes after backward, in the gradients' dtype."""
        return params * self.grad_dtype_bytes

    def tied_grad_s(self, rank: int) -> float:
        """With pipeline stages, a tied embedding lives twice: as the first stage's token
        embedding and the last stage's head. After backward those two ranks all-reduce its
        gradient before the optimizer step (runtime.engine; Megatron-LM's embedding group)."""
        if not self.holds_tied_copy(rank):
            return 0.0
        return self.comm.all_reduce_s(self.tied_grad_bytes(), pair_group(self.pp_cross_node))

    def holds_tied_copy(self, rank: int) -> bool:
        """Whether pipeline rank `rank` holds one of a tied embedding's two copies."""
        return self.plan.pp > 1 and bool(self.tied_params) and rank in (0, self.plan.pp - 1)

    def norm_grad_bytes(self, rank: int, stages) -> float:
        """Under sequence parallelism each TP rank normalises its own tokens, so the norms'
        weight gradients are partial sums: they are all-reduced over the TP group once per
        step, after backward (Megatron-LM's sequence-parallel layernorm all-reduce; DTensor's
        Partial -> Replicate in the runtime)."""
        plan = self.plan
        if plan.tp == 1 or not plan.sequence_parallel:
            return 0.0
        layers = self.rank_layers(rank, stages)
        norm_params = sum(op.param_count for i in layers for op in self.traced.cost_of(i).ops if op.kind == "norm")
        return norm_params * self.grad_dtype_bytes

    def tied_grad_bytes(self) -> float:
        if self.plan.zero >= 1:   # FSDP's reduced gradient: a 1/dp shard, fp32 as its sharded parameter
            return self.tied_params / self.tied_split / self.plan.dp * 4
        return self.tied_params / self.tied_split * self.grad_dtype_bytes

    def optimizer_s(self, params: float) -> float:
        local = params / self.plan.dp if self.plan.zero >= 1 else params
        if self.plan.offload_optimizer:
            return self.compute.offloaded_optimizer_step_time_s(local)
        return self.compute.optimizer_step_time_s(local)

    # -- memory --------------------------------------------------------------------------
    def stage_memory(self, rank: int, stages) -> StageMemory:
        plan = self.plan
        layers = self.rank_layers(rank, stages)
        timings = [self.timing(i) for i in layers]
        params = sum(t.params_per_gpu for t in timings)
        states = model_state_bytes(params, plan.precision, plan.zero, plan.dp, plan.offload_optimizer)
        in_flight = (in_flight_counts(plan.schedule, plan.pp, plan.grad_accum, plan.interleave)[rank]
                     / plan.interleave)  # in units of the whole rank's layers
        fsdp_mixed = self.traced.cast == "params"
        saved = sum(t.saved_for(self.checkpoint_mode(i)) for i, t in zip(layers, timings))
        # autocast's low-precision weight copies stay saved until backward, except in
        # fully checkpointed layers (recomputed there); FSDP mixed precision has none
        copies = 0.0 if fsdp_mixed else sum(t.param_copy_bytes for i, t in zip(layers, timings)
                                            if self.checkpoint_mode(i) != "full")
        activations = in_flight * (saved + copies)
        gathered = self.gathered_bytes([t.params_per_gpu for t in timings])
        # gradients appear during backward as activations go: the walk finds the worst moment,
        # and the breakdown reports each part as it is at that moment (so the parts add up)
        grads, released, working = self.backward_peak(layers, timings, self.held_grad_bytes(params, states))
        activations_at_peak = max(activations - released, 0.0)
        transient = working + gathered
        allocated = states.params_bytes + states.optimizer_bytes + grads + activations_at_peak + transient
        return StageMemory(rank, states.params_bytes, grads, states.optimizer_bytes,
                           activations_at_peak, transient, allocated, allocated * ALLOCATOR_RESERVED_RATIO,
                           states.host_bytes)

    def held_states(self, rank: int, stages) -> "HeldStates":
        """The most model states pipeline rank `rank` holds between its passes: before a
        micro-batch, before the step's once-a-step reduction, before the optimizer step
        (tests/test_state_bytes.py compares them with the storages a runtime rank holds)."""
        plan = self.plan
        layers = self.rank_layers(rank, stages)
        params = [self.timing(i).params_per_gpu for i in layers]
        states = model_state_bytes(sum(params), plan.precision, plan.zero, plan.dp, plan.offload_optimizer)
        if self.holds_unsharded:
            unsharded = self.gathered_bytes(params)
        elif self.fsdp_drive is not None and plan.grad_accum > 1:
            # FSDP2 leaves the part's root group (embedding, final norm, head: the layers
            # outside the blocks) gathered from one micro-batch's backward to the next forward
            # (measured by tests/test_state_bytes.py)
            root = [p for i, p in zip(layers, params) if self.traced.layers[i].kind != "block"]
            unsharded = self.unsharded_bytes(root)
        else:
            unsharded = 0.0
        return HeldStates(states.params_bytes, unsharded, self.held_grad_bytes(sum(params), states),
                          states.optimizer_bytes)

    @property
    def holds_unsharded(self) -> bool:
        """FSDP keeps each layer's unsharded parameters and gradient from a stage's first
        backward to the step's reduction (a pipeline stage: planner.fsdp)."""
        return self.fsdp_drive is not None and not self.fsdp_drive.reshard_after_backward

    @property
    def keeps_every_layer_gathered(self) -> bool:
        """At the stage's peak every layer's unsharded parameters are alive: kept from
        forward to backward (ZeRO-2, ZeRO 0's replicate) or across micro-batches."""
        drive = self.fsdp_drive
        return drive is not None and not (drive.reshard_after_forward and drive.reshard_after_backward)

    def gathered_bytes(self, layer_params: list) -> float:
        """FSDP's unsharded parameters at the stage's peak, in the dtype it gathers in."""
        if self.fsdp_drive is None:
            return 0.0
        if self.keeps_every_layer_gathered:
            return self.unsharded_bytes(layer_params)
        return gathered_param_bytes(3, self.gather_precision, layer_params)

    @property
    def gather_precision(self) -> str:
        return self.plan.precision if self.traced.cast == "params" else "fp32"

    def unsharded_bytes(self, layer_params: list) -> float:
        """These layers' parameters unsharded, in the dtype FSDP gathers them in."""
        return DTYPE_BYTES[self.gather_precision] * float(sum(layer_params))

    def held_grad_bytes(self, params: float, states) -> float:
        """Gradient bytes held while micro-batches accumulate: the sharded (or DDP's whole)
        gradients, or FSDP's unsharded fp32 ones under a pipeline (its reduce dtype)."""
        return params * 4 if self.holds_unsharded else states.grads_bytes

    def layer_state_bytes(self, params: float) -> float:
        """A layer's model states at the stage's peak, for the partition's estimate: its
        parameters, gradients and optimizer state by ZeRO stage, plus what FSDP keeps
        unsharded from forward to backward (ZeRO-2) or across micro-batches (a pipeline)."""
        plan = self.plan
        states = model_state_bytes(params, plan.precision, plan.zero, plan.dp, plan.offload_optimizer)
        held = states.params_bytes + self.held_grad_bytes(params, states) + states.optimizer_bytes
        if self.keeps_every_layer_gathered:
            held += self.gathered_bytes([params])
        return held

    def backward_peak(self, layers, timings, grads_bytes: float) -> tuple[float, float, float]:
        """(gradients, released activations, working bytes) at the worst moment of the last backward.

        Walk the layers backwards: a layer's backward needs its recomputed activations
        (when checkpointed) and a working set of about twice its largest op output
        (the output gradient and the input gradient it produces); gradients of the
        layers done so far are allocated (grads are freed between steps unless
        accumulation keeps them), while finished layers' activations are released.
        The moment after the last layer (all gradients, no activations) is a candidate too.
        """
        plan = self.plan
        accumulating = plan.grad_accum > 1   # earlier micro-batches' gradients are held
        grads_so_far = grads_bytes if accumulating else 0.0
        shard = plan.dp if plan.zero >= 1 and not self.holds_unsharded else 1
        released = 0.0
        worst, at_worst = None, (0.0, 0.0, 0.0)
        for index, t in zip(reversed(layers), reversed(timings)):
            mode = self.checkpoint_mode(index)
            cost = self.traced.cost_of(index)
            working = 2 * max((op.bytes_written for op in cost.ops), default=0) / (plan.tp if plan.tp > 1 else 1)
            working += t.saved_bytes - t.saved_for(mode) if mode != "none" else 0.0   # recomputed activations
            value = grads_so_far + working - released
            if worst is None or value > worst:
                worst, at_worst = value, (grads_so_far, released, working)
            if not accumulating and not plan.offload_optimizer:   # offloaded grads go to the host
                grads_so_far += t.params_per_gpu * 4 / shard
            released += t.saved_for(mode)
        if worst is None or grads_so_far - released > worst:
            at_worst = (grads_so_far, released, 0.0)
        return at_worst

    # -- result --------------------------------------------------------------------------
    def result(self, step, timeline, slowest, dp_exposed, optimizer, parts, memory, fsdp_exposed_s) -> SimResult:
        plan, cluster = self.plan, self.cluster
        tokens = plan.global_batch * plan.seq
        fwd_flops, bwd_flops = self.traced.flop_counter_flops()
        per_micro_batch = fwd_flops + bwd_flops
        micro_batches = plan.global_batch / plan.micro_batch
        model_flops = per_micro_batch * micro_batches
        recompute_flops = micro_batches * sum(
            self.traced.cost_of(i).recompute_fwd_flops(self.checkpoint_mode(i)) for i in self.traced.blocks)
        world = cluster.world_size
        peak = cluster.gpu.peak_flops_for(plan.precision)
        capacity = cluster.gpu.memory_bytes - CUDA_CONTEXT_BYTES
        # the slowest rank's step, phase by phase: every micro-batch passes each of its
        # virtual stages once forward and once backward
        mine = [parts[c * plan.pp + slowest] for c in range(plan.interleave)]
        per_step = {name: plan.grad_accum * sum(getattr(p, name) for p in mine) for name in LayerTimes._fields}
        phases = {
            "compute_s": timeline.busy_s[slowest] - per_step["tp_comm_s"] - fsdp_exposed_s,
            "recompute_s": per_step["recompute_s"],   # part of compute_s
            "exposed_tp_comm_s": per_step["tp_comm_s"],
            "exposed_dp_comm_s": fsdp_exposed_s + dp_exposed[slowest],
            "pipeline_bubble_s": timeline.bubble_s(slowest),
            "optimizer_s": optimizer[slowest],
        }
        fits = all(m.peak_reserved_bytes <= capacity and m.host_bytes <= cluster.host_memory_bytes_per_gpu
                   for m in memory)
        return SimResult(step, tokens / step, model_flops / step / world / 1e12,
                         model_flops / step / world / peak, (model_flops + recompute_flops) / step / world / peak,
                         fits, capacity, phases, memory, timeline)

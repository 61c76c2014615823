"""simulate(plan, model, cluster): step time and throughput of one plan.

Each virtual pipeline stage gets a forward and a backward time per micro-batch
(its layers' op times from the compute model, plus recomputation, plus exposed
tensor-parallel collectives, plus FSDP collectives not hidden behind the layer they
overlap with); `planner.simulate.schedule` then plays the plan's schedule as an event
simulation, so bubbles and transfers fall out of the timeline. After a rank's last
backward comes the data-parallel tail: the gradient all-reduce not hidden behind
backward (DDP overlaps all buckets but the last) and the optimizer step. Memory:
planner.simulate.memory; communication: planner.simulate.communication. Context
parallelism (planner.simulate.context): each micro-batch is traced at seq / cp tokens, the
attention re-priced for the full causal range, the K/V exchange runs on the cp group, and
gradients are reduced (and ZeRO shards) over the dp x cp ranks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import torch

from cost_models.cluster import parse_cluster
from cost_models.comm import CommModel
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.inputs import finite_number, shown
from cost_models.memory import DTYPE_BYTES
from planner.arch.layout import check_runnable
from planner.arch.moe import check_tensor_parallel
from planner.ir import ATTENTION_BWD_FACTOR, FLOP_COUNTER_ATTENTION_BWD_FACTOR, TracedModel
from planner.fp8 import check_gpu as check_fp8_gpu, fsdp_float8_all_gather
from planner.plan import Plan, compute_precision, even_stages
from planner.simulate.fp8 import Float8, precompute_scales_s
from planner.simulate import context, fsdp
from planner.simulate.communication import CommMixin
from planner.simulate.costing import LayerCoster, LayerTiming, top_level_layout
from planner.engines import MESHPLAN_RUNTIME, Execution, get_engine
from planner.simulate.factory_tp import check_factory_plan
from planner.simulate.memory import CUDA_CONTEXT_BYTES, MemoryMixin, StageMemory
from planner.simulate.schedule import build_schedule, simulate_pipeline
from planner.simulate.times import FsdpExposure, LayerTimes
from planner.simulate.traces import model_key, trace_cached
from planner.torch_compat import traces_attention_core
from planner.zoo import ModelSpec, load_model


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
    # per pipeline rank, what follows its last backward: (exposed data-parallel communication s,
    # optimizer step s); what the Chrome trace and the HTML report draw after the pipeline
    rank_tails_s: list = field(default_factory=list)
    # MFU with attention's FLOPs counted over the causal mask's pairs only (Megatron-LM's
    # num_floating_point_operations halves core attention for the mask); `mfu` counts the full
    # seq x seq square (PaLM's 12 L H Q T, torchtitan's and FlopCounterMode's): at long
    # sequences, where attention is most of the work, the two differ by up to 2x
    mfu_causal: float = 0.0

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak_reserved_bytes)

    def to_dict(self) -> dict:
        worst = self.worst_stage
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "mfu_causal": self.mfu_causal,
            "hfu": self.hfu, "fits": self.fits,
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


def simulate(plan: Plan, model, cluster, compute: ComputeModel | None = None,
             comm: CommModel | None = None, execution: Execution | None = None,
             moe_imbalance: float = 1.0) -> SimResult:
    """Simulate one training step of `plan` as its engine runs it (`plan.engine`, with
    `plan.engine_options`; planner.engines); `execution` overrides the engine's profile.
    `moe_imbalance` (>= 1): the busiest expert-parallel rank receives that many times the
    average routed tokens (planner.simulate.experts); 1 is balanced routing.

    Raises MeshplanError on bad arguments, on a plan the engine cannot run, and on a plan
    that could not run on the model (planner.arch.layout.check_runnable); a plan that does
    not fit memory is priced, with `fits` False."""
    return prepare(plan, model, cluster, compute, comm, execution, moe_imbalance).run()


def prepare(plan: Plan, model, cluster, compute: ComputeModel | None = None, comm: CommModel | None = None,
            execution: Execution | None = None, moe_imbalance: float = 1.0) -> "_Simulation":
    """The simulation of `plan`, ready to `run()`, its arguments checked as simulate() checks them.

    Traces and per-layer costs are cached per (model, micro-batch, seq, precision) and per
    compute model, so simulating many plans of one model re-costs nothing."""
    if not isinstance(plan, Plan):
        raise MeshplanError(f"simulate needs a planner.Plan, got {shown(plan)}")
    plan.check()
    for value, kind, name in ((compute, ComputeModel, "compute"), (comm, CommModel, "comm"),
                              (execution, Execution, "execution")):
        if value is not None and not isinstance(value, kind):
            raise MeshplanError(f"{name} must be a {kind.__name__} or None, got {shown(value)}")
    spec, cluster = load_model(model), parse_cluster(cluster)
    check_expert_parallel(plan, spec.config, moe_imbalance)
    engine = get_engine(plan.engine)
    if execution is None:
        engine.check(plan)
        execution = engine.execution_for(plan.engine_options, plan.zero)
        if spec.config is not None:
            check_runnable(plan, spec.config, engine.micro_batch_per_stage)
    elif spec.config is not None and execution == MESHPLAN_RUNTIME:
        check_runnable(plan, spec.config)
    context.check_context_parallel(plan, spec.config, execution.attention)
    sim = prepare_unchecked(plan, spec, cluster, compute, comm, execution, moe_imbalance)
    if spec.config is None and execution == MESHPLAN_RUNTIME:   # what meshplan's runtime applies to a factory
        check_factory_plan(plan, sim.traced, spec.name)
    return sim


def check_expert_parallel(plan: Plan, config, moe_imbalance: float = 1.0) -> None:
    """ep only on an MoE model whose experts it divides; the imbalance a finite number >= 1."""
    finite_number(moe_imbalance, "the MoE load imbalance (--moe-imbalance)", low=1)
    experts = getattr(config, "experts", 0) if config is not None else 0
    if experts:
        check_tensor_parallel(plan.tp)
    if plan.ep == 1:
        return
    if not experts:
        raise MeshplanError(f"ep {plan.ep} needs a Mixture-of-Experts model (arch moe); this model has no "
                            f"experts: use ep 1")
    if experts % plan.ep:
        raise MeshplanError(f"ep {plan.ep} does not divide the model's {experts} experts: use an ep that divides "
                            f"{experts} (and dp {plan.dp})")


def prepare_unchecked(plan: Plan, model, cluster, compute: ComputeModel | None = None,
                      comm: CommModel | None = None, execution: Execution = MESHPLAN_RUNTIME,
                      moe_imbalance: float = 1.0) -> "_Simulation":
    """prepare() for the search, whose candidates are Plans it built runnable."""
    spec, cluster = with_engine_kernels(load_model(model), execution), parse_cluster(cluster)
    if plan.seq > (spec.config.max_seq if spec.config else plan.seq):
        raise MeshplanError(f"seq {plan.seq} exceeds the model's max_seq {spec.config.max_seq}")
    if "attention" in plan.checkpoint and not traces_attention_core():
        raise MeshplanError(f"checkpoint mode 'attention' needs torch.fx.traceback.annotate, which torch "
                            f"{torch.__version__} lacks: use selective or full, or torch >= 2.10")
    check_fp8_gpu(cluster.gpu, plan.precision)
    # fp8 traces as bf16 (planner.trace): only the block linears' GEMMs differ, priced by the coster;
    # one context-parallel rank's tokens (planner.simulate.context re-prices the attention)
    traced = trace_cached(model_key(spec), plan.micro_batch, plan.local_seq, compute_precision(plan.precision),
                          execution.cast or plan.cast)
    # a TP group across nodes is slow but legal: price it (the planner keeps tp in a node)
    if not traced.blocks and plan.virtual_stages > 1:
        raise MeshplanError(f"{spec.name} has no repeated blocks to cut into pipeline stages: use pp 1")
    plan.check_fits(len(traced.blocks) or None, cluster.world_size)
    compute = compute or ComputeModel(cluster.gpu)
    comm = comm or CommModel(cluster)
    coster = _coster_cached(traced, compute, spec.config.hidden if spec.config else None,
                            getattr(spec.config, "experts", 0) if spec.config else 0, Float8.of(plan, execution),
                            spec.config.kv_heads if spec.config else None)
    return _Simulation(plan, traced, cluster, compute, comm, coster, execution, spec.config, moe_imbalance)


_COSTERS: dict = {}


def _coster_cached(traced: TracedModel, compute: ComputeModel, hidden, experts: int = 0,
                   fp8: Float8 | None = None, kv_heads: int | None = None) -> LayerCoster:
    key = (id(traced), id(compute), hidden, experts, fp8, kv_heads)
    entry = _COSTERS.get(key)
    if entry is None or entry[0] is not traced or entry[1] is not compute:
        if len(_COSTERS) > 256:
            _COSTERS.clear()
        entry = _COSTERS[key] = (traced, compute, LayerCoster(traced, compute, hidden, experts, fp8, kv_heads))
    return entry[2]


# SimResult.phases: the slowest pipeline rank's step split into parts that add up to the
# step time (recompute_s is the part of compute_s spent recomputing), in words for people.
PHASE_WORDS = {"compute_s": "compute", "recompute_s": "recomputation",
               "exposed_tp_comm_s": "exposed tensor-parallel communication",
               "exposed_ep_comm_s": "expert-parallel all-to-all",
               "exposed_cp_comm_s": "context-parallel KV exchange",
               "exposed_dp_comm_s": "exposed data-parallel communication",
               "pipeline_bubble_s": "pipeline bubble", "optimizer_s": "optimizer step"}


def with_engine_kernels(spec: ModelSpec, execution: Execution) -> ModelSpec:
    """The model as the engine runs it: its core-attention kernel when the engine fixes one
    (Execution.attention; Megatron-LM of 2021 ran only the unfused one)."""
    if execution.attention is None or spec.config is None or spec.config.attention == execution.attention:
        return spec
    return ModelSpec(spec.name, replace(spec.config, attention=execution.attention))


class _Simulation(CommMixin, MemoryMixin):
    """One plan on one cluster, ready to `run()`; the planner reads its per-layer costs too."""

    def __init__(self, plan, traced, cluster, compute, comm, coster, execution=MESHPLAN_RUNTIME, config=None,
                 moe_imbalance: float = 1.0):
        self.execution = execution
        # the busiest expert-parallel rank's load over the average (1 without expert parallelism)
        self.moe_imbalance = float(moe_imbalance) if plan.ep > 1 else 1.0
        # an empty tp_layout is Megatron's, with the embedding and head replicated where tp does
        # not divide the vocabulary, as the runtime does it (runtime.parallelize.megatron_layout)
        self.tp_layout = plan.tp_layout or (top_level_layout(config, plan) if config and plan.tp > 1 else {})
        # a tied embedding's parameters, split over TP when the token embedding is
        self.tied_params = config.vocab * config.hidden if config and config.tie_embeddings else 0
        self.tied_split = plan.tp if plan.tp > 1 and self.tp_layout.get("tok", "vocab") == "vocab" else 1
        self._untied_heads = {}   # layer index -> the head's timing less the tied weight
        self.plan, self.traced, self.cluster = plan, traced, cluster
        self.compute, self.comm, self.coster = compute, comm, coster
        degrees = {"pp": plan.pp, "dp": plan.dp, "cp": plan.cp, "tp": plan.tp}
        order = tuple(plan.rank_order)
        self.tp_group = comm.group(degrees, "tp", order)
        self.cp_group = comm.group(degrees, "cp", order)
        # gradients are reduced, and ZeRO shards, over the dp x cp ranks (each cp rank holds
        # the stage's parameters; torchtitan: FSDP over dp_shard x cp)
        self.data_ranks = plan.dp * plan.cp
        self.dp_group = comm.group(degrees, ("dp", "cp") if plan.cp > 1 else "dp", order)
        # expert parallelism splits dp into edp x ep, ep innermost (consecutive dp ranks, planner.plan)
        expert_degrees = {"pp": plan.pp, "edp": plan.edp, "ep": plan.ep, "tp": plan.tp}
        expert_order = tuple(d for dim in order for d in (("edp", "ep") if dim == "dp" else (dim,)))
        self.ep_group = comm.group(expert_degrees, "ep", expert_order)
        self.edp_group = comm.group(expert_degrees, "edp", expert_order)
        self.pp_cross_node = comm.group(degrees, "pp", order).crosses_nodes
        self.act_bytes = DTYPE_BYTES[traced.precision]
        # DDP all-reduces each .grad in its parameter's dtype: fp32 for our runtime's
        # fp32 parameters under autocast, 16-bit where the parameters themselves are
        # (Megatron-LM's fp16 training); FSDP2 reduces in fp32 (charged in fsdp_exposed)
        self.grad_dtype_bytes = self.act_bytes if traced.cast == "params" else 4
        # FSDP2's flags as the runtime drives them (planner.simulate.fsdp), and each virtual stage's
        # gathers and reductions under the plan's schedule
        self.fsdp_drive = fsdp.drive(plan.zero, plan.pp > 1, self.data_ranks, execution.replicate_copies_params)
        # FSDP2 gathers the float8 linears' weights in float8 (planner.fp8)
        self.float8_gather = fsdp_float8_all_gather(plan, execution)
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
        compiled = self.plan.compile and self.traced.layers[index].kind == "block"   # per block, as torchtitan
        timing = self.coster.timing(index, self.plan.tp, self.plan.sequence_parallel, self.tp_layout, extra,
                                    self.execution.megatron_kernels, self.plan.ep, self.moe_imbalance, compiled,
                                    self.plan.cp)
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
        ep_fwd, ep_bwd = self.ep_comm_s(t.ep_comm_fwd), self.ep_comm_s(t.ep_comm_bwd)
        if mode == "full":   # the recomputed forward dispatches and combines again
            ep_bwd += ep_fwd
        cp_fwd, cp_bwd = self.cp_comm_s(t)
        recompute = t.recompute_s(mode)
        return LayerTimes(t.fwd_s + tp_fwd + ep_fwd + cp_fwd, t.bwd_s + recompute + tp_bwd + ep_bwd + cp_bwd,
                          recompute, tp_fwd + tp_bwd, 0.0, ep_fwd + ep_bwd, cp_fwd + cp_bwd)

    def run(self) -> SimResult:
        plan = self.plan
        stages = self.stage_layers()
        fwd, bwd, parts, stage_params, stage_experts, exposure = [], [], [], [], [], []
        batch_s = self.execution.batch_host_ops * self.compute.host_s_per_op
        for v, layers in enumerate(stages):
            base = [self.base_layer_times(i) for i in layers]
            parts.append(LayerTimes(*(sum(t[k] for t in base) for k in range(len(LayerTimes._fields)))))
            exposures = [self.fsdp_exposure(i, b) for i, b in zip(layers, base)] if self.fsdp_traffic(v) else []
            exposure.append(FsdpExposure(*(sum(e[k] for e in exposures) for k in range(len(FsdpExposure._fields)))))
            stage_params.append(sum(self.timing(i).params_per_gpu for i in layers))
            stage_experts.append(sum(self.timing(i).expert_params_per_gpu for i in layers))
            fwd.append(batch_s + parts[-1].fwd_s)
            bwd.append(parts[-1].bwd_s + self.grad_accumulation_s(stage_params[-1], stage_experts[-1]))
        boundary = max((self.timing(s[-1]).boundary_bytes for s in stages if s), default=0.0)
        extra = self.fsdp_extra_s(exposure)
        timeline = simulate_pipeline(self.actions, fwd, bwd, self.p2p_s(boundary), self.execution.blocking_p2p, extra)
        tails, dp_exposed, optimizer, fsdp_exposed = [], [], [], []
        for rank in range(plan.pp):
            params = sum(stage_params[c * plan.pp + rank] for c in range(plan.interleave))
            expert = sum(stage_experts[c * plan.pp + rank] for c in range(plan.interleave))
            last_bwd = sum(bwd[c * plan.pp + rank] for c in range(plan.interleave))
            fsdp_exposed.append(sum(s for (_, _, stage), s in extra.items() if stage % plan.pp == rank))
            dp_exposed.append(self.dp_tail_s(params, last_bwd, expert) + self.fsdp_tail_s(rank, stages, timeline)
                              + self.tied_grad_s(rank)
                              + self.comm.all_reduce_s(self.norm_grad_bytes(rank, stages), self.tp_group))
            mine = [i for c in range(plan.interleave) for i in stages[c * plan.pp + rank]]
            optimizer.append(self.optimizer_s(params, expert, sum(self.timing(i).fp8_params_per_gpu for i in mine),
                                              sum(self.timing(i).fp8_linears for i in mine)))
            tails.append(timeline.finish_s[rank] + dp_exposed[-1] + optimizer[-1])
        step = max(tails)
        slowest = tails.index(step)
        memory = [self.stage_memory(rank, stages) for rank in range(plan.pp)]
        result = self.result(step, timeline, slowest, dp_exposed, optimizer, parts, memory, fsdp_exposed[slowest])
        result.comm_bytes = [self.comm_bytes(rank, stages) for rank in range(plan.pp)]
        result.rank_tails_s = list(zip(dp_exposed, optimizer))
        return result

    def grad_accumulation_s(self, params: float, expert: float = 0.0) -> float:
        """Per backward: adding a micro-batch's weight gradients into the ones accumulated so far
        (autograd's AccumulateGrad, Megatron's main_grad.add_: read both, write the sum, in the
        gradients' dtype). Every micro-batch but the first adds; spread evenly over them.
        FSDP2 adds in fp32 (its reduce dtype): each micro-batch's reduce-scattered 1/dp shard
        (ZeRO 2/3 without a pipeline), else the whole unsharded gradient it keeps."""
        n = self.plan.grad_accum
        if n <= 1 or not params:
            return 0.0
        if self.fsdp_drive is not None and self.plan.zero >= 1:
            added_bytes = 3 * 4 * (params if self.holds_unsharded else self.sharded_params(params, expert))
        else:
            added_bytes = 3 * params * self.grad_dtype_bytes
        return (n - 1) / n * self.compute.memory_bound_time_s(added_bytes)

    def sharded_params(self, params: float, expert: float = 0.0) -> float:
        """One rank's ZeRO shard of `params` (of which `expert` are routed experts' parameters,
        already 1/ep of the experts): the rest over dp, the experts over the dp/ep ranks holding
        the same slice (edp), as torchtitan's apply_fsdp shards them."""
        return (params - expert) / self.data_ranks + expert * self.plan.ep / self.plan.dp

    def optimizer_s(self, params: float, expert: float = 0.0, fp8_params: float = 0.0, fp8_linears: int = 0) -> float:
        """The optimizer step of a rank's `params`; with the FSDP2 float8 all-gather, the amax
        all-reduce after it (planner.simulate.fp8.precompute_scales_s) over its `fp8_params`."""
        local = self.sharded_params(params, expert) if self.plan.zero >= 1 else params
        if self.plan.offload_optimizer:
            step = self.compute.offloaded_optimizer_step_time_s(local)
        else:
            step = self.compute.optimizer_step_time_s(local)
        if self.float8_gather:
            step += precompute_scales_s(self.compute, self.comm, fp8_params / self.data_ranks, fp8_linears,
                                        self.dp_group)
        return step

    def flop_counter_flops(self) -> tuple[float, float]:
        """(FLOPs of one micro-batch, forward and backward, in FlopCounterMode's convention;
        the attention core's part of them) as traced: at seq / cp tokens under context
        parallelism (planner.simulate.context.full_sequence_flops scales them back)."""
        fwd, bwd = self.traced.flop_counter_flops()
        core = sum(self._core_flops(self.traced.layers[i].signature)[1] for i in range(len(self.traced.layers)))
        return fwd + bwd, core

    def core_fwd_flops(self, index: int) -> float:
        """The attention core's forward FLOPs of layer `index` (0 without cp: not needed)."""
        return self._core_flops(self.traced.layers[index].signature)[0] if self.plan.cp > 1 else 0.0

    def _core_flops(self, signature: str) -> tuple[float, float]:
        """(forward, forward + backward in FlopCounterMode's convention) of a layer's attention core."""
        cache = self.__dict__.setdefault("_core", {})
        if signature not in cache:
            ops = context.core_ops(self.traced.costs[signature].ops)
            fwd = float(sum(op.fwd_flops for op in ops))
            bwd = sum(op.bwd_flops * (FLOP_COUNTER_ATTENTION_BWD_FACTOR / ATTENTION_BWD_FACTOR
                                      if op.kind == "attention" else 1.0) for op in ops)
            cache[signature] = (fwd, fwd + bwd)
        return cache[signature]

    # -- result --------------------------------------------------------------------------
    def result(self, step, timeline, slowest, dp_exposed, optimizer, parts, memory, fsdp_exposed_s) -> SimResult:
        plan, cluster = self.plan, self.cluster
        tokens = plan.global_batch * plan.seq
        per_micro_batch, core = self.flop_counter_flops()
        micro_batches = plan.global_batch / plan.micro_batch
        model_flops = context.full_sequence_flops(per_micro_batch, core, plan.cp) * micro_batches
        recompute_flops = micro_batches * sum(
            context.full_sequence_flops(self.traced.cost_of(i).recompute_fwd_flops(self.checkpoint_mode(i)),
                                        self.core_fwd_flops(i), plan.cp) for i in self.traced.blocks)
        # the core's share the causal mask leaves out: 1 - (S + 1) / 2S of the S x S pairs
        masked_flops = micro_batches * plan.cp ** 2 * core * (plan.seq - 1) / (2 * plan.seq)
        world = cluster.world_size
        # MFU against the 16-bit peak under fp8 too, as torchtitan reports it (its get_peak_flops
        # is the bf16 one): the same model FLOPs per second read the same whatever the precision
        peak = cluster.gpu.peak_flops_for(compute_precision(plan.precision))
        capacity = cluster.gpu.memory_bytes - CUDA_CONTEXT_BYTES
        # the slowest rank's step, phase by phase: every micro-batch passes each of its
        # virtual stages once forward and once backward
        mine = [parts[c * plan.pp + slowest] for c in range(plan.interleave)]
        per_step = {name: plan.grad_accum * sum(getattr(p, name) for p in mine) for name in LayerTimes._fields}
        phases = {
            "compute_s": timeline.busy_s[slowest] - per_step["tp_comm_s"] - per_step["ep_comm_s"]
            - per_step["cp_comm_s"] - fsdp_exposed_s,
            "recompute_s": per_step["recompute_s"],   # part of compute_s
            "exposed_tp_comm_s": per_step["tp_comm_s"],
            # an MoE model's plans all report it (0 without ep), so any two of them compare phase by phase
            **({"exposed_ep_comm_s": per_step["ep_comm_s"]} if self.coster.experts else {}),
            **({"exposed_cp_comm_s": per_step["cp_comm_s"]} if plan.cp > 1 else {}),
            "exposed_dp_comm_s": fsdp_exposed_s + dp_exposed[slowest],
            "pipeline_bubble_s": timeline.bubble_s(slowest),
            "optimizer_s": optimizer[slowest],
        }
        fits = all(m.peak_reserved_bytes <= capacity and m.host_bytes <= cluster.host_memory_bytes_per_gpu
                   for m in memory)
        return SimResult(step, tokens / step, model_flops / step / world / 1e12,
                         model_flops / step / world / peak, (model_flops + recompute_flops) / step / world / peak,
                         fits, capacity, phases, memory, timeline,
                         mfu_causal=(model_flops - masked_flops) / step / world / peak)

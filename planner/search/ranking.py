"""plan(): search data/tensor/pipeline/ZeRO/checkpoint/micro-batch plans and rank them.

The search, in order of cost:
1. Families: every dp x tp x pp that multiplies to the cluster size, tp inside a node
   (unless allowed across nodes) and dividing the model's heads and widths, pp at most
   the model's blocks, dp dividing the global batch; then, for a Mixture-of-Experts model,
   every expert-parallel degree ep dividing dp and the experts (tp 1; ep folded into dp,
   planner.plan); then ZeRO 0-3 (ZeRO-1 is Megatron's
   distributed optimizer on FSDP2, with any tp and pp), CPU optimizer offload (ZeRO 2/3),
   every micro-batch size dividing a rank's share of the batch, sequence parallelism with tp,
   schedules (1F1B, interleaved with v chunks; GPipe has 1F1B's bubble and more
   activations in flight, so it is pruned as dominated unless pinned) and precision.
   Pinned dimensions take one value (planner.search.space enumerates them). A file.py:factory
   model's blocks are counted from its trace, and it gets tp where the TP-layout ILP splits
   a block linear (planner.search.factory). A candidate the model cannot take is skipped
   with its reason, never fatal; when nothing is left, one line says why.
2. Memory prune: a family whose model states alone (parameters, gradients, optimizer
   state of an even share of the model) overflow the budget is dropped with its size.
3. Bound: each candidate's lower bound is its busiest rank's compute with no bubble,
   no recomputation and no communication; candidates are visited by that bound and the
   walk stops when the bound passes the k-th best estimate (plus the estimate's margin).
4. Stage partition + checkpointing per candidate: `planner.search.partition` (exact
   bottleneck search under per-rank memory budgets), giving an estimated step time.
5. The best estimates are simulated (`planner.simulate`, the event simulation of the
   schedule); a plan whose simulated peak exceeds the budget gets that rank's budget
   tightened by the excess and is partitioned again (up to `REFIT_ROUNDS` times).
Plans are ranked by simulated step time. Every number a plan reports is `simulate()`'s.

Memory budget: simulate()'s capacity (device memory minus the CUDA context) minus
`reserve_bytes` (default `MEMORY_RESERVE_FRACTION` of the device memory). No returned
plan's predicted peak reserved memory exceeds it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from cost_models.cluster import parse_cluster
from cost_models.comm import CommModel
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.inputs import (MAX_GLOBAL_BATCH, MAX_GPUS, MAX_LAYERS, MAX_SEQ, check_tokens_per_step, finite_number,
                                shown, whole_number)
from cost_models.units import GIB
from planner.engines import DEFAULT_ENGINE, get_engine
from planner.fp8 import check_gpu as check_fp8_gpu
from planner.plan import CHECKPOINT_MODES, FP8_RECIPES, PRECISIONS, SCHEDULES, Plan, degree_words
from planner.search.diagnosis import Diagnosis
from planner.search.factory import FactorySearch
from planner.search.partition import StageCosts, partition
from planner.search.space import SearchSpace, check_context_pins, check_expert_pins
from planner.search.tp_ilp import layouts_for
from planner.simulate import ALLOCATOR_RESERVED_RATIO, CUDA_CONTEXT_BYTES, prepare_unchecked
from planner.simulate.costing import top_level_layout
from planner.simulate.schedule import in_flight_counts
from planner.torch_compat import traces_attention_core
from planner.zoo import load_model

# Safety margin the planner keeps below simulate()'s capacity: the H100 memory MAPE is
# 1.3 % (benchmarks/accuracy.py), the worst case 3.4 %; 3 % of the device is the default.
MEMORY_RESERVE_FRACTION = 0.03
# How far the partition's closed-form estimate may fall below the simulated time before
# a candidate is no longer worth simulating (its median error on the benchmark families
# is a few %; generous, since a missed plan costs more than a simulation).
ESTIMATE_MARGIN = 0.03
MAX_SIMULATIONS = 40
REFIT_ROUNDS = 3
SLACK_FRACTION = 0.005
from planner.plan import PINNABLE  # noqa: E402,F401  (re-exported: planner.search.PINNABLE)


@dataclass
class SearchStats:
    families: int = 0                 # dp x cp x tp x pp
    candidates: int = 0               # full configurations enumerated
    pruned_model_states: int = 0      # model states alone overflow
    pruned_dominated: int = 0         # gpipe (1F1B is as fast with less memory)
    pruned_bound: int = 0             # lower bound above the k-th best estimate
    no_partition: int = 0             # no split and checkpointing fits memory
    skipped: int = 0                  # candidates the model cannot take (planner.search.factory)
    partitioned: int = 0
    simulated: int = 0
    rejected_by_simulation: int = 0   # still over budget after refitting
    tp_ilp_solves: int = 0
    tp_ilp_s: float = 0.0
    trace_s: float = 0.0
    search_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Rejection:
    family: str        # e.g. "tp8 pp4 dp32"
    reason: str        # "model states", "memory", "bound", "slower"
    detail: str
    need_bytes: float = 0.0
    planned: object = None   # the simulated Plan (with .result) of a family that lost on time


class RankedPlans(list):
    """Plans best first; each has `.result` (its SimResult). Search facts ride along."""

    def __init__(self, plans, stats: SearchStats, rejections: list, budget_bytes: float,
                 capacity_bytes: float, reserve_bytes: float):
        super().__init__(plans)
        self.stats, self.rejections = stats, rejections
        self.budget_bytes, self.capacity_bytes, self.reserve_bytes = budget_bytes, capacity_bytes, reserve_bytes


@dataclass
class _Candidate:
    plan: Plan
    lower_bound_s: float
    estimate_s: float = float("inf")
    budgets: list = field(default_factory=list)
    stage_memory_bytes: list = field(default_factory=list)   # the partition's estimate per rank


def plan(model, cluster, global_batch: int, seq: int, precision: str | None = "bf16", top_k: int = 5,
         compute: ComputeModel | None = None, comm: CommModel | None = None,
         reserve_bytes: float | None = None, tp_across_nodes: bool = False, engine: str = DEFAULT_ENGINE,
         engine_options: dict | None = None, moe_imbalance: float = 1.0, **pinned) -> RankedPlans:
    """The `top_k` best plans (each with `.result`), best first.

    Any of PINNABLE may be given to fix that dimension (`precision=None` searches it).
    `engine` (planner.engines) runs the plans: only plans it can run are proposed, priced as
    it runs them (with `engine_options`). `moe_imbalance`: the busiest expert-parallel rank's
    routed tokens over the average (planner.simulate.experts). Raises MeshplanError when nothing fits, naming the
    memory the leanest plan needs and how many GPUs would hold it.
    """
    start = time.perf_counter()
    spec, cluster = load_model(model), parse_cluster(cluster)
    if precision is not None:
        pinned["precision"] = precision
    check_pinned(pinned, top_k, global_batch, seq)
    check_fp8_gpu(cluster.gpu, pinned.get("precision"))
    _check_options(compute, comm, reserve_bytes, tp_across_nodes)
    runner = get_engine(engine)
    options = runner.checked_options(engine_options)
    check_pins_for_engine(pinned, runner)
    check_expert_pins(pinned, spec, cluster, runner, moe_imbalance)
    check_context_pins(pinned, spec, cluster, runner, options)
    search = _Search(spec, cluster, global_batch, seq, compute, comm, reserve_bytes, tp_across_nodes, pinned,
                     runner, options)
    search.moe_imbalance = moe_imbalance
    plans = search.run(top_k)
    search.stats.search_s = time.perf_counter() - start
    return RankedPlans(plans, search.stats, search.rejections, search.budget_bytes,
                       search.capacity_bytes, search.reserve_bytes)


MAX_TOP = 100   # plans ranked and returned (each is simulated in full)


def check_pinned(pinned: dict, top_k: int, global_batch: int, seq: int):
    """Every pin a valid value, and no two pins that no plan can satisfy together (which
    the search would otherwise answer with a misleading "nothing fits")."""
    unknown = sorted(map(str, set(pinned) - set(PINNABLE)))
    if unknown:
        raise MeshplanError(f"cannot pin {unknown}; pinnable: {', '.join(PINNABLE)}")
    whole_number(top_k, "top_k", high=MAX_TOP)
    whole_number(global_batch, "global_batch", high=MAX_GLOBAL_BATCH)
    whole_number(seq, "seq", high=MAX_SEQ)
    check_tokens_per_step(global_batch, seq)
    for name, high in (("dp", MAX_GPUS), ("tp", MAX_GPUS), ("pp", MAX_GPUS), ("cp", MAX_GPUS), ("ep", MAX_GPUS),
                       ("micro_batch", MAX_GLOBAL_BATCH),
                       ("interleave", MAX_LAYERS)):
        if name in pinned:
            whole_number(pinned[name], name, high=high)
    for name in ("sequence_parallel", "offload_optimizer", "compile"):
        if name in pinned and not isinstance(pinned[name], bool):
            raise MeshplanError(f"{name} must be true or false, got {shown(pinned[name])}")
    choices = {"checkpoint": CHECKPOINT_MODES, "schedule": SCHEDULES, "precision": PRECISIONS,
               "fp8_recipe": FP8_RECIPES, "zero": (0, 1, 2, 3)}
    for name, allowed in choices.items():
        value = pinned.get(name)
        if name in pinned and (isinstance(value, bool) or not isinstance(value, (str, int)) or value not in allowed):
            raise MeshplanError(f"{name} {shown(value)} is unknown; use one of {', '.join(map(str, allowed))}")
    _check_pins_agree(pinned, global_batch)
    cp = pinned.get("cp", 1)
    if cp > 1 and seq % (2 * cp):
        raise MeshplanError(f"cp {cp} needs seq divisible by 2 x cp = {2 * cp} (each sequence is cut into 2 x cp "
                            f"load-balanced chunks), got seq {seq}: change --seq or --cp")


def _check_pins_agree(pinned: dict, global_batch: int):
    if "fp8_recipe" in pinned and pinned.get("precision") != "fp8":
        raise MeshplanError(f"fp8_recipe {pinned['fp8_recipe']} applies to precision fp8 only: pin precision fp8 "
                            f"(--precision fp8) or drop it")
    schedule, interleave = pinned.get("schedule"), pinned.get("interleave")
    if interleave is not None and interleave > 1 and schedule not in (None, "interleaved"):
        raise MeshplanError(f"interleave {interleave} needs schedule interleaved, but schedule {schedule} is pinned")
    if schedule == "interleaved" and interleave == 1:
        raise MeshplanError("the interleaved schedule needs interleave >= 2 model chunks per stage")
    if schedule == "interleaved" and pinned.get("pp") == 1:
        raise MeshplanError("the interleaved schedule needs pp >= 2: use schedule 1f1b or raise pp")
    if pinned.get("sequence_parallel") and pinned.get("tp") == 1:
        raise MeshplanError("sequence_parallel needs tp >= 2: pin tp >= 2 or drop sequence_parallel")
    if pinned.get("offload_optimizer") and pinned.get("zero", 3) < 2:
        raise MeshplanError("offload_optimizer runs through FSDP2's CPUOffloadPolicy: pin zero 2 or 3")
    per_step = pinned.get("dp", 1) * pinned.get("micro_batch", 1)
    if global_batch % per_step:
        raise MeshplanError(f"global_batch {global_batch} is not a multiple of the pinned micro_batch x dp = "
                            f"{per_step}: change global_batch, micro_batch or dp")


def check_pins_for_engine(pinned: dict, engine) -> None:
    """A pinned value the engine does not offer, refused in one line before any search."""
    offered = {"zero": engine.zero, "schedule": engine.schedules, "precision": engine.precisions,
               "checkpoint": ("none", *engine.recompute)}
    for name, values in offered.items():
        if name in pinned and pinned[name] not in values:
            raise MeshplanError(f"{engine.name} offers {name} {', '.join(map(str, values))}, not {pinned[name]}: "
                                f"change --{name} or --engine")
    if pinned.get("precision") == "fp8" and pinned.get("fp8_recipe", "tensorwise") not in engine.fp8_recipes:
        raise MeshplanError(f"{engine.name} runs fp8 with the {', '.join(engine.fp8_recipes)} recipe, not "
                            f"{pinned.get('fp8_recipe', 'tensorwise')}: change --fp8-recipe or --engine")
    for name in ("sequence_parallel", "offload_optimizer"):
        if pinned.get(name) and not getattr(engine, name):
            raise MeshplanError(f"{engine.name} has no {name.replace('_', ' ')}: drop --{name.replace('_', '-')} "
                                f"or change --engine")
    if pinned.get("compile") and engine.compile_refusal:
        raise MeshplanError(f"{engine.name} does not compile each block ({engine.compile_refusal}): drop --compile "
                            f"or change --engine")


def _check_options(compute, comm, reserve_bytes, tp_across_nodes):
    for value, kind, name in ((compute, ComputeModel, "compute"), (comm, CommModel, "comm")):
        if value is not None and not isinstance(value, kind):
            raise MeshplanError(f"{name} must be a {kind.__name__} or None, got {shown(value)}")
    if reserve_bytes is not None:
        finite_number(reserve_bytes, "the memory reserve (--reserve)", low=0)
    if not isinstance(tp_across_nodes, bool):
        raise MeshplanError(f"tp_across_nodes must be true or false, got {shown(tp_across_nodes)}")


class _Search(SearchSpace, FactorySearch, Diagnosis):
    moe_imbalance = 1.0   # the busiest expert-parallel rank's routed tokens over the average (plan())

    def __init__(self, spec, cluster, global_batch, seq, compute, comm, reserve_bytes, tp_across_nodes, pinned,
                 engine=None, engine_options=None):
        self.spec, self.cluster = spec, cluster
        self.engine, self.engine_options = engine or get_engine(DEFAULT_ENGINE), engine_options or {}
        self.global_batch, self.seq, self.pinned = global_batch, seq, pinned
        self.tp_across_nodes = tp_across_nodes
        self.compute = compute or ComputeModel(cluster.gpu)
        self.comm = comm or CommModel(cluster)
        self.stats = SearchStats()
        self.rejections: list[Rejection] = []
        self.capacity_bytes = cluster.gpu.memory_bytes - CUDA_CONTEXT_BYTES
        self.reserve_bytes = (MEMORY_RESERVE_FRACTION * cluster.gpu.memory_bytes
                              if reserve_bytes is None else float(reserve_bytes))
        self.budget_bytes = self.capacity_bytes - self.reserve_bytes
        if self.budget_bytes <= 0:
            raise MeshplanError(f"the memory reserve ({self.reserve_bytes / GIB:.1f} GiB) leaves nothing of "
                                f"{cluster.gpu.display_name}'s {self.capacity_bytes / GIB:.1f} GiB: lower --reserve")
        self._sims = {}
        self._layouts = {}
        if spec.config is None and pinned.get("sequence_parallel"):
            raise MeshplanError(f"sequence_parallel needs a preset or JSON model: the runtime cannot shard "
                                f"{spec.name}'s sequence dimension; drop --sequence-parallel")

    # -- pricing -------------------------------------------------------------------------------
    def simulation(self, plan: Plan):
        started = time.perf_counter()
        sim = prepare_unchecked(plan, self.spec, self.cluster, self.compute, self.comm, self.execution(plan),
                                self.moe_imbalance)
        traced = (plan.micro_batch, plan.precision, plan.local_seq)
        self.stats.trace_s += time.perf_counter() - started if traced not in self._sims else 0
        self._sims[traced] = True
        return sim

    def recompute_modes(self, plan=None) -> tuple:
        """The engine's recompute modes this torch can trace (the attention core needs
        torch.fx.traceback.annotate: planner.torch_compat.traces_attention_core)."""
        offered = self.engine.recompute_for(plan) if plan is not None else self.engine.recompute
        return tuple(m for m in offered if m != "attention" or traces_attention_core())

    def execution(self, plan: Plan):
        """How the engine runs the candidate (its options; DeepSpeed's depend on the ZeRO stage)."""
        return self.engine.execution_for(self.engine_options, plan.zero)

    def checkpointed_need_bytes(self, plan: Plan) -> float:
        """Peak reserved bytes (partition model) of the candidate with every block fully checkpointed."""
        sim = self.simulation(plan)
        costs = StageCosts(sim, in_flight_counts(plan.schedule, plan.pp, plan.grad_accum, plan.interleave))
        split = partition(costs, float("inf"), "full")
        return max(split.stage_memory_bytes) * ALLOCATOR_RESERVED_RATIO

    def lower_bound_s(self, sim) -> float:
        """No run of the plan is faster, whatever its split and recomputation.

        With T the compute of one micro-batch through every layer, m micro-batches and
        stage times t_0..t_{pp-1} (sum T), rank k cannot start before the first
        micro-batch's forward has crossed the stages before it, works m t_k, and after
        its last backward the stages before it still run theirs: the step takes at least
        max_k (m t_k + t_0 + ... + t_{k-1}). The split minimising that makes the terms
        equal (t_{k+1} = t_k (1 - 1/m)), which gives T / (1 - (1 - 1/m)^pp) for 1F1B and
        GPipe; the interleaved schedule's even split gives (m + (pp - 1) / v) T / pp."""
        plan = sim.plan
        counts = {}
        for layer in sim.traced.layers:
            first, n = counts.get(layer.signature, (layer.index, 0))
            counts[layer.signature] = (first, n + 1)
        total = sum(n * sum(sim.layer_times(first, "none")[:2]) for first, n in counts.values())
        m, pp = plan.grad_accum, plan.pp
        if plan.interleave > 1:
            return (m + (pp - 1) / plan.interleave) * total / pp
        return total / (1 - (1 - 1 / m) ** pp)

    def estimate(self, cand: _Candidate):
        """Partition + checkpoint the candidate; its estimated step time (inf: nothing fits)."""
        plan = cand.plan
        sim = self.simulation(plan)
        costs = StageCosts(sim, in_flight_counts(plan.schedule, plan.pp, plan.grad_accum, plan.interleave),
                           self.recompute_modes(plan))
        pinned = self.pinned.get("checkpoint")
        budgets = cand.budgets or [self.budget_bytes / ALLOCATOR_RESERVED_RATIO] * plan.pp
        cand.budgets = budgets
        split = partition(costs, budgets, pinned)
        if split is None:
            return None
        cand.plan = replace(plan, stages=split.stages, checkpoint=split.checkpoint)
        cand.stage_memory_bytes = split.stage_memory_bytes
        m, v = plan.grad_accum, plan.interleave
        bottleneck = split.bottleneck_s
        bubble = (plan.pp - 1) * bottleneck / v
        params = max(sum(sim.timing(i).params_per_gpu for i in sim.traced.blocks) / plan.pp, 1.0)
        cand.estimate_s = m * bottleneck + bubble + sim.optimizer_s(params) + sim.dp_tail_s(params, bottleneck)
        return split

    # -- the walk ------------------------------------------------------------------------------
    def run(self, top_k: int) -> list[Plan]:
        families = self.families()
        self.stats.families = len(families)
        pool = []
        for dp, cp, tp, pp in families:
            for p in self.candidates(dp, cp, tp, pp):
                self.stats.candidates += 1
                if tp > 1 and self.spec.config is None:
                    p = self.factory_layout(p)
                    if p is None:
                        continue
                floor = self.states_floor_bytes(p)
                host = self.host_floor_bytes(p)
                if host > self.cluster.host_memory_bytes_per_gpu:
                    self.stats.pruned_model_states += 1
                    self._reject(p, "model states", f"offloaded states need {host / GIB:.0f} GiB of CPU memory per "
                                 f"GPU > {self.cluster.host_memory_bytes_per_gpu / GIB:.0f} GiB")
                    continue
                if floor > self.budget_bytes:
                    self.stats.pruned_model_states += 1
                    self._reject(p, "model states", f"model states alone need {floor / GIB:.1f} GiB per GPU "
                                 f"> {self.budget_bytes / GIB:.1f} GiB budget", floor)
                    continue
                pool.append(p)
        bounded = []
        for p in pool:
            try:
                bounded.append(_Candidate(p, self.lower_bound_s(self.simulation(p))))
            except MeshplanError as exc:   # e.g. a factory that cannot take this micro-batch
                self.skip(p, str(exc))
        if not bounded:
            raise MeshplanError(self.nothing_left() or self.nothing_fits())
        bounded.sort(key=lambda c: c.lower_bound_s)
        estimated = self._estimate_all(bounded, top_k)
        plans = self._simulate_best(estimated, top_k)
        if not plans:
            raise MeshplanError(self.nothing_fits())
        return plans

    def _estimate_all(self, bounded: list[_Candidate], top_k: int) -> list[_Candidate]:
        done = []
        kth = float("inf")
        for i, cand in enumerate(bounded):
            if cand.lower_bound_s > kth * (1 + ESTIMATE_MARGIN):
                self.stats.pruned_bound += len(bounded) - i
                for rest in bounded[i:]:
                    self._reject(rest.plan, "bound", f"even perfectly split its compute and pipeline fill take "
                                 f"{rest.lower_bound_s:.3g} s > {kth:.3g} s")
                break
            split = self.estimate(cand)
            if split is None:
                self.stats.no_partition += 1
                need = self.checkpointed_need_bytes(cand.plan)
                self._reject(cand.plan, "memory", f"needs {need / GIB:.1f} GiB per GPU even with every block fully "
                             f"checkpointed: {(need - self.budget_bytes) / GIB:.1f} GiB over the budget", need)
                continue
            self.stats.partitioned += 1
            done.append(cand)
            best = sorted(c.estimate_s for c in done)
            kth = best[min(top_k, len(best)) - 1]
        return sorted(done, key=lambda c: c.estimate_s)

    def _simulate_best(self, estimated: list[_Candidate], top_k: int) -> list[Plan]:
        ranked = []
        for cand in estimated:
            kth = sorted(p.result.step_time_s for p in ranked)[top_k - 1] if len(ranked) >= top_k else float("inf")
            if cand.estimate_s > kth * (1 + ESTIMATE_MARGIN) or self.stats.simulated >= MAX_SIMULATIONS:
                self._reject(cand.plan, "slower", f"estimated {cand.estimate_s:.3g} s per step")
                continue
            plan = self._fit(cand)
            if plan is not None:
                ranked.append(plan)
        ranked.sort(key=lambda p: p.result.step_time_s)
        for p in ranked[top_k:]:
            self._reject(p, "slower", f"simulated {p.result.step_time_s:.3g} s per step", result=p)
        return ranked[:top_k]

    def _fit(self, cand: _Candidate) -> Plan | None:
        """Simulate; move each rank's budget by the simulated excess (or slack) and re-partition.

        The partition's memory model is close to simulate()'s but not equal: a rank over the
        budget gets its budget tightened by the excess; a fitting plan that recomputes with
        memory to spare gets one round with the slack given back, kept if it still fits."""
        best = None
        for _ in range(REFIT_ROUNDS + 1):
            plan = self._with_layout(cand.plan)
            result = prepare_unchecked(plan, self.spec, self.cluster, self.compute, self.comm,
                                       self.execution(plan), self.moe_imbalance).run()
            self.stats.simulated += 1
            over = [s.peak_reserved_bytes - self.budget_bytes for s in result.stages]
            if max(over) <= 0 and result.fits:
                improved = best is None or result.step_time_s < best.result.step_time_s
                if improved:
                    plan.result, best = result, plan
                if not improved or not self._has_slack(plan, over):
                    return best
            # in the partition's own units: its estimate of this split, moved by what simulate found
            cand.budgets = [m - o / ALLOCATOR_RESERVED_RATIO - (1 << 20)
                            for m, o in zip(cand.stage_memory_bytes, over)]
            cand.plan = replace(cand.plan, stages=[], checkpoint=[])
            if self.estimate(cand) is None:
                break
        if best is not None:
            return best
        self.stats.rejected_by_simulation += 1
        self._reject(cand.plan, "memory", f"simulated peak {max(s.peak_reserved_bytes for s in result.stages) / GIB:.1f}"
                     f" GiB > {self.budget_bytes / GIB:.1f} GiB budget after {REFIT_ROUNDS} refits")
        return None

    def _has_slack(self, plan: Plan, over: list) -> bool:
        """Recomputes while some rank has more than SLACK_FRACTION of the budget to spare."""
        recomputes = any(m != "none" for m in plan.checkpoint)
        return recomputes and "checkpoint" not in self.pinned and min(over) < -SLACK_FRACTION * self.budget_bytes

    def _with_layout(self, plan: Plan) -> Plan:
        """The plan with the TP-layout ILP's layout (solved once per block signature and
        (micro-batch, precision, tp, sp)); embedding and head vocabulary-parallel."""
        if plan.tp == 1 or self.spec.config is None or not self.engine.searched_tp_layout:
            # a factory's layout: planner.search.factory, before the walk
            return replace(plan)
        key = (plan.micro_batch, plan.precision, plan.tp, plan.sequence_parallel)
        if key not in self._layouts:
            sim = self.simulation(plan)
            started = time.perf_counter()
            blocks = layouts_for(sim.traced, self.compute, self.comm, sim.tp_group,
                                 sequence_parallel=plan.sequence_parallel)
            self.stats.tp_ilp_s += time.perf_counter() - started
            self.stats.tp_ilp_solves += blocks.solves
            self._layouts[key] = {**blocks.plan_layout(), **top_level_layout(self.spec.config, plan)}
        return replace(plan, tp_layout=dict(self._layouts[key]))

    # -- reporting -------------------------------------------------------------------------------
    def _reject(self, plan: Plan, reason: str, detail: str, need_bytes: float = 0.0, result=None):
        self.rejections.append(Rejection(describe_family(plan), reason, detail, need_bytes, result))

    def skip(self, plan: Plan, detail: str):
        """A candidate the model cannot take: counted and kept as a rejection, never raised."""
        self.stats.skipped += 1
        self._reject(plan, "cannot take", detail)

    def nothing_left(self) -> str | None:
        """One line when every candidate was skipped as one the model cannot take (None if
        some were dropped for memory, which `nothing_fits` explains)."""
        if not self.stats.candidates:
            pins = ", ".join(f"{k}={v}" for k, v in self.pinned.items() if k != "precision")
            return (f"no candidate plan of {self.spec.name} on {self.cluster.name} takes the pins ({pins}): "
                    f"{self.model_cannot_take_summary()}drop or change a pin")
        if self.stats.skipped < self.stats.candidates:
            return None
        reasons = list(dict.fromkeys(r.detail for r in self.rejections if r.reason == "cannot take"))
        shown_reasons = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        return (f"no plan of {self.spec.name} on {self.cluster.name}: {self.model_cannot_take_summary()}"
                f"every one of the {self.stats.candidates} candidates is one the model cannot take ({shown_reasons})")

    def model_cannot_take_summary(self) -> str:
        unfit = getattr(self, "_unfit", {})
        return "".join(f"{degree} {why}; " for degree, why in unfit.items())


def describe_family(plan: Plan) -> str:
    text = degree_words(plan, eq="") + f" zero{plan.zero} mb{plan.micro_batch} {plan.schedule}"
    if plan.interleave > 1:
        text += f"x{plan.interleave}"
    if plan.sequence_parallel:
        text += " sp"
    if plan.offload_optimizer:
        text += " offload"
    return text

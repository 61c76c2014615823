"""Why nothing fits: the leanest plan the pins allow, where it overflows, and the nearest
change that fits (dropping one pin, or more GPUs of this kind)."""
from __future__ import annotations

from dataclasses import replace

from cost_models.cluster import ClusterSpec
from cost_models.errors import MeshplanError
from cost_models.inputs import MAX_MICRO_BATCHES
from cost_models.units import GIB
from planner.plan import Plan
from planner.search.partition import StageCosts, partition
from planner.search.space import divisors
from planner.simulate import ALLOCATOR_RESERVED_RATIO, prepare_unchecked
from planner.simulate.schedule import in_flight_counts


class Diagnosis:
    """The nothing-fits message of the search (planner.search.ranking._Search)."""

    def nothing_fits(self) -> str:
        """One line: what the leanest plan the pins allow needs, where it overflows, and the
        nearest change that fits - dropping one pin, or more GPUs of this kind."""
        need, stage = self.leanest(self.cluster)
        pins = {k: v for k, v in self.pinned.items() if k != "precision"}
        within = f" with {', '.join(f'{k}={v}' for k, v in pins.items())}" if pins else ""
        where = f"{stage.peak_reserved_bytes / GIB:.1f} GiB per GPU on pipeline stage {stage.stage} " \
                f"({_largest_parts(stage)})" if stage is not None else f"{need / GIB:.1f} GiB per GPU"
        head = (f"nothing fits: the leanest plan{within} needs {where} but {self.cluster.gpu.display_name} "
                f"leaves {self.budget_bytes / GIB:.1f} GiB (after a {self.reserve_bytes / GIB:.1f} GiB reserve)")
        if need <= self.budget_bytes:   # the pins leave only candidates the search could not split
            return (f"nothing fits{within}: no candidate found a fitting stage split, though the leanest plan, "
                    f"evenly split, needs {need / GIB:.1f} GiB of the {self.budget_bytes / GIB:.1f} GiB budget: "
                    f"drop a pin")
        freed = {name: self._without(name).leanest(self.cluster)[0] for name in pins}
        fixes = [f"--{_flag(name)} (then {need_bytes / GIB:.1f} GiB)" for name, need_bytes in freed.items()
                 if need_bytes <= self.budget_bytes]
        if fixes:
            return f"{head}; dropping any one of these pins fits: {', '.join(fixes)}"
        gpus = self.gpus_to_fit()
        more = (f"about {gpus} GPUs ({gpus // self.cluster.gpus_per_node} nodes of {self.cluster.gpus_per_node}) "
                f"would hold it" if gpus else "more GPUs alone would not hold it: use GPUs with more memory")
        return f"{head}; {more}"

    def _without(self, name: str) -> "Diagnosis":
        return type(self)(self.spec, self.cluster, self.global_batch, self.seq, self.compute, self.comm,
                       self.reserve_bytes, self.tp_across_nodes, {k: v for k, v in self.pinned.items() if k != name})

    def leanest_bytes(self, cluster: ClusterSpec, simulated: bool = True) -> float:
        return self.leanest(cluster, simulated)[0]

    def leanest(self, cluster: ClusterSpec, simulated: bool = True):
        """(peak reserved bytes per GPU, its worst StageMemory or None) of the leanest plan
        the pins allow on `cluster`: unless pinned, ZeRO-3 (with optimizer offload where the
        host memory holds it), micro-batch 1, every block fully checkpointed, evenly split,
        1F1B, sequence parallel with tp, over every dp x tp x pp. On another cluster dp and
        pp are free. `simulated`: priced by simulate() (else by the partition model)."""
        search = self if cluster is self.cluster else type(self)(
            self.spec, cluster, self.global_batch, self.seq, self.compute, None, self.reserve_bytes,
            self.tp_across_nodes, {k: v for k, v in self.pinned.items() if k not in ("dp", "pp")})
        best, worst = float("inf"), None
        for dp, cp, tp, pp in search.families():
            lean = search._leanest_plan(dp, cp, tp, pp)
            if lean is None:
                continue
            sim = prepare_unchecked(lean, self.spec, cluster, search.compute, search.comm)
            mode = search.pinned.get("checkpoint", "full")
            if simulated:
                stage = prepare_unchecked(replace(lean, checkpoint=[mode] * len(sim.traced.blocks)), self.spec,
                                          cluster, search.compute, search.comm).run().worst_stage
                peak = stage.peak_reserved_bytes
            else:
                split = partition(StageCosts(sim, in_flight_counts(lean.schedule, pp, lean.grad_accum,
                                                                   lean.interleave)), float("inf"), mode)
                stage, peak = None, max(split.stage_memory_bytes) * ALLOCATOR_RESERVED_RATIO
            if peak < best:
                best, worst = peak, stage
        return best, worst

    def _leanest_plan(self, dp: int, cp: int, tp: int, pp: int) -> Plan | None:
        """The leanest plan of one family under the pins (None: the pins rule it out)."""
        pick = self.pinned.get
        zero = pick("zero", 3 if dp * cp > 1 else 0)
        per_rank = self.global_batch // dp
        # the smallest micro-batch within the micro-batches a step may run
        micro_batch = pick("micro_batch", next(
            (mb for mb in divisors(per_rank) if per_rank // mb <= MAX_MICRO_BATCHES), 1))
        schedule = pick("schedule", "interleaved" if pick("interleave", 1) > 1 else "1f1b")
        fields = dict(dp=dp, cp=cp, tp=tp, pp=pp, zero=zero, micro_batch=micro_batch, global_batch=self.global_batch,
                      seq=self.seq, precision=self.values("precision", ("bf16",))[0], schedule=schedule,
                      interleave=pick("interleave", 2 if schedule == "interleaved" else 1),
                      sequence_parallel=pick("sequence_parallel", tp > 1 and self.spec.config is not None
                                             and (self.seq // cp) % tp == 0),
                      offload_optimizer=pick("offload_optimizer", dp * cp > 1 and zero >= 2))
        try:
            lean = Plan(**fields)
            if self.host_floor_bytes(lean) > self.cluster.host_memory_bytes_per_gpu and \
                    "offload_optimizer" not in self.pinned:
                lean = replace(lean, offload_optimizer=False)
            lean.check_fits(self.block_count())
        except MeshplanError:
            return None
        return lean

    def gpus_to_fit(self) -> int | None:
        """The smallest cluster of this node type (doubling the nodes) whose leanest plan fits."""
        for doublings in range(1, 13):
            bigger = replace(self.cluster, nodes=self.cluster.nodes * 2 ** doublings)
            try:
                if (self.leanest_bytes(bigger, simulated=False) <= self.budget_bytes
                        and self.leanest_bytes(bigger) <= self.budget_bytes):
                    return bigger.world_size
            except MeshplanError:
                continue
        return None


def _largest_parts(stage) -> str:
    """The two largest memory parts of a stage, in words."""
    parts = {"activations": stage.activations_bytes, "parameters": stage.params_bytes,
             "gradients": stage.grads_bytes, "optimizer state": stage.optimizer_bytes,
             "working and gathered": stage.transient_bytes}
    top = sorted(parts.items(), key=lambda item: -item[1])[:2]
    return ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in top)


def _flag(name: str) -> str:
    return name.replace("_", "-")

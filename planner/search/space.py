"""The search space: every dp x tp x pp family of the cluster and every candidate plan of a
family (ZeRO, offload, micro-batch, sequence parallelism, schedule, precision), under the pins."""
from __future__ import annotations

from cost_models.errors import MeshplanError
from cost_models.inputs import MAX_MICRO_BATCHES
from planner.plan import Plan

INTERLEAVE_CHOICES = (2, 4)


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending (O(sqrt n): n may be a batch of millions)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


class SearchSpace:
    """Candidate enumeration of the search (planner.search.ranking._Search)."""

    def values(self, name: str, default):
        return [self.pinned[name]] if name in self.pinned else list(default)

    def families(self) -> list[tuple[int, int, int]]:
        world, gpn = self.cluster.world_size, self.cluster.gpus_per_node
        cfg = self.spec.config
        blocks = cfg.layers if cfg else None
        out = []
        for tp in self.values("tp", divisors(world)):
            if world % tp:
                continue
            if tp > gpn and not self.tp_across_nodes:
                continue
            if tp > 1 and (cfg is None or any(v % tp for v in (cfg.heads, cfg.kv_heads, cfg.ffn, cfg.hidden))):
                continue
            for pp in self.values("pp", divisors(world // tp)):
                if (world // tp) % pp or (blocks is not None and pp > blocks):
                    continue
                dp = world // (tp * pp)
                if "dp" in self.pinned and dp != self.pinned["dp"]:
                    continue
                if self.global_batch % dp == 0:
                    out.append((dp, tp, pp))
        if not out:
            raise MeshplanError(self._no_family_message())
        return out

    def _no_family_message(self) -> str:
        world = self.cluster.world_size
        pins = ", ".join(f"{k}={self.pinned[k]}" for k in ("dp", "tp", "pp") if k in self.pinned)
        return (f"no dp x tp x pp = {world} devices fits the model and global batch {self.global_batch}"
                + (f" with {pins}" if pins else "") + ": choose degrees whose product is the cluster size, "
                "tp dividing the heads (inside a node), and dp dividing the global batch")

    def candidates(self, dp, tp, pp) -> list[Plan]:
        per_rank = self.global_batch // dp
        out = []
        for precision in self.values("precision", ("bf16",)):
            # every size that divides the rank's share: each is priced from two traces
            # (planner.simulate.batch_scaling), and memory and the bound prune the rest
            for mb in self.values("micro_batch", divisors(per_rank)):
                if per_rank % mb or per_rank // mb > MAX_MICRO_BATCHES:
                    continue
                m = per_rank // mb
                zeros = self.engine.pipeline_zero if pp > 1 else self.engine.zero
                for zero in self.values("zero", zeros if dp > 1 else (0,)):
                    if zero not in zeros:
                        continue
                    offloads = (False, True) if zero >= 2 and self.engine.offload_optimizer else (False,)
                    for offload in self.values("offload_optimizer", offloads):
                        sps = (False, True) if tp > 1 and self.engine.sequence_parallel else (False,)
                        for sp in self.values("sequence_parallel", sps):
                            if sp and (tp < 2 or self.seq % tp):
                                continue   # the runtime shards the sequence evenly over tp >= 2
                            for schedule, v in self._schedules(pp, m):
                                out.append(Plan(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=mb,
                                                global_batch=self.global_batch, seq=self.seq, precision=precision,
                                                schedule=schedule, interleave=v, sequence_parallel=sp,
                                                offload_optimizer=offload, model=self.spec.name,
                                                cluster=self.cluster.name, engine=self.engine.name,
                                                engine_options=dict(self.engine_options)))
        return out

    def _schedules(self, pp: int, micro_batches: int):
        blocks = self.spec.config.layers if self.spec.config else None
        schedules = self.values("schedule", ("1f1b", "gpipe", "interleaved") if pp > 1 else ("1f1b",))
        for schedule in schedules:
            if pp > 1 and schedule not in self.engine.schedules:
                continue
            if schedule == "gpipe" and "schedule" not in self.pinned:
                self.stats.pruned_dominated += 1
                continue
            if schedule == "1f1b" and pp > 1 and micro_batches < pp and self.engine.micro_batch_per_stage:
                continue   # the runtime's 1F1B needs a micro-batch per stage (pipeline.check_schedule)
            if schedule != "interleaved":
                yield schedule, 1
                continue
            if pp < 2 or micro_batches % pp:
                continue
            for v in self.values("interleave", INTERLEAVE_CHOICES):
                if v >= 2 and (blocks is None or pp * v <= blocks):
                    yield schedule, v

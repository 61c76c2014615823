"""The search space: every dp x cp x tp x pp family of the cluster and every candidate plan
of a family (expert parallelism, ZeRO, offload, micro-batch, sequence parallelism, schedule,
precision), under the pins.

Context parallelism (cp) is searched for long sequences only: from CP_MIN_SEQ tokens, with
at least CP_MIN_LOCAL_SEQ tokens per rank (below that the K/V exchange outweighs what the
split saves; Llama 3 405B ran cp 16 at 128K tokens, 8K per rank). A pinned cp is taken
whatever the sequence. cp needs a preset or JSON model running the fused attention kernel
and an engine that has it (planner.simulate.context)."""
from __future__ import annotations

from types import SimpleNamespace

from cost_models.errors import MeshplanError
from cost_models.inputs import MAX_MICRO_BATCHES, finite_number
from cost_models.memory import model_state_bytes
from planner.arch.moe import check_tensor_parallel
from planner.plan import Plan
from planner.simulate import ALLOCATOR_RESERVED_RATIO, model_key, trace_cached

INTERLEAVE_CHOICES = (2, 4)
CP_MIN_SEQ = 32768
CP_MIN_LOCAL_SEQ = 4096


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending (O(sqrt n): n may be a batch of millions)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_expert_pins(pinned: dict, spec, cluster, engine, moe_imbalance: float = 1.0) -> None:
    """A pinned ep the model, the cluster or the engine cannot take, in one line before any search."""
    finite_number(moe_imbalance, "the MoE load imbalance (--moe-imbalance)", low=1)
    ep = pinned.get("ep", 1)
    experts = getattr(spec.config, "experts", 0) if spec.config is not None else 0
    if experts:
        check_tensor_parallel(pinned.get("tp", 1))
    if ep == 1:
        return
    if not experts:
        raise MeshplanError(f"ep {ep} needs a Mixture-of-Experts model (arch moe); {spec.name} has no experts: "
                            f"drop --ep")
    if ep > cluster.world_size:
        raise MeshplanError(f"ep {ep} exceeds {cluster.name}'s {cluster.world_size} GPUs (ep divides the "
                            f"data-parallel ranks): pin ep <= {cluster.world_size}")
    if experts % ep:
        raise MeshplanError(f"ep {ep} does not divide {spec.name}'s {experts} experts: pin an ep that divides "
                            f"{experts}")
    if "dp" in pinned and pinned["dp"] % ep:
        raise MeshplanError(f"ep {ep} must divide the pinned dp {pinned['dp']}: change --ep or --dp")
    if pinned.get("tp", 1) > 1:
        raise MeshplanError(f"ep {ep} with tp {pinned['tp']} is not supported (experts would need expert tensor "
                            f"parallelism): pin tp 1 or ep 1")
    if not engine.expert_zero:
        raise MeshplanError(f"{engine.name} has no expert parallelism meshplan models ({engine.expert_refusal}): "
                            f"drop --ep or change --engine")
    if "zero" in pinned and pinned["zero"] not in engine.expert_zero:
        raise MeshplanError(f"{engine.name} runs expert parallelism with ZeRO "
                            f"{', '.join(map(str, engine.expert_zero))}, not {pinned['zero']}: change --zero or --ep")


def check_context_pins(pinned: dict, spec, cluster, engine, engine_options: dict) -> None:
    """A pinned cp the model, the cluster or the engine cannot take, in one line (the
    sequence: planner.search.ranking.check_pinned)."""
    from planner.simulate.context import check_context_parallel
    cp = pinned.get("cp", 1)
    if cp == 1:
        return
    if cp > cluster.world_size:
        raise MeshplanError(f"cp {cp} exceeds {cluster.name}'s {cluster.world_size} GPUs: pin cp <= "
                            f"{cluster.world_size}")
    if engine.context_refusal:
        raise MeshplanError(f"{engine.name} has no context parallelism meshplan models ({engine.context_refusal}): "
                            f"drop --cp or change --engine")
    if pinned.get("ep", 1) > 1:
        raise MeshplanError("cp > 1 with ep > 1 is not supported yet: drop --cp or --ep")
    if "zero" in pinned and pinned["zero"] not in engine.context_zero:
        raise MeshplanError(f"{engine.name} runs context parallelism with ZeRO "
                            f"{', '.join(map(str, engine.context_zero))}, not {pinned['zero']}: change --zero or --cp")
    check_context_parallel(SimpleNamespace(cp=cp), spec.config, engine.execution_for(engine_options).attention)
    why = _runtime_refuses_cp(pinned, engine, cp)
    if why:
        raise MeshplanError(why)


def _runtime_refuses_cp(pinned: dict, engine, cp: int) -> str | None:
    """Why the engine's runtime cannot run cp with the pinned compile (Engine.limits), or None."""
    if not (pinned.get("compile") and engine.limits):
        return None
    return engine.limits(SimpleNamespace(cp=cp, compile=True, checkpoint=[], tp=1))


class SearchSpace:
    """Candidate enumeration of the search (planner.search.ranking._Search). Degrees a model
    cannot take are skipped with their reason (`unfit`, shown when nothing is left): pp above
    its blocks, tp that does not divide what it splits, dp that does not divide the batch;
    for a file.py:factory model also tp where no block linear splits, and pp where the runtime
    cannot cut it (planner.search.factory)."""

    def values(self, name: str, default):
        return [self.pinned[name]] if name in self.pinned else list(default)

    def families(self) -> list[tuple[int, int, int, int]]:
        """Every (dp, cp, tp, pp) the search walks: dp x cp data ranks per (tp, pp) split, cp
        over context_degrees."""
        out = []
        for ranks, tp, pp in self._splits():
            for cp in self.context_degrees(ranks):
                dp = ranks // cp
                if "dp" in self.pinned and dp != self.pinned["dp"]:
                    continue
                if dp % self.pinned.get("ep", 1):
                    self.unfit(f"dp {dp}", f"is not a multiple of the pinned ep {self.pinned['ep']}")
                elif self.global_batch % dp == 0:
                    out.append((dp, cp, tp, pp))
                else:
                    self.unfit(f"dp {dp}", f"does not divide global batch {self.global_batch}")
        if not out:
            raise MeshplanError(self._no_family_message())
        return out

    def context_degrees(self, ranks: int) -> list[int]:
        """cp of a family with `ranks` data ranks (dp x cp): 1, and for a long sequence (or the
        pinned cp) each divisor of `ranks` that cuts the sequence into 2 x cp even chunks."""
        if "cp" in self.pinned:
            cp = self.pinned["cp"]
            if ranks % cp:
                return []
            if self.seq % (2 * cp) and cp > 1:
                self.unfit(f"cp {cp}", f"does not cut seq {self.seq} into 2 x cp chunks")
                return []
            return [cp]
        if self.seq < CP_MIN_SEQ or not self.takes_context_parallel():
            return [1]
        return [cp for cp in divisors(ranks) if cp == 1 or (self.seq % (2 * cp) == 0
                                                           and self.seq // cp >= CP_MIN_LOCAL_SEQ)]

    def takes_context_parallel(self) -> bool:
        """The engine has context parallelism and the model runs the fused attention kernel."""
        config = self.spec.config
        if config is None or self.engine.context_refusal:
            return False
        attention = self.engine.execution_for(self.engine_options).attention or config.attention
        return (attention == "sdpa" and not getattr(config, "experts", 0)
                and not _runtime_refuses_cp(self.pinned, self.engine, 2))

    def _splits(self) -> list[tuple[int, int, int]]:
        """Every (dp x cp, tp, pp) that multiplies to the cluster (the pins and the model allowing)."""
        world, gpn = self.cluster.world_size, self.cluster.gpus_per_node
        blocks = self.block_count()
        out = []
        for tp in self.values("tp", divisors(world)):
            if world % tp:
                continue
            if tp > gpn and not self.tp_across_nodes:
                self.unfit(f"tp {tp}", f"spans nodes of {gpn} GPUs")
                continue
            why = self.tp_unfit(tp) if tp > 1 else None
            if why:
                self.unfit(f"tp {tp}", why)
                continue
            if tp > 1 and self.pinned.get("ep", 1) > 1:
                self.unfit(f"tp {tp}", f"cannot take the pinned ep {self.pinned['ep']} (ep > 1 needs tp 1)")
                continue
            for pp in self.values("pp", divisors(world // tp)):
                if (world // tp) % pp:
                    continue
                why = self.pp_unfit(pp, blocks) if pp > 1 else None
                if why:
                    self.unfit(f"pp {pp}", why)
                    continue
                out.append((world // (tp * pp), tp, pp))
        return out

    def states_floor_bytes(self, plan: Plan) -> float:
        """Model states of an even 1/(tp*pp) share of the parameters (the routed experts': 1/(ep*pp),
        sharded over dp/ep under ZeRO): no rank holds less."""
        states = self._floor_states(plan)
        return (states.params_bytes + states.grads_bytes + states.optimizer_bytes) * ALLOCATOR_RESERVED_RATIO

    def _floor_states(self, plan: Plan):
        expert = self.expert_param_count() if plan.ep > 1 else 0.0
        dense = model_state_bytes((self.param_count() - expert) / (plan.tp * plan.pp), plan.precision, plan.zero,
                                  plan.dp * plan.cp, plan.offload_optimizer)
        if not expert:
            return dense
        experts = model_state_bytes(expert / (plan.ep * plan.pp), plan.precision, plan.zero, plan.edp,
                                    plan.offload_optimizer)
        return type(dense)(*(a + b for a, b in zip(
            (dense.params_bytes, dense.grads_bytes, dense.optimizer_bytes, dense.host_bytes),
            (experts.params_bytes, experts.grads_bytes, experts.optimizer_bytes, experts.host_bytes))))

    def host_floor_bytes(self, plan: Plan) -> float:
        if not plan.offload_optimizer:
            return 0.0
        return self._floor_states(plan).host_bytes

    def expert_param_count(self) -> float:
        """The routed experts' parameters of the whole model (0 for a dense model)."""
        if not hasattr(self, "_expert_param_count"):
            from planner.simulate.experts import expert_param_count
            precision = self.values("precision", ("bf16",))[0]
            traced = trace_cached(model_key(self.spec), 1, self.seq, precision, "autocast")
            self._expert_param_count = sum(expert_param_count(traced.cost_of(i).ops) for i in traced.blocks)
        return self._expert_param_count

    def param_count(self) -> float:
        if not hasattr(self, "_param_count"):
            precision = self.values("precision", ("bf16",))[0]
            traced = trace_cached(model_key(self.spec), 1, self.seq, precision, "autocast")
            self._param_count = float(traced.param_count)
        return self._param_count

    def unfit(self, degree: str, why: str):
        """Note a degree the model cannot take, and why (for the nothing-left message)."""
        self.__dict__.setdefault("_unfit", {}).setdefault(degree, why)

    def tp_unfit(self, tp: int) -> str | None:
        cfg = self.spec.config
        if cfg is None and not self.engine.searched_tp_layout:
            return f"{self.engine.name} splits only Megatron-style models, not a factory's layers"
        if cfg is None:
            return self.factory_tp_unfit(tp)
        if tp > 1 and cfg.is_moe:
            return "is not offered for MoE models (tp 1: expert tensor parallelism is not built)"
        for what in ("heads", "kv_heads", "ffn", "hidden"):
            if getattr(cfg, what) % tp:
                return f"does not divide the model's {what} ({getattr(cfg, what)})"
        return None

    def pp_unfit(self, pp: int, blocks: int) -> str | None:
        if pp > blocks:
            return f"exceeds the model's {blocks} blocks"
        return None if self.spec.config is not None else self.factory_pp_unfit()

    def _no_family_message(self) -> str:
        world = self.cluster.world_size
        pins = ", ".join(f"{k}={self.pinned[k]}" for k in ("dp", "cp", "tp", "pp") if k in self.pinned)
        unfit = getattr(self, "_unfit", {})
        pinned = {k for k in ("dp", "cp", "tp", "pp") if k in self.pinned}
        why = "; ".join(f"{degree} {reason}" for degree, reason in unfit.items()
                        if not pinned or degree.split()[0] in pinned)
        return (f"no dp x {'cp x ' if 'cp' in self.pinned else ''}tp x pp = {world} devices fits {self.spec.name} and global batch {self.global_batch}"
                + (f" with {pins}" if pins else "") + (f" ({why})" if why else "")
                + ": choose degrees whose product is the cluster size, tp dividing what it splits (inside a "
                "node), pp at most the model's blocks, and dp dividing the global batch")

    def expert_parallel_degrees(self, dp: int, tp: int) -> list[int]:
        """ep of an MoE model: each divisor of dp that divides its experts (ep > 1 with tp 1
        only, and with an engine that runs it); a dense model keeps ep 1."""
        experts = getattr(self.spec.config, "experts", 0) if self.spec.config is not None else 0
        if not experts or tp > 1 or not self.engine.expert_zero:
            return [1]
        return [ep for ep in divisors(dp) if experts % ep == 0]

    def candidates(self, dp, cp, tp, pp) -> list[Plan]:
        out = []
        for ep in self.values("ep", self.expert_parallel_degrees(dp, tp) if cp == 1 else [1]):   # cp > 1: ep 1
            out += self._candidates(dp, cp, tp, pp, ep)
        return out

    def _candidates(self, dp, cp, tp, pp, ep) -> list[Plan]:
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
                for zero in self.values("zero", zeros if dp * cp > 1 else (0,)):
                    if zero not in zeros or (ep > 1 and zero not in self.engine.expert_zero) \
                            or (cp > 1 and zero not in self.engine.context_zero):
                        continue
                    offloads = (False, True) if zero >= 2 and self.engine.offload_optimizer else (False,)
                    for offload in self.values("offload_optimizer", offloads):
                        sp_ok = tp > 1 and self.engine.sequence_parallel and self.spec.config is not None
                        sps = (False, True) if sp_ok else (False,)
                        for sp in self.values("sequence_parallel", sps):
                            if sp and (tp < 2 or (self.seq // cp) % tp):
                                continue   # the runtime shards the sequence evenly over tp >= 2
                            for schedule, v in self._schedules(pp, m):
                                out.append(Plan(dp=dp, cp=cp, tp=tp, pp=pp, ep=ep, zero=zero, micro_batch=mb,
                                                global_batch=self.global_batch, seq=self.seq, precision=precision,
                                                fp8_recipe=self.pinned.get("fp8_recipe", "tensorwise")
                                                if precision == "fp8" else "tensorwise",
                                                schedule=schedule, interleave=v, sequence_parallel=sp,
                                                offload_optimizer=offload, compile=self.pinned.get("compile", False),
                                                model=self.spec.name,
                                                cluster=self.cluster.name, engine=self.engine.name,
                                                engine_options=dict(self.engine_options)))
        return out

    def _schedules(self, pp: int, micro_batches: int):
        blocks = self.block_count()
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
                if v >= 2 and pp * v <= blocks:
                    yield schedule, v
                elif v >= 2:
                    self.unfit(f"pp {pp} x interleave {v}", f"exceeds the model's {blocks} blocks")

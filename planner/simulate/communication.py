"""Communication of a simulated plan: the exposed time and the bytes of its TP collectives,
expert parallelism's all-to-alls, FSDP's gathers and reductions, DDP's all-reduce, the tied
embedding's and the sequence-parallel norms' gradient reductions, and the pipeline's
boundary transfers. A routed expert's parameters are data-parallel over the dp/ep ranks that
hold the same experts (the "edp" group), everything else over dp (torchtitan's apply_fsdp),
times cp under context parallelism, whose K/V exchange runs on the cp group
(planner.simulate.context)."""
from __future__ import annotations

from collections import Counter

from cost_models.comm import pair_group
from cost_models.memory import DTYPE_BYTES
from planner.arch import head_norm_names
from planner.simulate import fsdp
from planner.simulate.costing import LayerTiming
from planner.simulate.fp8 import pre_gather_cast_s
from planner.simulate.times import FsdpExposure, LayerTimes

DDP_BUCKET_BYTES = 25 * 2 ** 20   # torch DDP's default bucket_cap_mb
# the block norms over attention heads, whose gradients tensor parallelism always leaves partial
HEAD_NORMS = head_norm_names()


class CommMixin:
    """The communication half of the simulation (planner.simulate.step._Simulation)."""

    def recomputed_collectives(self, t: LayerTiming) -> tuple:
        """The forward collectives a full recomputation of the layer issues again."""
        return t.tp_comm_fwd[:-1] if self.execution.recompute_stops_early else t.tp_comm_fwd

    def ep_comm_s(self, collectives) -> float:
        """Expert-parallel all-to-alls ((kind, what, bytes), ...) on the ep group, each waited
        on before the next kernel (planner.simulate.experts); the busiest rank's token volume
        is the load imbalance times the balanced one."""
        return sum(self.comm.time_s(kind, nbytes * (self.moe_imbalance if what == "tokens" else 1.0), self.ep_group)
                   for kind, what, nbytes in collectives)

    def cp_comm_s(self, t: LayerTiming) -> tuple[float, float]:
        """(forward, backward) exposed K/V exchange of one micro-batch through a layer on the
        cp group. Backward gathers K and V again (runtime.context_parallel keeps only this
        rank's part); under full or attention-core recomputation that gather is the rerun's,
        whose gathered K and V backward then uses, so recomputation adds nothing. With
        Execution.cp_overlap (a p2p ring) each pass's exchange hides behind that pass's
        attention kernels."""
        if not t.cp_comm_fwd:
            return 0.0, 0.0
        fwd = sum(self.comm.time_s(kind, nbytes, self.cp_group) for kind, nbytes in t.cp_comm_fwd)
        bwd = sum(self.comm.time_s(kind, nbytes, self.cp_group) for kind, nbytes in t.cp_comm_bwd)
        kernel_fwd, kernel_bwd = t.attention_kernel_s if self.execution.cp_overlap else (0.0, 0.0)
        return max(0.0, fwd - kernel_fwd), max(0.0, bwd - kernel_bwd)

    def tp_comm_s(self, collectives) -> float:
        """TP collectives ((kind, bytes), ...) in a row on the TP group: inside a layer they sit
        between the kernels that produce and consume them, so none is hidden."""
        return sum(self.comm.time_s(kind, nbytes, self.tp_group) for kind, nbytes in collectives)

    @property
    def fsdp_communicates(self) -> bool:
        """FSDP issues collectives: ZeRO 1-3 over more than one data-parallel rank (ZeRO 0's
        replicate copies its parameters locally and all-reduces: dp_tail_s)."""
        return self.fsdp_drive is not None and self.plan.zero >= 1 and self.data_ranks > 1

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
        gather, scatter = self.fsdp_layer_s(t)
        if self.plan.offload_optimizer:   # the fp32 shard comes from the host before each gather
            gather += self.sharded_params(t.params_per_gpu, t.expert_params_per_gpu) * 4 \
                / self.cluster.gpu.host_link_bw_bytes_per_s
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
            scatter = sum(self.fsdp_layer_s(self.timing(i))[1] for i in stages[stage])
            stream_free = max(stream_free, end) + scatter
        return max(0.0, stream_free - timeline.finish_s[rank])

    def fsdp_bytes(self, t: LayerTiming, experts: bool = False) -> tuple[float, float]:
        """(all-gather, reduce-scatter) buffer bytes of one layer under FSDP2: parameters
        gathered in the compute dtype, gradients reduced in fp32 (its reduce dtype); the
        routed experts' (`experts`, over edp) or the rest's (over dp)."""
        params = t.expert_params_per_gpu if experts else t.params_per_gpu - t.expert_params_per_gpu
        if experts or not self.float8_gather:
            return params * self.act_bytes, params * 4
        # tensorwise float8 all-gather: the float8 linears' weights travel as 1 byte each
        fp8 = t.fp8_params_per_gpu
        return (params - fp8) * self.act_bytes + fp8 * DTYPE_BYTES["fp8"], params * 4

    def fsdp_layer_s(self, t: LayerTiming) -> tuple[float, float]:
        """(all-gather s, reduce-scatter s) of one layer: the dp group's, then the experts' on edp."""
        gather = scatter = 0.0
        for experts, group in ((False, self.dp_group), (True, self.edp_group)):
            gather_bytes, scatter_bytes = self.fsdp_bytes(t, experts)
            gather += self.comm.all_gather_s(gather_bytes, group)
            if not experts and self.float8_gather:   # the shard's cast to float8 first
                gather += pre_gather_cast_s(self.compute, t.fp8_params_per_gpu / self.data_ranks)
            scatter += self.comm.reduce_scatter_s(scatter_bytes, group)
        return gather, scatter

    def comm_bytes(self, rank: int, stages) -> dict:
        """What one step makes pipeline rank `rank` communicate: {group: {collective: bytes}}
        over the TP group ("tp"), the DP group ("dp"), to the next and previous pipeline stage
        ("pp": what it sends) and, with a tied embedding split over stages, to its other
        copy ("tied"). Bytes are each collective's full buffer on one rank (nccl-tests'
        convention, as CommModel prices them), summed over the step's micro-batches.
        Expert parallelism adds "ep": the all-to-alls of the tokens ("all_to_all", their
        send buffers under balanced routing) and of the per-expert counts
        ("all_to_all_counts"); the routed experts' data-parallel reductions go to "edp".
        Context parallelism adds "cp": the K/V all-gathers and the dK/dV reduce-scatters
        (planner.simulate.context); the "dp" group is then the dp x cp ranks."""
        plan, n = self.plan, self.plan.grad_accum
        volume = {"tp": Counter(), "dp": Counter(), "pp": Counter(), "tied": Counter(), "ep": Counter(),
                  "edp": Counter(), "cp": Counter()}
        chunks = [c * plan.pp + rank for c in range(plan.interleave)]
        params = expert = 0.0
        for index, stage in ((i, v) for v in chunks for i in stages[v]):
            t = self.timing(index)
            params += t.params_per_gpu
            expert += t.expert_params_per_gpu
            again = self.recomputed_collectives(t) if self.checkpoint_mode(index) == "full" else ()
            for kind, nbytes in t.tp_comm_fwd + t.tp_comm_bwd + again:
                volume["tp"][kind] += n * nbytes
            ep_again = t.ep_comm_fwd if self.checkpoint_mode(index) == "full" else ()
            for kind, what, nbytes in t.ep_comm_fwd + t.ep_comm_bwd + ep_again:
                volume["ep"][kind + ("_counts" if what == "counts" else "")] += n * nbytes
            for kind, nbytes in t.cp_comm_fwd + t.cp_comm_bwd:   # a rerun's gather is backward's (cp_comm_s)
                volume["cp"][kind] += n * nbytes
            traffic = self.fsdp_traffic(stage)
            if traffic is not None:
                for experts, group in ((False, "dp"), (True, "edp")):
                    gather_bytes, scatter_bytes = self.fsdp_bytes(t, experts)
                    if not experts or (gather_bytes and plan.edp > 1):
                        volume[group]["all_gather"] += traffic.gathers_per_step * gather_bytes
                        volume[group]["reduce_scatter"] += traffic.reduce_scatters_per_step * scatter_bytes
        if self.data_ranks > 1 and plan.zero == 0:
            volume["dp"]["all_reduce"] += self.dp_tail_bytes(params - expert)
            if plan.edp > 1 and expert:
                volume["edp"]["all_reduce"] += self.dp_tail_bytes(expert)
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

    def dp_tail_s(self, params: float, last_bwd_s: float, expert: float = 0.0) -> float:
        """ZeRO 0's gradient all-reduce, in buckets during the last backward (DDP,
        replicate) or after it; ZeRO 1-3's reduce-scatters are FSDP's (fsdp_extra_s,
        fsdp_tail_s). The routed experts' gradients (`expert` of `params`) reduce over edp."""
        plan = self.plan
        if self.data_ranks == 1 or plan.zero >= 1:
            return 0.0
        grad_bytes = self.dp_tail_bytes(params - expert)
        all_reduce = self.comm.all_reduce_s(grad_bytes, self.dp_group) \
            + self.comm.all_reduce_s(self.dp_tail_bytes(expert), self.edp_group)
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
        Partial -> Replicate in the runtime). A norm over attention heads (Qwen3's q_norm,
        k_norm) sees only this rank's heads, so its gradient is reduced with or without
        sequence parallelism (runtime.parallelize._head_norm_style)."""
        plan = self.plan
        if plan.tp == 1:
            return 0.0
        layers = self.rank_layers(rank, stages)
        norm_params = sum(op.param_count for i in layers for op in self.traced.cost_of(i).ops if op.kind == "norm"
                          and (plan.sequence_parallel or op.module_path.rsplit(".", 1)[-1] in HEAD_NORMS))
        return norm_params * self.grad_dtype_bytes

    def tied_grad_bytes(self) -> float:
        if self.plan.zero >= 1:   # FSDP's reduced gradient: a 1/dp shard, fp32 as its sharded parameter
            return self.tied_params / self.tied_split / self.data_ranks * 4
        return self.tied_params / self.tied_split * self.grad_dtype_bytes

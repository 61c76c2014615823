"""Per-GPU memory of a simulated plan, most loaded rank of each pipeline stage: model states
by ZeRO stage (cost_models.memory, as the runtime allocates them), activations = the traced
saved bytes of the stage's layers x the micro-batches the schedule keeps in flight, the
autocast low-precision weight copies, FSDP's gathered parameters, and the largest
transient of a backward walk through the stage; reserved = allocated x the allocator's
empirical overhead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from cost_models.memory import DTYPE_BYTES, ModelStates, gathered_param_bytes, model_state_bytes
from planner.simulate import context
from planner.simulate.schedule import in_flight_counts

# PyTorch's caching allocator keeps freed blocks and rounds allocations up. Empirical:
# peak_reserved_bytes / peak_allocated_bytes over the 19 single-H100 steps in
# shared/reference/h100/measured.jsonl has median 1.063 (range 1.010-1.177).
ALLOCATOR_RESERVED_RATIO = 1.06
# Memory the CUDA context and cuBLAS/NCCL workspaces take outside the allocator (empirical
# order of magnitude on H100 with CUDA 12/13); subtracted from capacity before `fits`.
CUDA_CONTEXT_BYTES = 0.6e9


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


class HeldStates(NamedTuple):
    """Model-state bytes on one GPU: parameters as the optimizer holds them (FSDP: its fp32
    shard), FSDP's unsharded parameters kept across micro-batches, gradients, optimizer state."""

    params_bytes: float
    unsharded_bytes: float
    grads_bytes: float
    optimizer_bytes: float


class MemoryMixin:
    """The memory half of the simulation (planner.simulate.step._Simulation)."""

    def stage_memory(self, rank: int, stages) -> StageMemory:
        plan = self.plan
        layers = self.rank_layers(rank, stages)
        timings = [self.timing(i) for i in layers]
        params = sum(t.params_per_gpu for t in timings)
        expert = sum(t.expert_params_per_gpu for t in timings)
        states = self.model_states(params, expert)
        in_flight = (in_flight_counts(plan.schedule, plan.pp, plan.grad_accum, plan.interleave)[rank]
                     / plan.interleave)  # in units of the whole rank's layers
        fsdp_mixed = self.traced.cast == "params"
        saved = sum(t.saved_for(self.checkpoint_mode(i)) for i, t in zip(layers, timings))
        # autocast's low-precision weight copies stay saved until backward, except in
        # fully checkpointed layers (recomputed there); FSDP mixed precision has none
        copies = 0.0 if fsdp_mixed else sum(t.param_copy_bytes for i, t in zip(layers, timings)
                                            if self.checkpoint_mode(i) != "full")
        activations = in_flight * (saved + copies)
        gathered = self.gathered_bytes([self.gathered_params(t) for t in timings])
        # gradients appear during backward as activations go: the walk finds the worst moment,
        # and the breakdown reports each part as it is at that moment (so the parts add up)
        grads, released, working = self.backward_peak(layers, timings, self.held_grad_bytes(params, states))
        working += self.dispatch_buffer_bytes(timings) + self.exchange_buffer_bytes(timings)
        activations_at_peak = max(activations - released, 0.0)
        transient = working + gathered
        allocated = states.params_bytes + states.optimizer_bytes + grads + activations_at_peak + transient
        return StageMemory(rank, states.params_bytes, grads, states.optimizer_bytes,
                           activations_at_peak, transient, allocated, allocated * ALLOCATOR_RESERVED_RATIO,
                           states.host_bytes)

    def held_states(self, rank: int, stages) -> "HeldStates":
        """The most model states pipeline rank `rank` holds between its passes: before a
        micro-batch, before the step's once-a-step reduction, before the optimizer step
        (tests/parity/test_state_bytes.py compares them with the storages a runtime rank holds)."""
        plan = self.plan
        layers = self.rank_layers(rank, stages)
        params = [self.timing(i).params_per_gpu for i in layers]
        states = self.model_states(sum(params), sum(self.timing(i).expert_params_per_gpu for i in layers))
        if self.holds_unsharded:
            gathered = params
            if plan.edp == 1:   # one-rank edp groups: the runtime keeps the experts out of FSDP
                gathered = [p - self.timing(i).expert_params_per_gpu for i, p in zip(layers, params)]
            unsharded = self.gathered_bytes(gathered)
        elif self.fsdp_drive is not None and plan.grad_accum > 1:
            # FSDP2 leaves the part's root group (embedding, final norm, head: the layers
            # outside the blocks) gathered from one micro-batch's backward to the next forward
            # (measured by tests/parity/test_state_bytes.py)
            root = [p for i, p in zip(layers, params) if self.traced.layers[i].kind != "block"]
            unsharded = self.unsharded_bytes(root)
        else:
            unsharded = 0.0
        return HeldStates(states.params_bytes, unsharded, self.held_grad_bytes(sum(params), states),
                          states.optimizer_bytes)

    def model_states(self, params: float, expert: float = 0.0) -> ModelStates:
        """Model states of `params` on one GPU, `expert` of them routed experts' (already 1/ep
        of the experts): ZeRO shards those over the dp/ep ranks holding the same experts (edp,
        torchtitan's apply_fsdp) and the rest over dp."""
        plan = self.plan
        dense = model_state_bytes(params - expert, plan.precision, plan.zero, self.data_ranks,
                                  plan.offload_optimizer)
        if not expert:
            return dense
        experts = model_state_bytes(expert, plan.precision, plan.zero, plan.edp, plan.offload_optimizer)
        return ModelStates(*(getattr(dense, k) + getattr(experts, k) for k in
                             ("params_bytes", "grads_bytes", "optimizer_bytes", "host_bytes")))

    def dispatch_buffer_bytes(self, timings) -> float:
        """Expert parallelism's forward buffers beside what the trace holds: the rows a rank
        receives and their expert-major copy (the send buffer is the trace's routed rows;
        none of them is saved for backward: all_to_all_single's backward needs only the
        splits, the permutation only its indices). The busiest rank receives the imbalance
        times the balanced rows; one block's buffers are alive at a time."""
        if self.plan.ep == 1:
            return 0.0
        sends = [nbytes for t in timings for _, what, nbytes in t.ep_comm_fwd if what == "tokens"]
        return 2 * self.moe_imbalance * max(sends, default=0.0)

    def exchange_buffer_bytes(self, timings) -> float:
        """Context parallelism's K/V exchange buffers of one attention call at a time
        (planner.simulate.context.buffer_bytes); 0 without cp."""
        return max((context.buffer_bytes(t.cp_comm_bwd) for t in timings), default=0.0)

    @property
    def holds_unsharded(self) -> bool:
        """FSDP keeps each layer's unsharded parameters and gradient from a stage's first
        backward to the step's reduction (a pipeline stage: planner.simulate.fsdp)."""
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

    def gathered_params(self, t) -> float:
        """A layer's parameters as FSDP gathers them, counted in the gather dtype's elements:
        with the float8 all-gather (planner.fp8) its float8 weights take 1 byte, not 2."""
        if not self.float8_gather or not t.fp8_params_per_gpu:
            return t.params_per_gpu
        width = DTYPE_BYTES[self.gather_precision]
        return t.params_per_gpu - t.fp8_params_per_gpu * (1 - DTYPE_BYTES["fp8"] / width)

    @property
    def gather_precision(self) -> str:
        return self.traced.precision if self.traced.cast == "params" else "fp32"

    def unsharded_bytes(self, layer_params: list) -> float:
        """These layers' parameters unsharded, in the dtype FSDP gathers them in."""
        return DTYPE_BYTES[self.gather_precision] * float(sum(layer_params))

    def held_grad_bytes(self, params: float, states) -> float:
        """Gradient bytes held while micro-batches accumulate: the sharded (or DDP's whole)
        gradients, or FSDP's unsharded fp32 ones under a pipeline (its reduce dtype)."""
        return params * 4 if self.holds_unsharded else states.grads_bytes

    def layer_state_bytes(self, params: float, expert: float = 0.0) -> float:
        """A layer's model states at the stage's peak, for the partition's estimate: its
        parameters, gradients and optimizer state by ZeRO stage, plus what FSDP keeps
        unsharded from forward to backward (ZeRO-2) or across micro-batches (a pipeline)."""
        states = self.model_states(params, expert)
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
        sharded = plan.zero >= 1 and not self.holds_unsharded
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
                grads_so_far += 4 * (self.sharded_params(t.params_per_gpu, t.expert_params_per_gpu) if sharded
                                     else t.params_per_gpu)
            released += t.saved_for(mode)
        if worst is None or grads_so_far - released > worst:
            at_worst = (grads_so_far, released, 0.0)
        return at_worst

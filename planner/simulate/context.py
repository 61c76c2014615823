"""Context parallelism's costs: each sequence split over the cp ranks of a group, the
attention's keys and values exchanged between them.

A plan with cp > 1 is traced at `Plan.local_seq` = seq / cp tokens per sequence (the
trace's activations, linear-layer FLOPs and memory are one cp rank's). What that trace
gets wrong is the attention core: a rank's queries attend to the keys of the whole causal
prefix, not of its own chunks. The sequence is cut into 2 x cp chunks and rank i holds
chunks i and 2cp-1-i (torch's _HeadTailLoadBalancer, torchtitan's default
`context_parallel_load_balancer = "headtail"` in torchtitan/config/configs.py; Megatron-LM's
get_batch_on_this_cp_rank), so every rank does the same share of the causal work: its
attention kernel costs the full sequence's causal attention / cp (`attention_time_s`).

The exchange, per attention call and micro-batch, as meshplan's runtime and torchtitan run
it (torch.distributed.tensor.experimental context_parallel, rotate method "allgather",
torchtitan/distributed/context_parallel/api.py): forward all-gathers K and V over the cp
group; backward all-gathers them again (the gathered copy is not kept) and
reduce-scatters dK and dV back to their owners; under full or attention-core recomputation
that second gather is the rerun's, whose K and V backward then uses.
Each all-gather's output (and each reduce-scatter's input) is the full sequence's K (or V)
for this rank's heads: cp x b x local_seq x kv_heads/tp x head_dim elements in the
activation dtype (nccl-tests' convention, as CommModel prices it). The runtime waits on
them before its attention kernel: exposed. Megatron-LM runs Transformer Engine's p2p ring
(`--cp-comm-type p2p`, the default in megatron/training/arguments.py; "P2P is async and can
be overlapped with attention compute", megatron/core/transformer/transformer_config.py
cp_comm_type, passed to TE by megatron/core/extensions/transformer_engine.py): the same
volume in cp - 1 steps, each hidden behind the attention of the chunk already received, so
only what exceeds the attention core's compute is exposed (Execution.cp_overlap).

Memory beside the trace: the largest live exchange buffers of one attention call - in
backward the gathered K and V and the unreduced dK and dV (4 x the full-sequence K);
the gathered K and V of the forward are freed before it (not saved for backward).
"""
from __future__ import annotations

from cost_models.errors import MeshplanError
from planner.ir import OpInfo


def core_ops(ops) -> list:
    """The attention core's ops of a layer (labelled by the tracer), or its fused attention
    ops where the torch release cannot label them."""
    labelled = [op for op in ops if op.attention_core and op.kind != "view"]
    return labelled or [op for op in ops if op.kind == "attention"]


def attention_calls(ops) -> list[OpInfo]:
    """The fused attention kernels of a layer: each exchanges K and V once per pass."""
    return [op for op in ops if op.kind == "attention" and op.attention is not None]


def kv_bytes(op: OpInfo, tp: int, element_bytes: float, kv_heads: int | None = None) -> float:
    """One rank's K (or V) of one attention call: b x local_seq x kv_heads/tp x head_dim
    elements; the kv heads are the model's (`kv_heads`) or else the kernel's key input's second
    dimension (grouped-query attention passes fewer than the query heads)."""
    b, heads, seq_q, _, head_dim, _ = op.attention
    keys = op.input_shapes[1] if len(op.input_shapes) > 1 and len(op.input_shapes[1]) == 4 else None
    kv_heads = kv_heads or (int(keys[1]) if keys else heads)
    return b * seq_q * max(1, kv_heads // tp) * head_dim * element_bytes


def collectives(ops, tp: int, cp: int, element_bytes: float, kv_heads: int | None = None) -> tuple[tuple, tuple]:
    """(forward, backward) context-parallel collectives of one micro-batch through a layer,
    as ((kind, buffer bytes), ...): per attention call, forward all-gathers K and V;
    backward all-gathers them again and reduce-scatters dK and dV."""
    if cp == 1:
        return (), ()
    forward, backward = [], []
    for op in attention_calls(ops):
        full = cp * kv_bytes(op, tp, element_bytes, kv_heads)
        forward += [("all_gather", full)] * 2
        backward += [("all_gather", full)] * 2 + [("reduce_scatter", full)] * 2
    return tuple(forward), tuple(backward)


def exchange(ops, tp: int, cp: int, element_bytes, kv_heads: int | None = None) -> dict:
    """LayerTiming's cp_comm_fwd / cp_comm_bwd of a layer ({} without cp or attention), in its
    K and V's dtype (`element_bytes(op)`: bytes per element of an attention kernel's inputs)."""
    calls = attention_calls(ops)
    if cp == 1 or not calls:
        return {}
    forward, backward = collectives(ops, tp, cp, element_bytes(calls[0]), kv_heads)
    return {"cp_comm_fwd": forward, "cp_comm_bwd": backward}


def buffer_bytes(collectives_bwd) -> float:
    """The exchange buffers alive at once in one backward: the gathered K, V and the
    unreduced dK, dV of its largest attention call (its collectives' buffers)."""
    return sum(nbytes for _, nbytes in collectives_bwd[:4])


def full_sequence_flops(flops: float, core_flops: float, cp: int) -> float:
    """FLOPs of whole sequences from those of a trace at seq / cp (`flops`, of which
    `core_flops` are the attention core's): the cp ranks together run cp times the
    linear work, and the core, quadratic in the sequence, cp^2 times its local figure."""
    return cp * flops + (cp * cp - cp) * min(core_flops, flops)


def check_context_parallel(plan, config, attention: str | None = None) -> None:
    """cp > 1 on a model the runtime and the engines split: a preset or JSON model (whose
    attention kernel meshplan knows) running the fused attention kernel; torch's
    context_parallel and Transformer Engine's both replace the fused SDPA kernel only."""
    if plan.cp == 1:
        return
    if config is None:
        raise MeshplanError(f"cp {plan.cp} needs a preset or JSON model: meshplan does not split a factory "
                            f"model's sequence; use cp 1")
    kind = attention or config.attention
    if kind != "sdpa":
        raise MeshplanError(f"cp {plan.cp} needs the fused attention kernel (model attention 'sdpa'): context "
                            f"parallelism replaces scaled_dot_product_attention; this run uses {kind!r}: use cp 1")

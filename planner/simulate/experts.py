"""Expert parallelism's costs on a traced MoE block: which ops are the routed experts', how
they change when each of ep ranks runs E/ep of them, and the all-to-alls that move the tokens.

The trace runs every expert on one rank (planner.arch.moe: `run_local`), each with its
balanced share of the routed (token, choice) pairs: N = T * top_k pairs of a micro-batch's
T tokens, N / E rows per expert. Under expert parallelism (ep ranks, rank r owning experts
[r E/ep, (r+1) E/ep)) the mechanism is torchtitan's AllToAllTokenDispatcher
(torchtitan/models/common/token_dispatcher.py at b5bcd76) and Megatron-Core's
MoEAlltoAllTokenDispatcher (megatron/core/transformer/moe/token_dispatcher.py at d98e8a6):
1. the per-expert counts are exchanged (torchtitan: an all-to-all of the E counts; a
   device-to-host copy of the splits follows, so the rank waits for it);
2. dispatch: an all-to-all of the routed rows, in their dtype (the send buffer is all N
   rows, (ep-1)/ep of them leave the rank);
3. the received rows are permuted from rank-major to expert-major (torchtitan `_permute`),
   each local expert runs its SwiGLU on ep * N / E rows - the same FLOPs as the trace, in
   ep times taller GEMMs (Megatron-Core's experts.py TEGroupedMLP / torchtitan's
   GroupedExperts run them as one grouped GEMM; priced here per expert at the dense GEMM
   fit of its shape), and un-permuted;
4. combine: the all-to-all back, the same volume as the dispatch.
`all_to_all_single` is differentiable: backward sends the gradients of 4 and 2 the other
way, each the size of its forward. The runtime waits on every one of them (the splits
are needed before the next kernel), so they sit on the critical path; Megatron-Core's
`moe_shared_expert_overlap` (off by default, TransformerConfig) would hide the shared
experts' GEMMs behind them, which is not modelled.

Load imbalance (`imbalance` F >= 1): the busiest rank of the ep group receives F times the
average rows, so its experts' GEMMs and its all-to-all volume scale by F and set the pace.
"""
from __future__ import annotations

from dataclasses import replace

from planner.ir import OpInfo

COUNT_BYTES = 8   # the per-expert counts exchanged before the dispatch: int64 (torch.bincount / histc().long())
PERMUTE = "meshplan.ep_permute"   # the rank-major <-> expert-major copies of the received rows


def is_expert_op(op: OpInfo) -> bool:
    """An op of the routed experts (planner.arch.moe.Experts, module `...moe.experts`)."""
    return op.kind != "view" and op.module_path.endswith(".experts")


def has_experts(ops) -> bool:
    return any(is_expert_op(op) for op in ops)


def expert_param_count(ops) -> float:
    """The routed experts' parameters among `ops` (charged to their first ops)."""
    return float(sum(op.param_count for op in ops if is_expert_op(op)))


def _routed_input(ops) -> OpInfo | None:
    """The op that copies each token once per choice (the dispatch's send buffer)."""
    for op in ops:
        if op.module_path.endswith(".moe") and op.target.startswith("aten.index.") and op.kind != "view":
            return op
    return None


def _expert_output(ops) -> OpInfo | None:
    """The concatenated expert outputs (the combine's send buffer)."""
    last = [op for op in ops if is_expert_op(op)]
    return last[-1] if last and "cat" in last[-1].target else None


def collectives(ops, experts: int) -> tuple[tuple, tuple]:
    """(forward, backward) expert-parallel collectives of one micro-batch through the block,
    as ((kind, what, send-buffer bytes), ...) under balanced routing; `what` is "counts" or
    "tokens" (only the tokens' volume grows with the load imbalance)."""
    routed, combined = _routed_input(ops), _expert_output(ops)
    if routed is None or combined is None:
        return (), ()
    dispatch, combine = float(routed.bytes_written), float(combined.bytes_written)
    forward = (("all_to_all", "counts", float(experts * COUNT_BYTES)),
               ("all_to_all", "tokens", dispatch), ("all_to_all", "tokens", combine))
    backward = (("all_to_all", "tokens", combine), ("all_to_all", "tokens", dispatch))
    return forward, backward


def expert_parallel_ops(ops: list, experts: int, ep: int, imbalance: float = 1.0) -> list:
    """The block's ops as the busiest rank of an ep group runs them: E/ep local experts, one
    GEMM per expert and projection on ep * imbalance times the rows the trace gave it, their
    parameters 1/ep of the stack, plus (ep > 1) the permutation of the received rows to
    expert-major order and back. The trace's batched expert products (planner.simulate.traces
    .batched_experts) become the per-expert ops planner.arch.moe.Experts' loop launches."""
    if not experts or not has_experts(ops):
        return list(ops)
    scale = ep * imbalance if ep > 1 else 1.0
    combined = _expert_output(ops)
    body = [op for op in ops if is_expert_op(op) and op is not combined]
    batched = bool(body) and all(_stacked(op) == experts for op in body)
    if not batched and ep == 1:
        return list(ops)
    local = experts // ep
    if batched:   # the first expert's ops carry the stack's parameters; the others repeat one object each
        first, rest = ([_one_expert(op, scale, ep, first=is_first) for op in body] for is_first in (True, False))
        groups = [first] + [rest] * (local - 1)
    else:
        groups = _loop_groups(body, experts, local, scale, ep)
    out = []
    for op in ops:
        if not is_expert_op(op):
            out.append(op)
        elif op is body[0]:
            out += [o for group in groups for o in group]
        elif op is combined:
            rows = replace(op, bytes_read=op.bytes_read * scale / ep, bytes_written=op.bytes_written * scale / ep)
            out.append(rows)
            if ep > 1:   # into expert-major order and back (torchtitan _permute / _unpermute)
                permute = replace(rows, target=PERMUTE, name=PERMUTE, bytes_read=rows.bytes_written, params=())
                out += [permute, permute]
    return out


def imbalance_saved_bytes(ops, experts: int, ep: int, imbalance: float) -> float:
    """The activations the busiest rank's experts save beyond a balanced rank's: (F - 1) x the
    routed rows x what a SwiGLU expert keeps per row - its input (h) and the gate output, its
    activation, the up output and their product (4 x f), in the experts' dtype. An estimate
    from the SwiGLU's saved tensors, not a measurement; 0 when balanced."""
    if ep == 1 or imbalance == 1.0 or not experts:
        return 0.0
    gemms = [op for op in ops if is_expert_op(op) and op.gemm is not None]
    if not gemms:
        return 0.0
    first = gemms[0]
    _, h, f = first.gemm[-3:]
    rows = sum(op.gemm[-3] * (op.gemm[0] if len(op.gemm) == 4 else 1) for op in gemms[:1]) if len(first.gemm) == 4 \
        else sum(op.gemm[0] for op in gemms[::3])
    element = first.bytes_written / max(1, (first.gemm[0] if len(first.gemm) == 4 else 1) * first.gemm[-3] * f)
    return (imbalance - 1.0) * rows * (h + 4 * f) * element


def _stacked(op: OpInfo) -> int:
    """The experts a batched op runs at once (the leading dimension of its product or output)."""
    if op.gemm is not None:
        return op.gemm[0] if len(op.gemm) == 4 else 0
    return int(op.output_shape[0]) if len(op.output_shape) == 3 else 0


def _one_expert(op: OpInfo, scale: float, ep: int, first: bool) -> OpInfo:
    """One expert's share of a batched expert op, on `scale` times its rows."""
    stacked = _stacked(op)
    params = dict(param_count=op.param_count // ep if first else 0,
                  param_bytes=op.param_bytes // ep if first else 0, params=op.params if first else ())
    if op.gemm is not None:
        _, m, k, n = op.gemm
        rows = max(1, round(m * scale))
        element = op.bytes_read / max(1, stacked * (m * k + k * n))
        share = rows / max(m, 1) / stacked   # of the batched op's activations and FLOPs
        return replace(op, gemm=(rows, k, n), output_shape=(rows, n), fwd_flops=op.fwd_flops * share,
                       bwd_flops=op.bwd_flops * share, bytes_read=element * (rows * k + k * n),
                       bytes_written=op.bytes_written * share, **params)
    m = int(op.output_shape[1])
    rows = max(1, round(m * scale))
    return replace(op, output_shape=(rows, *op.output_shape[2:]), bytes_read=op.bytes_read / stacked * rows / max(m, 1),
                   bytes_written=op.bytes_written / stacked * rows / max(m, 1), **params)


def _loop_groups(body: list, experts: int, local: int, scale: float, ep: int) -> list:
    """The first `local` experts' ops of a traced loop (uneven rows), each on `scale` times its rows."""
    per_expert = len(body) // experts
    return [[_taller(op, scale, ep) for op in body[e * per_expert:(e + 1) * per_expert]] for e in range(local)]


def _taller(op: OpInfo, scale: float, ep: int) -> OpInfo:
    """One local expert's op on `scale` times the rows; its share of the stacked weights."""
    params = dict(param_count=op.param_count // ep, param_bytes=op.param_bytes // ep)
    if op.gemm is not None and len(op.gemm) == 3:
        m, k, n = op.gemm
        rows = max(1, round(m * scale))
        element = op.bytes_read / max(1, m * k + k * n)
        return replace(op, gemm=(rows, k, n), fwd_flops=op.fwd_flops * rows / max(m, 1),
                       bwd_flops=op.bwd_flops * rows / max(m, 1), bytes_read=element * (rows * k + k * n),
                       bytes_written=op.bytes_written * rows / max(m, 1), **params)
    return replace(op, bytes_read=op.bytes_read * scale, bytes_written=op.bytes_written * scale, **params)

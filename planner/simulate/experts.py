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
    """The block's ops as the busiest rank of an ep group runs them: E/ep local experts, each
    on ep * imbalance times the rows the trace gave it, their parameters 1/ep of the stack,
    plus the permutation of the received rows to expert-major order and back."""
    if ep == 1 or not experts:
        return list(ops)
    expert_ops = [op for op in ops if is_expert_op(op)]
    combined = _expert_output(ops)
    per_expert = (len(expert_ops) - (combined is not None)) // experts
    keep = per_expert * (experts // ep)
    scale = ep * imbalance
    out, seen = [], 0
    for op in ops:
        if not is_expert_op(op):
            out.append(op)
            continue
        if op is combined:
            rows = replace(op, bytes_read=op.bytes_read * imbalance, bytes_written=op.bytes_written * imbalance)
            out.append(rows)
            permute = replace(rows, target=PERMUTE, name=PERMUTE, bytes_read=rows.bytes_written, params=())
            out += [permute, permute]   # before the experts and after them (torchtitan _permute / _unpermute)
            continue
        seen += 1
        if seen > keep:
            continue
        out.append(_taller(op, scale, ep))
    return out


def _taller(op: OpInfo, scale: float, ep: int) -> OpInfo:
    """One local expert's op on `scale` times the rows; its share of the stacked weights."""
    params = dict(param_count=op.param_count // ep, param_bytes=op.param_bytes // ep)
    if op.gemm is not None and len(op.gemm) == 3:
        m, k, n = op.gemm
        rows = max(1, round(m * scale))
        weight = k * n * (op.bytes_read // max(1, m * k + k * n) if m * k + k * n else 0)
        return replace(op, gemm=(rows, k, n), fwd_flops=op.fwd_flops * rows / max(m, 1),
                       bwd_flops=op.bwd_flops * rows / max(m, 1),
                       bytes_read=(op.bytes_read - weight) * scale + weight,
                       bytes_written=op.bytes_written * scale, **params)
    return replace(op, bytes_read=op.bytes_read * scale, bytes_written=op.bytes_written * scale, **params)

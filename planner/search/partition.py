"""Pipeline stage partition and per-layer activation checkpointing, chosen together.

Given one candidate (degrees, ZeRO stage, micro-batch, schedule), decide how many
blocks each pipeline rank holds and which of them are checkpointed, so that every
rank fits its memory budget and the slowest rank is as fast as possible.

Formulation (an exact bottleneck search over a closed-form inner problem)
-------------------------------------------------------------------------
Data, per pipeline rank r = 0..P-1 (from the simulator's own per-layer numbers):
  f_r        extra time of the non-block layers r holds (embedding on rank 0, the head
             and loss on rank P-1), forward + backward, per micro-batch
  g_r        their memory: model states + in-flight activations + the rank's working set
             (twice its largest op output: gradient in and out) + FSDP's gathered layers
  k_r        micro-batches whose activations rank r holds at its peak (1F1B: P - r,
             GPipe: all, interleaved: from the schedule's action list / chunks)
and per block, for each checkpoint mode c in C = {none} + R, R = {attention, selective,
full} (planner.plan.CHECKPOINT_MODES):
  T_c        forward + backward (+ recomputation) time per micro-batch
  A_c        activation bytes kept per micro-batch
  S          model-state bytes (by ZeRO stage; ZeRO-2 adds its gathered copy).
Decision: n_r >= 1 blocks on rank r (sum_r n_r = L), and on each rank x_{r,c} blocks
recomputed in mode c in R (sum_c x_{r,c} <= n_r; the others keep everything).

  minimise    max_r  tau_r(n_r)                                    (bottleneck stage)
  tau_r(n)  = min_x  f_r + n T_none + sum_{c in R} x_c (T_c - T_none)
  subject to  memory_fits:  g_r + n S + k_r (n A_none - sum_{c in R} x_c (A_none - A_c)) <= B_r
              checkpoint_count:  sum_{c in R} x_c <= n,  x_c >= 0 integers

The inner problem (`_checkpoint_cost`) has |R| = 3 variables but two constraints, so a
vertex of its LP relaxation has at most two non-zero x_c: the optimum takes all its
savings from one mode (memory_fits tight), or checkpoints every block with the mix of two
modes that just fits (both tight). Each of those vertices - one per mode, one per pair of
modes - is evaluated in closed form and rounded up to whole blocks (a pair's more-saving
mode rounded up may leave the other mode fewer blocks to cover), and the cheapest is
kept (`_vertices`). tau_r(n) is non-decreasing in n (a block more adds time and
needs more savings), so the outer problem is solved exactly by bisection over the
distinct values of the (P x L) table tau: a bottleneck T is feasible iff every rank
can take at least one block within T and the ranks' largest such n_r sum to >= L
(`_largest_blocks_within`). Ranks then take their largest n_r in order, leaving at
least one block for each later rank.

The interleaved schedule keeps Megatron's even split of blocks over virtual stages
(its chunks must stay balanced round-robin); only checkpointing is chosen per rank.
A user-pinned checkpoint mode fixes x (every block in that mode).
The estimates here drive the search; `planner.simulate` then prices the chosen split
exactly, and the search tightens a rank's budget by any excess the simulation finds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cost_models.memory import gathered_param_bytes
from planner.plan import CHECKPOINT_MODES, RECOMPUTE_MODES, even_stages

MODES = CHECKPOINT_MODES
# a rank's recomputed blocks come first, in this order (most recomputed first)
PLACEMENT_ORDER = tuple(reversed(RECOMPUTE_MODES))


@dataclass
class Partition:
    stages: list              # [[first_block, end_block), ...] per virtual stage
    checkpoint: list          # mode per block
    stage_time_s: list        # estimated forward + backward per micro-batch, per rank
    stage_memory_bytes: list  # estimated peak allocated per rank

    @property
    def bottleneck_s(self) -> float:
        return max(self.stage_time_s)


@dataclass
class _BlockCosts:
    time_s: dict      # mode -> forward + backward (+ recompute) per micro-batch
    act_bytes: dict   # mode -> saved activations (+ autocast weight copies) per micro-batch
    state_bytes: float


class StageCosts:
    """The per-rank data of the formulation, read off a `planner.simulate.step._Simulation`."""

    def __init__(self, sim, in_flight: list[int], modes: tuple = RECOMPUTE_MODES):
        self.sim, plan = sim, sim.plan
        self.modes = modes   # the recompute modes the plan's engine offers (planner.engines.Engine.recompute)
        self.pp, self.v = plan.pp, plan.interleave
        self.blocks = sim.traced.blocks
        self.k = np.array([k / self.v for k in in_flight], dtype=float)
        self.block = self._block_costs(typical_block(sim.traced))
        self.f = np.zeros(self.pp)
        self.g = np.zeros(self.pp)
        first, last = self.blocks[0], self.blocks[-1]
        for layer in sim.traced.layers:
            if layer.kind == "block":
                continue
            rank = 0 if layer.index < first else self.pp - 1 if layer.index > last else None
            if rank is None:
                continue
            times = sim.layer_times(layer.index, "none")
            t = sim.timing(layer.index)
            self.f[rank] += times.fwd_s + times.bwd_s
            self.g[rank] += self._states(t) + self.k[rank] * (t.saved_bytes + t.param_copy_bytes)
        self.g += self._working_bytes() + self._gathered_bytes()

    def _states(self, t) -> float:
        return self.sim.layer_state_bytes(t.params_per_gpu, t.expert_params_per_gpu)

    def _block_costs(self, index: int) -> _BlockCosts:
        sim = self.sim
        t = sim.timing(index)
        fsdp_mixed = sim.traced.cast == "params"
        time_s, act = {}, {}
        for mode in MODES:
            times = sim.layer_times(index, mode)
            time_s[mode] = times.fwd_s + times.bwd_s
            copies = 0.0 if fsdp_mixed or mode == "full" else t.param_copy_bytes
            act[mode] = t.saved_for(mode) + copies
        return _BlockCosts(time_s, act, self._states(t))

    def _working_bytes(self) -> np.ndarray:
        """The worst moment of a backward walk, beyond the activations still held: a layer's
        backward needs twice its largest op output (gradient in and out), and a
        checkpointed block its recomputed activations too. The head and embedding run
        their backward first and last, when the blocks' recomputation is not live."""
        sim, tp = self.sim, max(1, self.sim.plan.tp)
        first, last = self.blocks[0], self.blocks[-1]
        typical = typical_block(sim.traced)
        t = sim.timing(typical)
        block_op = max((op.bytes_written for op in sim.traced.cost_of(typical).ops), default=0)
        working = np.full(self.pp, 2 * block_op / tp + (t.saved_bytes - t.saved_bytes_full)
                          + sim.dispatch_buffer_bytes([t]))
        for layer in sim.traced.layers:
            if layer.kind != "block":
                rank = 0 if layer.index < first else self.pp - 1 if layer.index > last else 0
                ops = sim.traced.cost_of(layer.index).ops
                working[rank] = max(working[rank], 2 * max((op.bytes_written for op in ops), default=0) / tp)
        return working

    def _gathered_bytes(self) -> float:
        plan = self.sim.plan
        if plan.zero != 3 or self.sim.keeps_every_layer_gathered:   # else counted in each layer's states
            return 0.0
        params = self.sim.timing(typical_block(self.sim.traced)).params_per_gpu
        return gathered_param_bytes(3, plan.precision, [params] * 2)


def typical_block(traced) -> int:
    """The block the partition prices every block by: the first of the most common kind (an
    MoE model's leading dense blocks are the few; every zoo model's blocks are otherwise alike)."""
    counts = {}
    for index in traced.blocks:
        counts.setdefault(traced.layers[index].signature, []).append(index)
    return max(counts.values(), key=len)[0]


def _checkpoint_cost(costs: StageCosts, n: np.ndarray, budget: np.ndarray, pinned: str | None):
    """Least recomputation time fitting n blocks per rank, and the blocks of each recompute
    mode ({mode: count} over RECOMPUTE_MODES).

    `n` and `budget` broadcast to (ranks, sizes). Infeasible entries get inf time."""
    b, k = costs.block, costs.k[:, None]
    g = costs.g[:, None]
    n = np.broadcast_to(n, np.broadcast_shapes(n.shape, g.shape, np.shape(budget))).astype(float)
    zero = np.zeros_like(n)
    if pinned is not None:
        mem = g + n * b.state_bytes + k * n * b.act_bytes[pinned]
        extra = n * (b.time_s[pinned] - b.time_s["none"])
        return np.where(mem <= budget, extra, np.inf), {m: n if m == pinned else zero for m in RECOMPUTE_MODES}
    need = g + n * b.state_bytes + k * n * b.act_bytes["none"] - budget   # bytes to save
    options = _vertices(b, k, n, need, costs.modes)
    times = np.stack([time for time, _ in options])
    best = np.argmin(times, axis=0)
    cost = np.where(need <= 0, 0.0, times.min(axis=0))
    blocks = np.stack([np.stack([np.broadcast_to(c.get(m, zero), n.shape) for m in RECOMPUTE_MODES])
                       for _, c in options])                      # (option, mode, ranks, sizes)
    chosen = np.take_along_axis(blocks, best[None, None], axis=0)[0]
    chosen = np.nan_to_num(np.where(need <= 0, 0, chosen), posinf=0)
    return cost, dict(zip(RECOMPUTE_MODES, chosen))


def _vertices(b: _BlockCosts, k: np.ndarray, n: np.ndarray, need: np.ndarray, modes: tuple) -> list:
    """The inner LP's candidate vertices as (extra time, {mode: blocks}), inf where one does
    not fit: every saving from one of `modes`, or every block recomputed with two modes' mix."""
    save = {m: k * (b.act_bytes["none"] - b.act_bytes[m]) for m in modes}   # per block
    extra_s = {m: b.time_s[m] - b.time_s["none"] for m in modes}
    options = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in modes:
            x = np.where(save[m] > 0, np.ceil(np.maximum(need, 0) / save[m]), np.inf)
            options.append((np.where(x <= n, extra_s[m] * x, np.inf), {m: x}))
        for pair in itertools.combinations(modes, 2):
            low, high = sorted(pair, key=lambda m: b.act_bytes[m], reverse=True)   # high saves more
            y = np.where(save[high] > save[low], np.ceil((need - n * save[low]) / (save[high] - save[low])), np.inf)
            y = np.clip(y, 0, None)
            # y rounded up saves more than the LP vertex needs: the low mode then covers what
            # is left, which may spare some blocks (they keep everything)
            x = np.where(save[low] > 0, np.ceil(np.maximum(need - y * save[high], 0) / save[low]), n - y)
            x = np.minimum(x, n - y)
            fits = (y <= n) & (save[low] * x + save[high] * y >= need)
            options.append((np.where(fits, extra_s[low] * x + extra_s[high] * y, np.inf), {low: x, high: y}))
    return options


def _largest_blocks_within(table: np.ndarray, bottleneck_s: float) -> np.ndarray:
    """Per rank, the most blocks whose time stays within the bottleneck (tau is monotone)."""
    return (table <= bottleneck_s).sum(axis=1)


def partition(costs: StageCosts, budget_bytes, pinned_checkpoint: str | None = None) -> Partition | None:
    """Best stage split and checkpointing under per-rank budgets; None when nothing fits."""
    blocks = len(costs.blocks)
    budget = np.broadcast_to(np.asarray(budget_bytes, dtype=float), (costs.pp,))[:, None]
    if costs.v > 1 or costs.pp == 1:
        return _fixed_split(costs, budget, pinned_checkpoint)
    sizes = np.arange(1, blocks - costs.pp + 2)[None, :]
    extra, _ = _checkpoint_cost(costs, sizes, budget, pinned_checkpoint)
    table = costs.f[:, None] + sizes * costs.block.time_s["none"] + extra
    table = np.maximum.accumulate(table, axis=1)   # guard monotonicity against rounding
    values = np.unique(table[np.isfinite(table)])
    lo, hi = 0, len(values) - 1
    if hi < 0 or not _feasible(table, values[hi], blocks):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(table, values[mid], blocks):
            hi = mid
        else:
            lo = mid + 1
    counts = _assign(_largest_blocks_within(table, values[lo]), blocks)
    return _build(costs, counts, budget[:, 0], pinned_checkpoint)


def _feasible(table: np.ndarray, bottleneck_s: float, blocks: int) -> bool:
    most = _largest_blocks_within(table, bottleneck_s)
    return bool(most.min() >= 1 and most.sum() >= blocks)


def _assign(most: np.ndarray, blocks: int) -> list[int]:
    counts, left = [], blocks
    ranks = len(most)
    for r, m in enumerate(most):
        take = int(min(m, left - (ranks - r - 1)))
        counts.append(take)
        left -= take
    return counts


def _fixed_split(costs: StageCosts, budget: np.ndarray, pinned: str | None) -> Partition | None:
    """Even split over virtual stages (pp == 1 or interleaved): choose checkpointing only."""
    bounds = even_stages(len(costs.blocks), costs.pp * costs.v)
    counts = [sum(e - s for c, (s, e) in enumerate(bounds) if c % costs.pp == r) for r in range(costs.pp)]
    result = _build(costs, counts, budget[:, 0], pinned, bounds)
    return result if all(np.isfinite(result.stage_time_s)) else None


def _build(costs: StageCosts, counts: list[int], budget: np.ndarray, pinned: str | None,
           bounds: list | None = None) -> Partition:
    n = np.array(counts, dtype=float)[:, None]
    extra, recomputed = _checkpoint_cost(costs, n, budget[:, None], pinned)
    blocks_in = {m: recomputed[m][:, 0].astype(int) for m in RECOMPUTE_MODES}
    if bounds is None:
        edges = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        bounds = [[int(edges[r]), int(edges[r + 1])] for r in range(costs.pp)]
    # a rank's recomputed blocks come first, in PLACEMENT_ORDER; the rest keep everything
    modes = [[m for m in PLACEMENT_ORDER for _ in range(blocks_in[m][r])] for r in range(costs.pp)]
    checkpoint = ["none"] * len(costs.blocks)
    placed = [0] * costs.pp            # blocks of each rank given a mode so far
    for c, (s, e) in enumerate(bounds):
        r = c % costs.pp
        for block in range(s, e):
            checkpoint[block] = modes[r][placed[r]] if placed[r] < len(modes[r]) else "none"
            placed[r] += 1
    b = costs.block
    times = costs.f + n[:, 0] * b.time_s["none"] + extra[:, 0]
    kept = n[:, 0] - sum(blocks_in.values())
    activations = kept * b.act_bytes["none"] + sum(blocks_in[m] * b.act_bytes[m] for m in RECOMPUTE_MODES)
    memory = costs.g + n[:, 0] * b.state_bytes + costs.k * activations
    return Partition(bounds, checkpoint, [float(t) for t in times], [float(m) for m in memory])


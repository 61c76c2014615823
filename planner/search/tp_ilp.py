"""Intra-layer tensor-parallel layout: an ILP over one traced block, solved once per block signature.

The block graph and the strategies' costs come from planner.search.tp_graph; this module
builds the ILP below over them, solves it and reads the layout back.

The block graph (`block_graph`)
    Nodes are the ops of `LayerCost.compute_graph()` (linears, attention, bmm, norms, ...),
    the residual adds (elementwise ops that add two residual-stream tensors) and two pseudo
    nodes, `input` and `output`: the residual stream entering and leaving the block. An edge
    i -> j means j consumes i's value through ops that decide nothing (casts, views, GELU,
    SiLU, RoPE); those ops are *attached* to the decision op whose value they transform
    (its nearest decision ancestor, or for a weight's cast the linear that owns the weight)
    and their time scales with that op's sharding.

Placements of a value: R (replicated), P (partial sums: each rank holds a summand), S(-1)
(split on the last, feature/head dimension), S(seq) (split on the sequence). A value's
gradient has placement R for R and P values, and the value's own split for S values.

Strategies (`STYLES`: input placement, input-gradient placement, output placement)
    replicate  R, R, R          full weight, full work
    colwise    R, P, S(-1)      linear: weight split on output features (Megatron's f then
                                column-parallel: the input gradient is a partial sum)
    rowwise    S(-1), S(-1), P  linear: weight split on input features
    heads      S(-1), S(-1), S(-1)  attention / bmm: heads (the bmm batch) split
    sequence   S(seq), S(seq), S(seq)  norm / residual add under sequence parallelism
    The residual stream's placement is the plan's, not a decision: the runtime keeps it
    replicated, or sequence-split under sequence parallelism (`runtime.parallelize.
    resolve_layout` requires every norm to be "sequence" exactly then), so `input`, `output`,
    norms and residual adds are offered that one strategy: replicate, or sequence with SP.
    Other strategies are offered when tp > 1 divides what they split (features, heads, kv heads).
    A strategy costs compute_s[n,s] (forward + backward of the op and its attached ops on the
    ComputeModel, work divided by tp where split; an unfused attention's softmax and dropout
    at the score rate, as the simulator prices them) and memory_bytes[n,s] (parameter bytes /
    tp where split, times `param_state_factor`, plus the op's output bytes / tp where split:
    a proxy for the activations kept; a rowwise linear's bias is kept whole, as the runtime
    keeps it: planner.simulate.costing.linear_param_share).

Variables
    x[n,s] in {0,1}: node n runs strategy s.
    e[i,j,a,b] >= 0 per edge i -> j and strategy pair: i runs a and j runs b.
    fwd[i,src,dst] >= 0: i's value is converted from src to dst in forward (one per value
    and conversion, however many consumers need it: llama's q, k and v share one gather).
    bwd[i,src,dst] >= 0: the sum of i's consumers' input gradients (placement src) is
    converted to i's gradient placement dst in backward.

Constraints (named as in the code)
    one_strategy[n]:        sum_s x[n,s] = 1
    edge_out[i,j,a]:        sum_b e[i,j,a,b] = x[i,a]     (the sum-consistency linearisation:
    edge_in[i,j,b]:         sum_a e[i,j,a,b] = x[j,b]      e is the product x[i,a] x[j,b])
    shards_stay_local[i,j]: on an edge inside an attention or MLP region (neither end reads or
                            writes the residual stream) the pairs where exactly one end is
                            S(-1) are 0: the runtime hands local shards from a colwise module
                            to a rowwise one and cannot gather or slice them in between.
                            For a file.py:factory block (`factory`) on every edge, and no
                            "heads" strategy: the runtime splits only linears.
    fwd_reshard[i,j,src,dst]: fwd[i,src,dst] >= sum of e[i,j,a,b] with out(a)=src, in(b)=dst
    bwd_reshard[i,j,src,dst]: bwd[i,src,dst] >= sum of e[i,j,a,b] with grad_in(b)=src,
                            grad(out(a))=dst
    one_style_per_name[i,j,s]: x[i,s] = x[j,s] for two linears or norms with one layout name
                            (one module called twice, one weight; or GPT-2's two c_proj: the
                            layout, like the cost model, keys a style by the module's name)
    memory_budget:          sum memory_bytes[n,s] x[n,s] <= memory_budget_bytes (when given)
    exclude_k:              the k-th layout in `exclude` is not chosen again (no-good cut)

Resharding (`reshard_kind`; nbytes is the unsharded value): same placement or R -> S: free
(a local slice); P -> R all-reduce; P -> S reduce-scatter; S -> R all-gather; S -> other S
all-to-all. Priced by `CommModel` on the TP group. Backward conversions make Megatron's
operators fall out: a colwise linear returns a partial input gradient, so the replicated
norm output feeding it costs an all-reduce in backward (f); a rowwise linear's partial output
costs an all-reduce before the residual add (g), free in backward. Under sequence
parallelism the same edges price an all-gather / reduce-scatter pair instead. When a
value's consumers return gradients in different placements, each distinct conversion is
charged (an upper bound; exact when they agree, as in Megatron's layout).

Objective: sum compute_s x + sum comm_s (fwd + bwd) + TIE_BREAK_S per collective, the time
of one micro-batch's forward and backward through the block on one GPU. The solvers see
microseconds and KiB and run with zero optimality gap. On GPT-3 1.3B and Llama-3 8B blocks
(seq 2048, A100 NVLink, tp 2 and 8) Megatron's layout is the optimum and the runner-up
costs 7-28 % more (tests/search/test_tp_ilp.py checks > 2 %), so the tie-break (a nanosecond a
collective: prefer fewer collectives) only settles exact ties, e.g. on degenerate sizes.

Solvers: HiGHS (highspy) by default, CBC (PuLP's bundled binary) as the fallback. PuLP
calls a time-limited solve "Optimal"; `TpLayout.status` comes from `sol_status` instead:
"optimal" only when proven, "feasible" when the time limit stopped it with a layout.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import pulp

from cost_models.comm import CommModel, GroupPlacement
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.units import US
from planner.ir import LayerCost, TracedModel
from planner.search.tp_graph import (GRAD_PLACEMENT, LAYOUT_KINDS, P, R, S_LAST, S_SEQ, STREAM_KINDS, BlockGraph,
                                     CostSetting, block_graph, reshard_kind, strategies)
from planner.simulate.costing import score_shapes

TAGS = {R: "R", P: "P", S_LAST: "Sl", S_SEQ: "Ss"}
TIE_BREAK_S = 1e-9
# The ILP counts time in microseconds and memory in KiB: the solvers' absolute tolerances
# (1e-6 and below) then sit far under a nanosecond or a byte.
OBJECTIVE_UNIT_S = US
MEMORY_UNIT_BYTES = 1024
SOL_STATUS = {1: "optimal", 2: "feasible"}
SHORT = {"forward": "fwd", "backward": "bwd"}


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Collective:
    """One collective of the chosen layout: on `value` (the producing node's label)."""

    direction: str      # forward | backward
    kind: str           # all_reduce | reduce_scatter | all_gather | all_to_all
    value: str
    nbytes: float
    time_s: float


@dataclass
class TpLayout:
    """The solved layout of one block signature."""

    layout: dict            # {block-relative module name: style}, what Plan.tp_layout takes
    strategies: dict        # {node label: style} for every node, attention included
    objective_s: float
    compute_s: float
    comm_s: float           # per forward + backward of one micro-batch
    memory_bytes: float
    collectives: list
    solver: str
    status: str             # optimal (proven) | feasible (stopped at the time limit)
    solve_s: float
    variables: int
    constraints: int

    def count(self, direction: str | None = None, kind: str | None = None) -> int:
        return sum(1 for c in self.collectives
                   if direction in (None, c.direction) and kind in (None, c.kind))


@dataclass
class BlockLayouts:
    """Layouts of a traced model's blocks: one solve per unique block signature."""

    by_signature: dict      # signature -> TpLayout
    layer_signature: dict   # block layer name ("blocks.3") -> signature
    solves: int

    def plan_layout(self) -> dict:
        """Plan.tp_layout: block-relative when every block agrees, else per layer."""
        layouts = {tuple(sorted(t.layout.items())) for t in self.by_signature.values()}
        if len(layouts) == 1:
            return dict(next(iter(layouts)))
        return {f"{layer}.{name}": style for layer, sig in self.layer_signature.items()
                for name, style in self.by_signature[sig].layout.items()}

# ----------------------------------------------------------------------------- the ILP

class _Ilp:
    """The formulation of the module docstring, on one block graph."""

    def __init__(self, bg: BlockGraph, options: dict, setting: CostSetting):
        self.bg, self.options, self.setting = bg, options, setting
        self.index = {n: i for i, n in enumerate(bg.graph.nodes)}
        self.prob = pulp.LpProblem("tp_layout", pulp.LpMinimize)
        self.x = {(n, s.style): self._var(f"x_{self.index[n]}_{s.style}", cat="Binary")
                  for n, opts in options.items() for s in opts}
        self.conv = {}      # (direction, node, src, dst) -> (variable, collective kind, nbytes, time_s)
        for n, opts in options.items():
            self.prob += pulp.lpSum(self.x[n, s.style] for s in opts) == 1, f"one_strategy_{self.index[n]}"
        for k, (i, j) in enumerate(bg.graph.edges):
            self._edge(k, i, j)
        self._one_style_per_name()

    def _var(self, name: str, **kw) -> pulp.LpVariable:
        """PuLP >= 3.3 attaches variables to the problem; older versions construct them."""
        if hasattr(self.prob, "add_variable"):
            return self.prob.add_variable(name, **kw)
        return pulp.LpVariable(name, **kw)

    def _edge(self, k: int, i: str, j: str):
        pairs = [(a, b) for a in self.options[i] for b in self.options[j]]
        e = {(a.style, b.style): self._var(f"e_{k}_{a.style}_{b.style}", lowBound=0) for a, b in pairs}
        for a in self.options[i]:
            self.prob += pulp.lpSum(e[a.style, b.style] for b in self.options[j]) == self.x[i, a.style], \
                f"edge_out_{k}_{a.style}"
        for b in self.options[j]:
            self.prob += pulp.lpSum(e[a.style, b.style] for a in self.options[i]) == self.x[j, b.style], \
                f"edge_in_{k}_{b.style}"
        if self.setting.factory or (self.bg.ops[i].kind not in STREAM_KINDS
                                    and self.bg.ops[j].kind not in STREAM_KINDS):
            crossing = [e[a.style, b.style] for a, b in pairs if (a.out == S_LAST) != (b.inp == S_LAST)]
            if crossing:
                self.prob += pulp.lpSum(crossing) == 0, f"shards_stay_local_{k}"
        self._reshards(k, i, pairs, e)

    def _reshards(self, k: int, i: str, pairs: list, e: dict):
        """fwd_reshard / bwd_reshard: edge k's conversions of node i's value and gradient."""
        forward, backward = defaultdict(list), defaultdict(list)
        for a, b in pairs:
            forward[a.out, b.inp].append(e[a.style, b.style])
            backward[b.grad_in, GRAD_PLACEMENT[a.out]].append(e[a.style, b.style])
        for direction, groups in (("forward", forward), ("backward", backward)):
            for (src, dst), terms in groups.items():
                conv = self._conversion(direction, i, src, dst)
                if conv is not None:
                    self.prob += conv >= pulp.lpSum(terms), f"{SHORT[direction]}_reshard_{k}_{TAGS[src]}_{TAGS[dst]}"

    def _conversion(self, direction: str, node: str, src: str, dst: str):
        kind = reshard_kind(src, dst)
        if kind is None:
            return None
        key = (direction, node, src, dst)
        if key not in self.conv:
            nbytes = self.bg.value_bytes[node] / (self.setting.tp if kind == "all_to_all" else 1)
            time_s = self.setting.comm.time_s(kind, nbytes, self.setting.group)
            var = self._var(f"{SHORT[direction]}_{self.index[node]}_{TAGS[src]}_{TAGS[dst]}", lowBound=0)
            self.conv[key] = (var, kind, nbytes, time_s)
        return self.conv[key][0]

    def _one_style_per_name(self):
        first = {}
        for n, name in self.bg.modules.items():
            if not name or self.bg.ops[n].kind not in LAYOUT_KINDS:
                continue
            other = first.setdefault(name, n)
            if other == n:
                continue
            for style in {s.style for s in self.options[n]} | {s.style for s in self.options[other]}:
                self.prob += self.x.get((n, style), 0) == self.x.get((other, style), 0), \
                    f"one_style_per_name_{self.index[other]}_{self.index[n]}_{style}"

    def memory_budget(self, budget_bytes: float):
        self.prob += pulp.lpSum(s.memory_bytes / MEMORY_UNIT_BYTES * self.x[n, s.style]
                                for n, opts in self.options.items()
                                for s in opts) <= budget_bytes / MEMORY_UNIT_BYTES, "memory_budget"

    def exclude(self, k: int, layout: dict):
        terms = [self.x.get((n, layout[m])) for n, m in self.bg.modules.items()
                 if m in layout and self.bg.ops[n].kind in LAYOUT_KINDS]
        if terms and all(t is not None for t in terms):
            self.prob += pulp.lpSum(terms) <= len(terms) - 1, f"exclude_{k}"

    def objective(self):
        unit = OBJECTIVE_UNIT_S
        self.prob += (pulp.lpSum(s.compute_s / unit * self.x[n, s.style] for n, opts in self.options.items()
                                 for s in opts)
                      + pulp.lpSum((t + TIE_BREAK_S) / unit * var for var, _, _, t in self.conv.values()))


# ----------------------------------------------------------------------------- public API

def solve_tp_layout(cost: LayerCost, compute: ComputeModel, comm: CommModel, tp_group: GroupPlacement,
                    precision: str = "bf16", sequence_parallel: bool = False,
                    memory_budget_bytes: float | None = None, param_state_factor: float = 1.0,
                    time_limit_s: float = 10.0, solver: str | None = None, exclude: tuple = (),
                    factory: bool = False) -> TpLayout:
    """The cheapest tensor-parallel layout of one block over `tp_group` (tp = its size).

    `memory_budget_bytes` bounds the block's parameter bytes (times `param_state_factor`, e.g.
    4 for fp32 weights + gradients + AdamW's two moments) plus output activations on one GPU.
    `solver`: "HiGHS" (default when highspy is installed) or "PULP_CBC_CMD". `exclude`: layouts
    ({module name: style}) not to return again, to look at the runner-up. `factory`: the block
    of a file.py:factory model, laid out as the runtime can split it (linears only, each
    column-parallel one feeding row-parallel ones: shards_stay_local on every edge), keyed
    by block-relative module path.
    """
    if factory and sequence_parallel:
        raise MeshplanError("sequence parallelism needs a preset or JSON model: the runtime cannot shard a "
                            "factory model's sequence dimension")
    setting = CostSetting(compute, comm, tp_group, precision, sequence_parallel, param_state_factor,
                          score_shapes(cost.ops), factory)
    bg = block_graph(cost, by_path=factory)
    options = {n: strategies(bg, n, setting) for n in bg.graph.nodes}
    ilp = _Ilp(bg, options, setting)
    if memory_budget_bytes is not None:
        _check_budget(options, memory_budget_bytes, tp_group.size)
        ilp.memory_budget(memory_budget_bytes)
    for k, layout in enumerate(exclude):
        ilp.exclude(k, layout)
    ilp.objective()
    chosen_solver, solve_s, status = _solve(ilp.prob, solver, time_limit_s, memory_budget_bytes, tp_group.size)
    return _result(ilp, chosen_solver, status, solve_s)


def layouts_for(traced: TracedModel, compute: ComputeModel, comm: CommModel, tp_group: GroupPlacement,
                sequence_parallel: bool = False, **options) -> BlockLayouts:
    """One `solve_tp_layout` per unique block signature of `traced`, reused by identical blocks."""
    by_signature, layer_signature = {}, {}
    for index in traced.blocks:
        layer = traced.layers[index]
        layer_signature[layer.name] = layer.signature
        if layer.signature not in by_signature:
            by_signature[layer.signature] = solve_tp_layout(
                traced.cost_of(index), compute, comm, tp_group, traced.precision, sequence_parallel, **options)
    return BlockLayouts(by_signature, layer_signature, solves=len(by_signature))


def _check_budget(options: dict, budget_bytes: float, tp: int):
    least = sum(min(s.memory_bytes for s in opts) for opts in options.values())
    if least > budget_bytes:
        raise MeshplanError(f"a block needs at least {_mib(least)} per GPU at tp {tp} (everything sharded) but "
                            f"the memory budget is {_mib(budget_bytes)}: raise the budget or the tp degree")


def _solve(prob: pulp.LpProblem, name: str | None, time_limit_s: float, budget_bytes, tp: int):
    solver = _solver(name, time_limit_s)
    start = time.perf_counter()
    with _native_stdout_silenced():
        prob.solve(solver)
    solve_s = time.perf_counter() - start
    if prob.status == pulp.LpStatusInfeasible:
        if budget_bytes is None:
            raise MeshplanError(f"no tensor-parallel layout at tp {tp} is left once `exclude` is applied: "
                                f"exclude fewer layouts")
        raise MeshplanError(f"no tensor-parallel layout at tp {tp} fits a block in the memory budget of "
                            f"{_mib(budget_bytes)}: raise the budget or the tp degree")
    if prob.sol_status not in SOL_STATUS:
        raise MeshplanError(f"the TP layout ILP found no layout in {time_limit_s} s "
                            f"({pulp.LpStatus[prob.status]}): raise time_limit_s")
    return solver.name, solve_s, SOL_STATUS[prob.sol_status]


@contextlib.contextmanager
def _native_stdout_silenced():
    """Point file descriptor 1 at /dev/null while the solver runs. highspy >= 1.16 prints its banner
    from C++ when the first Highs object is built, before PuLP can set output_flag off, and that
    line would corrupt `meshplan plan --json`; Python's redirect_stdout cannot catch C writes."""
    sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
    except OSError:   # no file descriptor 1 (closed): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        _flush_c_stdout()   # a piped stdout is block-buffered in libc: drop the banner before restoring
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _flush_c_stdout():
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, TypeError, AttributeError):   # no C runtime to reach this way (Windows)
        pass


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.4g} MiB"


def _solver(name: str | None, time_limit_s: float):
    if name in (None, "HiGHS"):
        highs = pulp.HiGHS(msg=0, timeLimit=time_limit_s, gapRel=0, gapAbs=0)
        if highs.available():
            return highs
        if name:
            raise MeshplanError("HiGHS is not available: pip install highspy, or use solver='PULP_CBC_CMD'")
    if name not in (None, "PULP_CBC_CMD"):
        raise MeshplanError(f"solver {name!r} is unknown; use HiGHS or PULP_CBC_CMD")
    return pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit_s, gapRel=0, gapAbs=0)


def _result(ilp: _Ilp, solver: str, status: str, solve_s: float) -> TpLayout:
    bg = ilp.bg
    chosen = {n: next(s for s in opts if ilp.x[n, s.style].value() > 0.5) for n, opts in ilp.options.items()}
    collectives = [Collective(direction, kind, bg.label(node), nbytes, time_s)
                   for (direction, node, _, _), (var, kind, nbytes, time_s) in ilp.conv.items()
                   if var.value() > 0.5]
    compute_s = sum(s.compute_s for s in chosen.values())
    comm_s = sum(c.time_s for c in collectives)
    layout = {bg.modules[n]: s.style for n, s in chosen.items()
              if bg.modules[n] and bg.ops[n].kind in LAYOUT_KINDS}
    return TpLayout(
        layout=layout, strategies={bg.label(n): s.style for n, s in chosen.items()},
        objective_s=compute_s + comm_s, compute_s=compute_s, comm_s=comm_s,
        memory_bytes=sum(s.memory_bytes for s in chosen.values()), collectives=collectives,
        solver=solver, status=status, solve_s=solve_s,
        variables=ilp.prob.numVariables(), constraints=ilp.prob.numConstraints())

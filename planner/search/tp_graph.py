"""The TP-layout ILP's inputs: one block's graph of decision ops (`block_graph`), the value
placements and styles, and the costed strategies offered to each node (`strategies`). The
formulation is written out in planner.search.tp_ilp, which builds and solves the ILP."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, replace

import networkx as nx
import torch

from cost_models.comm import CommModel, GroupPlacement
from cost_models.compute import ComputeModel, gemm_dims
from cost_models.errors import MeshplanError
from planner.ir import LayerCost, OpInfo
from planner.simulate.costing import linear_param_share, runs_on_scores

R, P, S_LAST, S_SEQ = "R", "P", "S(-1)", "S(seq)"
GRAD_PLACEMENT = {R: R, P: R, S_LAST: S_LAST, S_SEQ: S_SEQ}
STYLES = {  # style -> (input placement, input-gradient placement, output placement)
    "replicate": (R, R, R),
    "colwise": (R, P, S_LAST),
    "rowwise": (S_LAST, S_LAST, P),
    "heads": (S_LAST, S_LAST, S_LAST),
    "sequence": (S_SEQ, S_SEQ, S_SEQ),
}
DECISION_KINDS = ("linear", "matmul", "attention", "conv", "embedding", "norm", "loss")
STREAM_KINDS = ("input", "output", "norm", "residual")   # nodes on the residual stream
LAYOUT_KINDS = ("linear", "norm")                          # the kinds the runtime has styles for


# ----------------------------------------------------------------------------- the block graph

@dataclass
class BlockGraph:
    graph: nx.DiGraph       # decision nodes plus "input" and "output"
    ops: dict               # node -> OpInfo (pseudo-ops for input and output)
    paths: dict             # node -> its module's path in the block ("qkv", "attn.c_proj"), or None
    modules: dict           # node -> the layout key: the path's last name ("qkv", "c_proj"), or None
    value_bytes: dict       # node -> bytes of its unsharded output
    attached: dict          # node -> [(op, "out" | "weight")]: streaming ops it shards

    def label(self, node: str) -> str:
        return self.paths[node] or node


def block_graph(cost: LayerCost, by_path: bool = False) -> BlockGraph:
    """The ILP's graph of one block: decision ops, residual adds, stream input and output.
    `by_path`: a node's layout key is its module's block-relative path ("mlp.fc1"), not its
    last name - a factory model's runtime finds the module by that path."""
    sink, shape = _stream_output(cost)
    adds = {op.name for op in cost.ops if op.kind == "elementwise" and tuple(op.output_shape) == shape
            and sum(tuple(s) == shape for s in op.input_shapes) >= 2}
    graph = cost.graph.copy()
    graph.add_node("input")   # read by no op when the block changes the stream's shape (a strided conv)
    graph.add_edges_from(("input", op.name) for op in cost.ops if _reads_block_input(cost, op, shape))
    graph.add_edge(sink.name, "output")
    ops = [OpInfo("input", "input", "", "", [], shape, sink.dtype),
           *(replace(op, kind="residual") if op.name in adds else op for op in cost.ops),
           OpInfo("output", "output", "", "", [shape], shape, sink.dtype)]
    dg = replace(cost, ops=ops, graph=graph).compute_graph(DECISION_KINDS + ("residual", "input", "output"))
    by_name = {op.name: op for op in ops}
    nodes = {n: by_name[n] for n in dg}
    block_path = os.path.commonprefix([op.module_path.split(".") for op in cost.ops if op.module_path])
    paths = {n: _block_path(op, len(block_path)) for n, op in nodes.items()}
    modules = {n: path if by_path or not path else path.rsplit(".", 1)[-1] for n, path in paths.items()}
    value_bytes = {n: math.prod(map(int, op.output_shape)) * _itemsize(op.dtype) for n, op in nodes.items()}
    return BlockGraph(dg, nodes, paths, modules, value_bytes, _attach(cost, nodes))


def _stream_output(cost: LayerCost) -> tuple[OpInfo, tuple]:
    sinks = [op for op in cost.ops if cost.graph.out_degree(op.name) == 0 and op.output_shape]
    if not sinks or len(sinks[-1].output_shape) < 2:
        raise MeshplanError(f"layer {cost.signature[:12]} returns no residual stream tensor; the TP layout "
                            f"ILP needs a block whose output is (batch, seq, hidden)")
    return sinks[-1], tuple(sinks[-1].output_shape)


def _reads_block_input(cost: LayerCost, op: OpInfo, shape: tuple) -> bool:
    """More stream-shaped inputs than stream-shaped producers: one of them is the block input."""
    produced = sum(tuple(cost.op(p).output_shape) == shape for p in cost.graph.predecessors(op.name))
    return sum(tuple(s) == shape for s in op.input_shapes) > produced


def _block_path(op: OpInfo, block_depth: int) -> str | None:
    parts = op.module_path.split(".") if op.module_path else []
    return ".".join(parts[block_depth:]) or None


def _attach(cost: LayerCost, nodes: dict) -> dict:
    """Non-decision ops -> the decision node whose sharding decides their work."""
    owner, attached = {}, defaultdict(list)
    by_module = {op.module_path: n for n, op in nodes.items() if op.kind in ("linear", "conv")}
    for op in cost.ops:
        if op.name in nodes:
            owner[op.name] = op.name
            continue
        owners = [owner[p] for p in cost.graph.predecessors(op.name) if owner.get(p)]
        owner[op.name] = owners[0] if owners else None
        if op.kind == "view":
            continue
        if owners:
            attached[owners[0]].append((op, "out"))
        elif op.module_path in by_module:
            attached[by_module[op.module_path]].append((op, "weight"))
    return attached


def _itemsize(dtype: str) -> int:
    return getattr(torch, str(dtype).replace("torch.", "")).itemsize


# ----------------------------------------------------------------------------- strategies

@dataclass(frozen=True)
class Strategy:
    style: str
    compute_s: float        # forward + backward of the node and its attached ops
    memory_bytes: float     # parameters (x param_state_factor) + output activation, this GPU

    @property
    def inp(self) -> str:
        return STYLES[self.style][0]

    @property
    def grad_in(self) -> str:
        return STYLES[self.style][1]

    @property
    def out(self) -> str:
        return STYLES[self.style][2]


@dataclass(frozen=True)
class CostSetting:
    """What the strategy costs depend on, besides the block."""

    compute: ComputeModel
    comm: CommModel
    group: GroupPlacement
    precision: str
    sequence_parallel: bool
    param_state_factor: float
    scores: frozenset = frozenset()   # the block's attention score tensors (costing.score_shapes)
    # a file.py:factory model: the runtime splits linears alone (runtime.modules), handing a
    # column-parallel linear's local shard only to a row-parallel one - no heads, no gathers
    factory: bool = False

    @property
    def tp(self) -> int:
        return self.group.size

    def shares(self, style: str) -> tuple[float, float]:
        """(weight share, output share) kept on one GPU."""
        split = 1.0 / self.tp
        weight = split if style in ("colwise", "rowwise") else 1.0
        return weight, split if STYLES[style][2] in (S_LAST, S_SEQ) else 1.0


def strategies(bg: BlockGraph, node: str, setting: CostSetting) -> list[Strategy]:
    """The strategies offered to one node, costed."""
    op = bg.ops[node]
    styles = _styles(op, setting.tp, setting.sequence_parallel, heads=not setting.factory)
    return [Strategy(s, _node_s(bg, node, s, setting), _node_bytes(bg, node, s, setting)) for s in styles]


def _styles(op: OpInfo, tp: int, sp: bool, heads: bool = True) -> list[str]:
    if op.kind in STREAM_KINDS:
        return ["sequence" if sp and tp > 1 else "replicate"]
    if tp == 1:
        return ["replicate"]
    if op.kind == "linear" and op.gemm is not None:
        m, k, n, _ = gemm_dims(op.gemm)
        return ["replicate"] + ["colwise"] * (n % tp == 0) + ["rowwise"] * (k % tp == 0)
    if not heads:
        return ["replicate"]
    if op.kind == "attention" and op.attention is not None:
        count = op.attention[1]
        kv_heads = op.input_shapes[1][1] if len(op.input_shapes) > 1 else count   # (b, kv_heads, s, d)
        return ["replicate"] + ["heads"] * (count % tp == 0 and kv_heads % tp == 0)
    if op.kind == "matmul" and op.gemm is not None and len(op.gemm) == 4:
        return ["replicate"] + ["heads"] * (op.gemm[0] % tp == 0)
    return ["replicate"]


def _node_s(bg: BlockGraph, node: str, style: str, setting: CostSetting) -> float:
    weight, out = setting.shares(style)
    own = _op_s(bg.ops[node], style, setting)
    return own + sum(_streaming_s(op, weight if why == "weight" else out, setting)
                     for op, why in bg.attached.get(node, ()))


def _node_bytes(bg: BlockGraph, node: str, style: str, setting: CostSetting) -> float:
    weight, out = setting.shares(style)
    op = bg.ops[node]
    if op.kind == "linear":
        weight = linear_param_share(op, style, setting.tp)
    return op.param_bytes * weight * setting.param_state_factor + bg.value_bytes[node] * out


def _op_s(op: OpInfo, style: str, setting: CostSetting) -> float:
    tp, compute, precision = setting.tp, setting.compute, setting.precision
    if op.kind in ("input", "output"):
        return 0.0
    if op.kind in ("linear", "matmul") and op.gemm is not None:
        m, k, n, batch = gemm_dims(op.gemm)
        n, k, batch = (n // tp if style == "colwise" else n, k // tp if style == "rowwise" else k,
                       batch // tp if style == "heads" else batch)
        return sum(compute.matmul_time_s(*dims, precision, batch) for dims in ((m, k, n), (m, n, k), (k, m, n)))
    if op.kind == "attention" and op.attention is not None:
        b, h, sq, skv, d, causal = op.attention
        args = (b, h // tp if style == "heads" else h, sq, skv, d, precision, bool(causal))
        return compute.attention_time_s(*args) + compute.attention_time_s(*args, backward=True)
    return _streaming_s(op, setting.shares(style)[1], setting)


def _streaming_s(op: OpInfo, share: float, setting: CostSetting) -> float:
    """An op timed from its counts (norms, elementwise, casts): forward, and backward at twice
    the traffic (reads the saved input and the output gradient, writes the input gradient)."""
    kind = {"residual": "elementwise", "conv": "matmul"}.get(op.kind, op.kind)
    moved = (op.bytes_read + op.bytes_written) * share
    on_scores = runs_on_scores(op, setting.scores)
    fwd = setting.compute.op_time_s(kind, op.fwd_flops * share, moved, setting.precision, on_scores=on_scores)
    if not op.requires_grad:
        return fwd
    return fwd + setting.compute.op_time_s(kind, op.bwd_flops * share, 2 * moved, setting.precision,
                                           on_scores=on_scores)


def reshard_kind(src: str, dst: str) -> str | None:
    """The collective converting a value from placement src to dst (None: free)."""
    if src == dst or src == R:
        return None
    if src == P:
        return "all_reduce" if dst == R else "reduce_scatter"
    return "all_gather" if dst == R else "all_to_all"

"""A transformer block as torch.compile (TorchInductor) runs it: the plan's `compile`.

meshplan's runtime and torchtitan compile each block on its own (`torch.compile(block,
fullgraph=True)`; torchtitan/distributed/compile.py apply_compile). Inductor then runs the
block's forward and backward graphs (AOTAutograd) as:
- its GEMMs and attention as extern kernels (aten's mm and SDPA: `extern_kernels.mm`,
  the SDPA fallback), each one launch as in eager - unchanged here;
- every other op (pointwise, norms, reductions, casts, copies, index arithmetic) lowered to
  loops that are inlined into their consumers and fused into Triton kernels: a tensor passed
  between two fused ops stays in registers and never reaches HBM (torch/_inductor/ir.py
  Pointwise/Reduction nodes, realised only where a consumer needs a buffer);
- two nodes fuse only when their iteration spaces match - the same elements, a pointwise
  node of n x r elements with a reduction of n rows of r (torch/_inductor/codegen/simd.py
  SIMDScheduling.can_fuse compares node.group's (numel, rnumel)) - and only when fusing
  creates no cycle through an extern kernel (torch/_inductor/scheduler.py
  will_fusion_create_cycle).

So `compiled_ops` groups a traced block's memory-bound ops the same way: producer-consumer
chains (views are index arithmetic, free) that no GEMM or attention kernel separates - two
ops join only at the same "extern depth", the count of extern kernels on the longest path
from the block's inputs, which rules out a cycle through one. Each group runs one kernel per
distinct output size, reading the tensors that come from outside the group (other kernels'
outputs, the block's input, weights) and writing only the tensors used outside it (by an
extern kernel, or as the block's output). Its backward moves the group's eager backward
bytes scaled by the same factor (the backward graph is fused the same way).

Not modelled: the routed experts' and router's ops of an MoE block stay eager (their
data-dependent shapes); activation memory is left as eager measures it - inductor's
min-cut partitioner (torch/_functorch/partitioners.py min_cut_rematerialization_partition)
saves at most that (eager's saved set is one valid cut), and often less, so memory is an
upper bound; host time per launched kernel stays the calibration's eager `host_s_per_op`,
so fewer launches is the only host-time gain.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from planner.ir import LayerCost, OpInfo

COMPILED_KERNEL = "inductor.fused"
FUSIBLE_KINDS = frozenset({"elementwise", "norm", "reduction"})
# ops of kind "other" inductor lowers to loops too (index arithmetic and fills, philox random)
FUSIBLE_OTHER = frozenset({"arange", "full", "zeros", "ones", "scalar_tensor", "full_like", "zeros_like",
                           "ones_like", "rand", "rand_like", "randn", "randn_like", "bernoulli"})


@dataclass
class FusedKernel(OpInfo):
    """One Triton kernel of fused memory-bound ops (target COMPILED_KERNEL)."""

    bwd_traffic_ratio: float = 0.0   # its backward's bytes over its forward's (its members' eager ratio)
    members: int = 1                 # the traced ops it replaces (views not counted)


def _aten_name(target: str) -> str:
    parts = target.split(".")
    return parts[1] if len(parts) > 2 else target


@functools.lru_cache(maxsize=None)
def _element_bytes(dtype: str) -> int:
    try:
        return torch.empty((), dtype=getattr(torch, str(dtype).replace("torch.", ""))).element_size()
    except (AttributeError, TypeError):
        return 4


def _tensor_bytes(op: OpInfo) -> int:
    """The bytes of `op`'s output tensor (a view's: the elements it addresses)."""
    if op.kind != "view" and op.bytes_written:
        return op.bytes_written
    count = 1
    for dim in op.output_shape:
        count *= int(dim)
    return count * _element_bytes(op.dtype)


def _numel(op: OpInfo) -> int:
    count = 1
    for dim in op.output_shape:
        count *= int(dim)
    return count


def fusible(op: OpInfo) -> bool:
    """A memory-bound op inductor lowers into a fused loop (not a GEMM, attention, an
    embedding, a loss, an MoE router's or expert's op)."""
    path = op.module_path
    if path.endswith(".moe") or path.endswith(".experts") or ".moe." in path or ".experts." in path:
        return False
    return op.kind in FUSIBLE_KINDS or (op.kind == "other" and _aten_name(op.target) in FUSIBLE_OTHER)


def compiled_ops(cost: LayerCost, bwd_ratio) -> list:
    """The block's kernels under torch.compile, in order: its extern ops (GEMMs, attention,
    whatever is not `fusible`) unchanged, each group of fused memory-bound ops as FusedKernels
    (one per output size), views dropped. `bwd_ratio(op)`: an eager op's backward bytes over
    its forward's (planner.simulate.costing.LayerCoster._bwd_traffic_ratio)."""
    ops = cost.ops
    by_name = {op.name: op for op in ops}
    graph = cost.graph
    preds = {op.name: [p for p in graph.predecessors(op.name) if p in by_name] if op.name in graph else []
             for op in ops}
    # views are index arithmetic: an op depends on the kernel outputs (or block input) under its views
    roots = {}
    for op in ops:
        if op.kind == "view":
            roots[op.name] = tuple(dict.fromkeys(r for p in preds[op.name] for r in roots.get(p, (p,))))
    reads = {op.name: list(dict.fromkeys(r for p in preds[op.name] for r in roots.get(p, (p,))))
             for op in ops if op.kind != "view"}
    depth = {}      # extern kernels on the longest path from the block's inputs
    for op in ops:  # ops are in execution order (a topological order of the graph)
        if op.kind != "view":
            depth[op.name] = max((depth[r] + (0 if fusible(by_name[r]) else 1) for r in reads[op.name] if r in depth),
                                 default=0)
    group = {}
    for op in ops:
        if op.kind == "view" or not fusible(op):
            continue
        group.setdefault(op.name, op.name)
        for r in reads[op.name]:
            if by_name[r].kind != "view" and fusible(by_name[r]) and depth[r] == depth[op.name]:
                _union(group, r, op.name)
    members = {}
    for name in group:
        members.setdefault(_find(group, name), []).append(name)
    users = {}
    for op in ops:
        for r in reads.get(op.name, ()):
            users.setdefault(r, []).append(op.name)
    last = {_find(group, name): name for name in group}     # a group runs where its last member ran
    out = []
    for op in ops:
        if op.kind == "view":
            continue
        if op.name not in group:
            out.append(op)
        elif last[_find(group, op.name)] == op.name:
            root = _find(group, op.name)
            out.extend(_kernels([by_name[n] for n in members[root]], set(members[root]), preds, roots, users,
                                by_name, bwd_ratio))
    return out


def _union(parent: dict, a: str, b: str):
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[rb] = ra


def _find(parent: dict, name: str) -> str:
    while parent[name] != name:
        parent[name] = parent[parent[name]]
        name = parent[name]
    return name


def _kernels(group: list, names: set, preds: dict, roots: dict, users: dict, by_name: dict, bwd_ratio) -> list:
    """One group's kernels: its outputs used outside it (or by nothing in the block: the
    block's output) split by element count, each kernel reading the group's outside inputs
    that its outputs depend on (each tensor, or view of one, once)."""
    outputs = [op for op in group if not users.get(op.name) or any(u not in names for u in users[op.name])]
    if not outputs:
        outputs = [group[-1]]
    outside = {}    # op -> ({pred: bytes} read from outside the group, bytes of the block input and weights)
    for op in group:
        direct = list(dict.fromkeys(preds[op.name]))
        named = {p: _tensor_bytes(by_name[p]) for p in direct
                 if not roots.get(p, (p,)) or not all(r in names for r in roots.get(p, (p,)))}
        known = sum(_tensor_bytes(by_name[p]) for p in direct)
        outside[op.name] = (named, max(0, op.bytes_read - known))
    inside_preds = {op.name: [r for p in preds[op.name] for r in roots.get(p, (p,)) if r in names] for op in group}
    eager_fwd = sum(op.bytes_read + op.bytes_written for op in group)
    eager_bwd = sum((op.bytes_read + op.bytes_written) * bwd_ratio(op) for op in group if op.requires_grad)
    ratio = eager_bwd / eager_fwd if eager_fwd else 0.0
    by_size = {}
    for op in outputs:
        by_size.setdefault(_numel(op), []).append(op)
    kernels = []
    for size_outputs in by_size.values():
        seen, stack, tensors, rest = set(), [o.name for o in size_outputs], {}, 0
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            named, unnamed = outside[name]
            tensors.update(named)
            rest += unnamed
            stack.extend(inside_preds[name])
        first = size_outputs[0]
        members = [op for op in group if op.name in seen]
        kernels.append(FusedKernel(
            name=first.name, kind="norm" if any(op.kind == "norm" for op in members) else "elementwise",
            target=COMPILED_KERNEL, module_path=_common_path([op.module_path for op in members]),
            input_shapes=[], output_shape=tuple(first.output_shape), dtype=first.dtype,
            bytes_read=sum(tensors.values()) + rest, bytes_written=sum(_tensor_bytes(o) for o in size_outputs),
            param_count=sum(op.param_count for op in members), param_bytes=sum(op.param_bytes for op in members),
            params=tuple(p for op in members for p in op.params),
            requires_grad=any(op.requires_grad for op in members),
            attention_core=all(op.attention_core for op in members),
            bwd_traffic_ratio=ratio, members=len(members)))
    return kernels


def _common_path(paths: list) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    return ".".join(common)

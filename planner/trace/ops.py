"""Op analysis of a layer's aten graph: each op's kind, FLOPs, bytes, requires_grad and
the parameters it consumes, and the op dependency graph."""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from planner.arch.layers import ATTENTION_CORE
from planner.ir import ATTENTION_BWD_FACTOR, OpInfo
from planner.trace.program import Program



# ----------------------------------------------------------------------------- op classification

_VIEW_OPS = frozenset({"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "squeeze",
                       "unsqueeze", "split", "split_with_sizes", "slice", "select", "alias", "detach", "as_strided",
                       "unbind", "chunk", "narrow", "diagonal", "unfold", "view_as", "expand_as", "_reshape_alias",
                       "lift_fresh", "unsafe_split", "unsafe_chunk", "movedim", "flatten", "unflatten"})
_MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"})
# Allocations without a kernel (torch.empty and friends): no bytes move.
_ALLOCATION_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                             "empty_permuted"})
_NORM_OPS = frozenset({"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "fused_rms_norm",
                       "native_group_norm",
                       "group_norm", "native_batch_norm", "_native_batch_norm_legit", "batch_norm",
                       "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
                       "instance_norm"})
_REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
                            "prod", "logsumexp", "cumsum", "cumprod", "_softmax", "softmax", "_log_softmax",
                            "log_softmax", "_safe_softmax", "argmax", "argmin", "norm", "linalg_vector_norm",
                            "all", "any", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                            "_adaptive_avg_pool2d", "max_pool3d_with_indices", "avg_pool3d"})
_COPY_OPS = frozenset({"_to_copy", "clone", "copy", "copy_", "cat", "stack", "native_dropout", "dropout",
                       "masked_fill", "where", "contiguous", "repeat", "_unsafe_index", "index_select", "gather",
                       "constant_pad_nd", "pad", "fill", "fill_", "zero_", "tril", "triu", "flip", "roll"})
# Ops whose outputs never require grad however their inputs do.
_NON_DIFFERENTIABLE = frozenset({"detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                                 "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
                                 "new_empty_strided", "lift_fresh_copy", "argmax", "argmin", "bernoulli",
                                 "_local_scalar_dense", "sym_size", "scalar_tensor"})
# Ops a weight passes through before the op that consumes it (autocast's cast, transposes).
_TRANSPARENT_OPS = _VIEW_OPS | {"_to_copy", "clone", "contiguous"}


def op_name(target) -> str:
    """aten.addmm.default -> "addmm"."""
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def is_attention(name: str) -> bool:
    """The SDPA kernels (flash, efficient, cuDNN, CPU flash, math): q, k, v as (B, H, T, D)."""
    return "scaled_dot_product" in name and "backward" not in name


def kind_of_target(target) -> str:
    """Kind from the op alone (the layer context refines linear/matmul, norm and loss)."""
    name = op_name(target)
    if target is operator.getitem:
        return "view"
    if is_attention(name):
        return "attention"
    if name in _MATMUL_OPS:
        return "matmul"
    if name in ("convolution", "_convolution", "conv2d", "conv1d", "conv3d"):
        return "conv"
    if name in ("embedding", "embedding_bag", "_embedding_bag"):
        return "embedding"
    if "loss" in name:
        return "loss"
    if name in _NORM_OPS:
        return "norm"
    if name in _VIEW_OPS or name in _ALLOCATION_OPS or _returns_view(target):
        return "view"
    if name in _REDUCTION_OPS:
        return "reduction"
    if name in _COPY_OPS or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return "elementwise"
    return "other"


def _returns_view(target) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


# ----------------------------------------------------------------------------- per-op numbers

def tensors_in(value) -> list[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _dense_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor covers (a broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _arg_vals(node: fx.Node):
    return tree_flatten((node.args, node.kwargs))[0]


def flag(value) -> bool:
    return any(value) if isinstance(value, list) else bool(value)


def propagate_requires_grad(graph: fx.Graph, placeholder_flags: dict, unit_flags: dict | None = None) -> dict:
    """requires_grad of each value, from its inputs: a float output of a differentiable op
    with an input that requires grad. Multi-output ops get a list (one flag per output)."""
    flags: dict = dict(placeholder_flags)
    unit_flags = unit_flags or {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node in unit_flags:
            flags[node] = unit_flags[node]
            continue
        if node.target is operator.getitem:
            src = flags.get(node.args[0], False)
            flags[node] = src[node.args[1]] if isinstance(src, list) and node.args[1] < len(src) else flag(src)
            continue
        grad_in = (op_name(node.target) not in _NON_DIFFERENTIABLE
                   and any(flag(flags.get(a, False)) for a in node.all_input_nodes))
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            flags[node] = [grad_in and isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in val]
        else:
            flags[node] = grad_in and isinstance(val, torch.Tensor) and val.dtype.is_floating_point
    return flags


def _trace_to_state(node, state_of: dict):
    """Follow a value back through casts and views to a state placeholder: (name, #transposes)."""
    transposes = 0
    while isinstance(node, fx.Node):
        if node in state_of:
            return state_of[node], transposes
        if node.op != "call_function" or op_name(node.target) not in _TRANSPARENT_OPS or not node.args:
            return None
        name = op_name(node.target)
        if name in ("t", "transpose", "permute"):
            transposes += 1
        node = node.args[0]
    return None


def _matmul_info(node, flags, state_of):
    """FLOPs, gemm shape and weight (if any) of mm/addmm/bmm/baddbmm/_scaled_mm."""
    name = op_name(node.target)
    a, b = (node.args[1], node.args[2]) if name in ("addmm", "baddbmm") else (node.args[0], node.args[1])
    va, vb = _val(a), _val(b)
    if name in ("bmm", "baddbmm"):
        batch, m, k = va.shape
        n = vb.shape[-1]
        gemm, fwd = (batch, m, k, n), 2 * batch * m * k * n
    else:
        m, k = va.shape
        n = vb.shape[-1]
        gemm, fwd = (m, k, n), 2 * m * k * n
    grads = sum(flag(flags.get(x, False)) for x in (a, b))
    weight, shardable = None, {}
    for operand, out_dim_if_even in ((b, 1), (a, 0)):
        found = _trace_to_state(operand, state_of)
        if found is None:
            continue
        weight, transposes = found
        wval = _val(operand)
        if wval.dim() == 2:
            out_dim = out_dim_if_even if transposes % 2 == 0 else 1 - out_dim_if_even
            shardable = {"colwise": out_dim, "rowwise": 1 - out_dim}
        break
    return fwd, fwd * grads, gemm, weight, shardable


def _attention_info(node, flags):
    q, k, v = (_val(x) for x in node.args[:3])
    batch, heads, tq, d = q.shape[0], q.shape[-3] if q.dim() == 4 else 1, q.shape[-2], q.shape[-1]
    tk, dv = k.shape[-2], v.shape[-1]
    causal = False
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "is_causal":
            causal = bool(node.kwargs.get("is_causal", node.args[i] if i < len(node.args) else arg.default_value))
    fwd = 2 * batch * heads * tq * tk * (d + dv)
    needs_grad = any(flag(flags.get(x, False)) for x in node.args[:3])
    bwd = ATTENTION_BWD_FACTOR * fwd if needs_grad else 0
    if causal:
        pairs = tq * tk - tq * (tq - 1) // 2 if tk >= tq else tk * (tk + 1) // 2
        causal_fwd = 2 * batch * heads * pairs * (d + dv)
    else:
        causal_fwd = fwd
    return fwd, bwd, causal_fwd, (batch, heads, tq, tk, d, causal)


def _conv_info(node, flags):
    x, w = _val(node.args[0]), _val(node.args[1])
    out = tensors_in(node.meta.get("val"))[0]
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    per_out = 1
    for s in w.shape[1:]:
        per_out *= s
    fwd = 2 * (x.numel() if transposed else out.numel()) * per_out
    grads = sum(flag(flags.get(a, False)) for a in node.args[:2])
    return fwd, fwd * grads


def analyse(gm: fx.GraphModule, program: Program) -> tuple[list[OpInfo], nx.DiGraph]:
    """OpInfo for every op of a layer's aten graph, and the op dependency graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_state = len(program.state_names)
    state_of = {node: name for node, name in zip(placeholders[:n_state], program.state_names)}
    state_spec = {node: spec for node, spec in zip(placeholders[:n_state], program.state_specs)}
    state_param = {node: is_p for node, is_p in zip(placeholders[:n_state], program.state_is_param)}
    placeholder_flags = {n: s.requires_grad for n, s in zip(placeholders[:n_state], program.state_specs)}
    placeholder_flags.update({n: s.requires_grad for n, s in zip(placeholders[n_state:], program.input_specs)})
    flags = propagate_requires_grad(gm.graph, placeholder_flags)

    owner = {}  # node -> op name it belongs to (getitem folds into its source)
    ops: dict[str, OpInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and node.args[0] in owner:
            owner[node] = owner[node.args[0]]
            continue
        owner[node] = node.name
        ops[node.name] = _op_info(node, flags, state_of)
    _attribute_params(gm, state_of, state_spec, state_param, owner, ops)
    _refine_kinds(gm, owner, ops)

    graph = nx.DiGraph()
    returned = set()
    for node in gm.graph.nodes:
        if node in owner:
            graph.add_node(owner[node], kind=ops[owner[node]].kind)
            for inp in node.all_input_nodes:
                if inp in owner and owner[inp] != owner[node]:
                    graph.add_edge(owner[inp], owner[node])
        elif node.op == "output":
            returned.update(owner[n] for n in node.all_input_nodes if n in owner)
    while True:  # views nobody reads (autograd's detach of saved outputs): not ops of the layer
        dead = [n for n in graph.nodes if ops[n].kind == "view" and graph.out_degree(n) == 0 and n not in returned]
        if not dead:
            break
        graph.remove_nodes_from(dead)
    return [ops[n] for n in ops if n in graph], graph


def _op_info(node: fx.Node, flags: dict, state_of: dict) -> OpInfo:
    kind = kind_of_target(node.target)
    stack = node.meta.get("nn_module_stack") or ()
    module_path = stack[-1][0] if stack else ""
    ins = [x for x in _arg_vals(node) if isinstance(x, fx.Node)]
    in_vals = [_val(x) for x in ins if isinstance(_val(x), torch.Tensor)]
    outs = tensors_in(node.meta.get("val"))
    info = OpInfo(
        name=node.name, kind=kind, target=str(node.target), module_path=module_path,
        input_shapes=[tuple(v.shape) for v in in_vals],
        output_shape=tuple(outs[0].shape) if outs else (),
        dtype=str(outs[0].dtype).replace("torch.", "") if outs else "",
        requires_grad=flag(flags.get(node, False)),
        attention_core=bool((node.meta.get("custom") or {}).get(ATTENTION_CORE)))
    if kind != "view":
        info.bytes_read = sum(_dense_bytes(v) for v in in_vals)
        info.bytes_written = sum(_dense_bytes(v) for v in outs)
    if kind == "embedding" and in_vals:  # a lookup reads the indices and the rows it gathers
        info.bytes_read = sum(_dense_bytes(v) for v in in_vals[1:]) + info.bytes_written
    if kind == "matmul":
        fwd, bwd, gemm, weight, shardable = _matmul_info(node, flags, state_of)
        info.fwd_flops, info.bwd_flops, info.causal_fwd_flops, info.gemm = fwd, bwd, fwd, gemm
        if weight is not None:
            info.kind, info.shardable = "linear", shardable
    elif kind == "attention":
        info.fwd_flops, info.bwd_flops, info.causal_fwd_flops, info.attention = _attention_info(node, flags)
    elif kind == "conv":
        info.fwd_flops, info.bwd_flops = _conv_info(node, flags)
        info.causal_fwd_flops = info.fwd_flops
    elif kind == "embedding" and _trace_to_state(node.args[0], state_of) is not None:  # (vocab, hidden) table
        info.shardable = {"vocab": 0, "hidden": 1}
    return info


def _attribute_params(gm, state_of, state_spec, state_param, owner, ops):
    """Charge each parameter to the first op that consumes it through casts and views."""
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    for node, name in state_of.items():
        if not node.users:
            continue
        consumers, frontier = [], list(node.users)
        while frontier:
            user = frontier.pop()
            if user in owner and ops[owner[user]].kind not in ("view",) and op_name(user.target) not in _TRANSPARENT_OPS:
                consumers.append(owner[user])
            elif user in owner:
                frontier.extend(user.users)
        if not consumers:
            consumers = [owner[u] for u in node.users if u in owner]
        if not consumers:
            continue
        op = ops[min(consumers, key=order.get)]
        spec = state_spec[node]
        op.params = op.params + (name,)
        if state_param[node]:
            op.param_count += _numel(spec.shape)
            op.param_bytes += _numel(spec.shape) * spec.dtype.itemsize


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _refine_kinds(gm, owner, ops):
    """Context the op alone lacks: ops inside a *Norm module are a norm; a log-softmax that
    feeds a loss is part of the loss."""
    for node in gm.graph.nodes:
        if node not in owner or owner[node] != node.name:
            continue
        op = ops[node.name]
        stack = node.meta.get("nn_module_stack") or ()
        in_norm = bool(stack) and stack[-1][1].lower().endswith("norm")
        if in_norm and op.kind in ("elementwise", "reduction"):
            op.kind = "norm"
        if op_name(node.target) in ("_log_softmax", "log_softmax"):
            if any(u in owner and ops[owner[u]].kind == "loss" for u in node.users):
                op.kind = "loss"

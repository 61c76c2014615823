"""The skeleton cut into layers in execution order, each a runnable program (a block's
module, or a segment of the skeleton's aten graph), one program per signature."""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from planner.ir import Layer
from planner.trace.fake import state_dtype
from planner.trace.inputs import TensorSpec
from planner.trace.ops import flag, kind_of_target, propagate_requires_grad
from planner.trace.program import Program
from planner.trace.signature import digest, value_key
from planner.trace.skeleton import Skeleton, UnitCall


def split_layers(sk: Skeleton, model: nn.Module, low=None) -> tuple[list[Layer], dict[str, Program]]:
    """Cut the skeleton into layers in execution order; one program per signature."""
    nodes = [n for n in sk.gm.graph.nodes if n.op == "call_function"]
    unit_index = {}
    for node in nodes:
        if node.target is torch.ops.meshplan.unit.default:
            unit_index[node] = len(unit_index)
    rg = _skeleton_requires_grad(sk, unit_index)
    pieces: list[tuple[str, Any]] = []
    current: list = []
    for node in nodes:
        if node in unit_index:
            pieces.append(("segment", current))
            pieces.append(("unit", node))
            current = []
        elif node.target is operator.getitem and node.args[0] in unit_index:
            continue
        else:
            current.append(node)
    pieces.append(("segment", current))

    layers, programs = [], {}
    n_units = len(unit_index)
    seen_units = 0
    for piece_kind, item in pieces:
        if piece_kind == "unit":
            call = sk.calls[unit_index[item]]
            layer = Layer(call.path, call.kind, call.signature, len(layers), (call.path,))
            if call.signature not in programs:
                programs[call.signature] = _unit_program(call, low)
            seen_units += 1
        else:
            if not _has_work(item):
                continue
            if n_units == 0:
                name, kind = "model", "other"
            elif seen_units == 0:
                name, kind = "embed", "embedding"
            elif seen_units == n_units:
                name, kind = "head", "head"
            else:
                name, kind = f"between.{seen_units}", "other"
            program, digest = _segment_program(sk, item, rg)
            signature = f"{name}:{digest}"
            layer = Layer(name, kind, signature, len(layers), _segment_modules(item))
            programs[signature] = program
        layers.append(layer)
    return layers, programs


def _has_work(nodes) -> bool:
    return any(kind_of_target(n.target) != "view" and n.target is not operator.getitem for n in nodes)


def _segment_modules(nodes) -> tuple:
    out = []
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or ()
        if stack and stack[-1][0] and stack[-1][0] not in out:
            out.append(stack[-1][0])
    return tuple(out)


def _skeleton_requires_grad(sk: Skeleton, unit_index) -> dict:
    """requires_grad of every skeleton value (below autograd, make_fx does not record it)."""
    placeholders = [n for n in sk.gm.graph.nodes if n.op == "placeholder"]
    n_state = len(sk.state_names)
    flags = {}
    for i, node in enumerate(placeholders):
        if i < n_state:
            flags[node] = sk.state_requires_grad[i]
        else:
            flags[node] = sk.call.tensor_specs()[i - n_state].requires_grad
    unit_flags = {}
    for node, k in unit_index.items():
        unit_flags[node] = [s.requires_grad for s in sk.calls[k].out_leaves if isinstance(s, TensorSpec)]
    return propagate_requires_grad(sk.gm.graph, flags, unit_flags)


def _unit_program(call: UnitCall, low=None) -> Program:
    module = call.module
    names, specs, is_param = [], [], []
    for name, p in module.named_parameters():
        names.append(name)
        spec = TensorSpec.of(p, p.requires_grad)
        specs.append(replace(spec, dtype=state_dtype(spec.dtype, low)))
        is_param.append(True)
    for name, b in module.named_buffers():
        names.append(name)
        specs.append(TensorSpec.of(b, False))
        is_param.append(False)

    def fn(state, tensors):
        args, kwargs = call.call.rebuild(tensors)
        return functional_call(module, dict(zip(names, state)), args, kwargs)

    return Program(fn, [f"{call.path}.{n}" for n in names], specs, is_param, call.call.tensor_specs(),
                    autocast=low is None, output_specs=[s for s in call.out_leaves if isinstance(s, TensorSpec)],
                    module=module)


def _segment_program(sk: Skeleton, nodes: list, rg: dict) -> tuple[Program, str]:
    """A sub-graph of the skeleton as a runnable aten GraphModule: its inputs are the
    values it uses from outside (state tensors first), its outputs the values used later."""
    inside = set(nodes)
    placeholders = [n for n in sk.gm.graph.nodes if n.op == "placeholder"]
    state_index = {n: i for i, n in enumerate(placeholders[:len(sk.state_names)])}
    external = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp not in inside and inp not in external:
                external.append(inp)
    state_inputs = [n for n in external if n in state_index]
    other_inputs = [n for n in external if n not in state_index]
    graph = fx.Graph()
    env = {}
    for node in state_inputs + other_inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    gm = fx.GraphModule(torch.nn.Module(), graph)

    def fn(state, tensors):
        return gm(*state, *tensors)

    def spec(node, requires_grad):
        return TensorSpec.of(node.meta["val"], requires_grad)

    state_names = [sk.state_names[state_index[n]] for n in state_inputs]
    state_is_param = [sk.state_is_param[state_index[n]] for n in state_inputs]
    state_specs = [spec(n, sk.state_requires_grad[state_index[n]]) for n in state_inputs]
    input_specs = [spec(n, flag(rg.get(n))) for n in other_inputs]
    output_specs = [spec(n, flag(rg.get(n))) for n in outputs if isinstance(n.meta.get("val"), torch.Tensor)]
    key = digest(str(graph), *map(value_key, state_specs + input_specs))
    return Program(fn, state_names, state_specs, state_is_param, input_specs, autocast=False,
                    graph=gm, output_specs=output_specs), key

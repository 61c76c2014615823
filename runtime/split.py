"""Cut any nn.Module into pipeline stages at its block boundaries (a file.py:factory model).

The model is traced by torch.fx with every block (planner.trace.find_units) as one
call_module node - the tracer's first route, `planner.trace.skeleton.leaf_graph_module` -
and the graph's nodes are given to stages in order: each node joins the stage of the last
block called before it (nodes before the first block join stage 0), the rule by which
the simulator gives non-block layers to stages (planner.simulate.step.stage_layers).

Each stage is an fx GraphModule over the original module objects under their original
names ("blocks.7.fc1"), so tensor parallelism, activation checkpointing and FSDP apply
to it as to the whole model, and its parameters keep their names. A stage's inputs are
the values it or a later stage still needs, and its outputs those a later stage needs:
the model's own inputs (a classifier's labels, say) ride through the stages that do not
use them, because torch.distributed.pipelining hands a stage only what the stage before
it returned (torch/distributed/pipelining/stage.py, PipelineStage). The last stage returns
the model's loss (`loss_row`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from cost_models.errors import MeshplanError
from planner.trace.inputs import primary_output


def split_stages(gm: fx.GraphModule, root: nn.Module, block_stage: dict, stages: int) -> list[fx.GraphModule]:
    """`gm`: the model traced with blocks as leaves; `block_stage`: block path -> its virtual
    stage (blocks in call order). Returns one GraphModule per virtual stage."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # an argument fx took as a constant (one the call left at its default) is a placeholder
    # with a default value: every stage uses the constant, none receives it
    constants = {n: n.args[0] for n in placeholders if n.args}
    inputs = [n for n in placeholders if n not in constants]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stage_of = _assign(nodes, block_stage)
    _check_owned_once(nodes, stage_of, root)
    # the values each stage receives: the model's inputs on the first, then every value made
    # before the stage that the stage or a later one (or the model's output) reads
    made = {n: -1 for n in inputs} | {n: s for n, s in stage_of.items() if n.op != "get_attr"}
    last_use = {}
    for n in nodes:
        for used in n.all_input_nodes:
            last_use[used] = max(last_use.get(used, -1), stage_of[n])
    for used in output.all_input_nodes:
        last_use[used] = stages
    carried = [[v for v in made if made[v] < k <= last_use.get(v, -1)] for k in range(stages)]
    carried[0] = inputs
    parts = []
    for k in range(stages):
        outs = carried[k + 1] if k + 1 < stages else None
        body = [n for n in nodes if stage_of[n] == k]
        parts.append(_stage_module(root, body, carried[k], outs, output, constants))
    return parts


def _assign(nodes: list, block_stage: dict) -> dict:
    stage_of, current = {}, 0
    for n in nodes:
        if n.op == "call_module" and n.target in block_stage:
            current = block_stage[n.target]
        stage_of[n] = current
    for n in nodes:   # a parameter read directly lives with the first node that reads it
        if n.op == "get_attr" and n.users:
            stage_of[n] = min(stage_of[u] for u in n.users)
    return stage_of


def _check_owned_once(nodes: list, stage_of: dict, root: nn.Module):
    """A parameter used by two stages would be two copies on two ranks, trained apart."""
    owner = {}   # id(parameter) -> (its name where first used, that stage)
    for n in nodes:
        if n.op == "call_module":
            params = [(f"{n.target}.{name}", p) for name, p in root.get_submodule(n.target).named_parameters()]
            stages = {stage_of[n]}
        elif n.op == "get_attr":
            params = [(n.target, _attr(root, n.target))]
            stages = {stage_of[u] for u in n.users} | {stage_of[n]}
        else:
            continue
        for name, p in params:
            first_name, first = owner.setdefault(id(p), (name, min(stages)))
            other = stages - {first}
            if other:
                raise MeshplanError(f"{first_name} is used by pipeline stages {first} and {max(other)} (a weight "
                                    f"shared across stages): pipeline this model with pp 1, or stages that keep "
                                    f"its users together")


def _stage_module(root: nn.Module, body: list, inputs: list, outputs: list | None, model_output,
                  constants: dict) -> fx.GraphModule:
    graph = fx.Graph()
    env = dict(constants)
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in body:
        env[n] = graph.node_copy(n, lambda x: env[x])
    if outputs is None:
        graph.output(graph.call_function(loss_row, (fx.node.map_arg(model_output.args[0], lambda x: env[x]),)))
    else:
        # a value the stage only passes on leaves as a copy: the schedule receives each micro-batch
        # into the stage's input buffers, which must not be the tensors its sends still read
        passed = {n: graph.call_method("clone", (env[n],)) for n in outputs if n in inputs}
        sent = [passed.get(n, env[n]) for n in outputs]
        graph.output(sent[0] if len(sent) == 1 else tuple(sent))
    owners = {}
    for n in body:
        if n.op in ("call_module", "get_attr"):
            owners[n.target] = _attr(root, n.target)
    return fx.GraphModule(owners, graph, type(root).__name__)


def loss_row(out) -> torch.Tensor:
    """The model's loss (planner.trace.inputs.primary_output) as a 1-element tensor: the
    schedule concatenates the last stage's outputs over micro-batches, which a 0-d loss
    cannot be (torch/distributed/pipelining/microbatch.py, merge_chunks)."""
    return primary_output(out).reshape(1)


def _attr(root: nn.Module, target: str):
    obj = root
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


def check_carried(parts: list, example: tuple, root: nn.Module):
    """Run the stages in order once (no grad) on real inputs: every value handed from one
    stage to the next must be a tensor, the only thing a pipeline sends. The buffers the run
    updates (BatchNorm's running statistics) are put back, so training starts as unsplit."""
    buffers = list(root.buffers())
    kept = [b.clone() for b in buffers]
    values = tuple(example)
    try:
        with torch.no_grad():
            for k, part in enumerate(parts[:-1]):
                out = part(*values)
                values = out if isinstance(out, tuple) else (out,)
                bad = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
                if bad:
                    raise MeshplanError(f"pipeline stage {k} would hand a {bad[0]} to the next stage; a pipeline "
                                        f"sends only tensors: compute it inside one block, or use pp 1")
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, kept):
                b.copy_(saved)

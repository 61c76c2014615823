"""Tensor parallelism of a file.py:factory model's layer, as the runtime applies it.

The runtime (runtime.modules.tensor_parallel) puts DTensor's ColwiseParallel /
RowwiseParallel, with their default layouts, on the block linears the plan's `tp_layout`
names - by block-relative path ("fc1", "mlp.fc1") or by full path ("blocks.3.fc1") - and
leaves every other module whole (torch/distributed/tensor/parallel/style.py):
- a column-parallel linear takes its input replicated and returns its local shard of the
  output features; in backward its input's gradient is a partial sum, all-reduced over
  the TP group when DTensor turns it back into the replicated input's gradient;
- a row-parallel linear takes that local shard and all-reduces its partial output in
  forward (the bias is added once, after); nothing crosses the group in its backward.
So every op between a column-parallel linear and the row-parallel one it feeds (the GELU of
an MLP, say) works on 1/tp of the features, and everything else on all of them. The
layouts the planner offers (planner.search.tp_ilp with `factory=True`) only hand a
column-parallel linear's output to row-parallel ones, which is what makes this exact.
"""
from __future__ import annotations

import math

from cost_models.compute import gemm_dims
from cost_models.errors import MeshplanError
from cost_models.memory import DTYPE_BYTES
from planner.ir import LayerCost, OpInfo, TracedModel

SPLIT_STYLES = ("colwise", "rowwise")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def layer_prefix(traced: TracedModel, index: int) -> str:
    """The module path under which the layer's shared LayerCost was traced: that of the
    first layer with its signature (its ops carry that layer's module paths)."""
    return traced.layers[traced.layers_with(traced.layers[index].signature)[0]].name


def style_of(layout: dict, layer_name: str, relative: str) -> str:
    """A linear's style: a full-path key first, then a block-relative one; else replicate."""
    return layout.get(f"{layer_name}.{relative}", layout.get(relative, "replicate"))


class FactorySplit:
    """Which of one layer's ops run split over tp, and the collectives it issues."""

    def __init__(self, cost: LayerCost, prefix: str, layer_name: str, layout: dict, is_block: bool):
        self.cost = cost
        self.styles = {}
        if is_block:   # the runtime splits block linears only
            for op in cost.ops:
                if op.kind == "linear" and op.module_path.startswith(prefix + "."):
                    style = style_of(layout, layer_name, op.module_path[len(prefix) + 1:])
                    if style in SPLIT_STYLES:
                        self.styles[op.name] = style
        split_modules = {cost.op(name).module_path for name in self.styles}
        self.split = set()
        for op in cost.ops:   # the trace lists ops in execution order
            style = self.styles.get(op.name)
            preds = list(cost.graph.predecessors(op.name))
            if style == "colwise" or (style is None and any(p in self.split for p in preds)):
                self.split.add(op.name)
            elif style is None and not preds and op.module_path in split_modules:
                self.split.add(op.name)   # a cast or view of a split weight: 1/tp of it

    @property
    def splits_anything(self) -> bool:
        return bool(self.styles)

    def place(self, op: OpInfo) -> tuple[bool, str | None]:
        """(does the op work on 1/tp of its tensor, the linear's style or None)."""
        return op.name in self.split, self.styles.get(op.name)

    def collectives(self, op: OpInfo) -> tuple[list, list]:
        """(forward, backward) [(kind, bytes)] that `op` causes over the TP group."""
        style = self.styles.get(op.name)
        if style == "rowwise":
            return [("all_reduce", _numel(op.output_shape) * _itemsize(op.dtype))], []
        if style == "colwise":
            return [], [("all_reduce", self._input_bytes(op))]
        return [], []

    def _input_bytes(self, op: OpInfo) -> float:
        """The module input's bytes: the activation as it entered the linear, before the casts
        autocast makes inside it (its gradient is reduced in that dtype)."""
        shape = op.input_shapes[1] if len(op.input_shapes) == 3 else op.input_shapes[0]   # addmm: bias, x, w
        source = self._activation_source(op, tuple(shape))
        while source is not None and source.target.startswith("aten._to_copy") \
                and source.module_path == op.module_path:
            preds = list(self.cost.graph.predecessors(source.name))
            if not preds:
                break
            source = self.cost.op(preds[0])
        return _numel(shape) * _itemsize((source or op).dtype)

    def _activation_source(self, op: OpInfo, shape: tuple):
        for name in self.cost.graph.predecessors(op.name):
            pred = self.cost.op(name)
            if tuple(pred.output_shape) == shape and not pred.params:
                return pred
        return None

    def activation_share(self, tp: int) -> float:
        """The saved activations one rank keeps: the split ops' outputs at 1/tp. The trace
        measures a layer's saved bytes as a whole, so the split part is taken as the split
        ops' share of the layer's output bytes."""
        kernels = [op for op in self.cost.ops if op.kind != "view"]
        total = sum(op.bytes_written for op in kernels)
        split = sum(op.bytes_written for op in kernels if op.name in self.split)
        return 1.0 if not total else 1 - split / total + split / total / tp


def check_factory_plan(plan, traced: TracedModel, name: str):
    """Refuse, in one line, a plan of a factory model that meshplan's runtime could not run:
    sequence parallelism; pipeline stages of a model torch.fx cannot trace (the runtime cuts
    by fx: runtime.split); tp without a layout, or with a key that names no block linear
    or splits features tp does not divide (runtime.modules checks the module itself too)."""
    if plan.sequence_parallel:
        raise MeshplanError(f"sequence parallelism needs a preset or JSON model: the runtime cannot shard "
                            f"{name}'s sequence dimension; drop sequence_parallel")
    if plan.virtual_stages > 1 and traced.route != "torch.fx.symbolic_trace":
        raise MeshplanError(f"the runtime cuts a model into pipeline stages by torch.fx, which cannot trace {name} "
                            f"(the tracer needed {traced.route}): use pp 1")
    split = {k: v for k, v in plan.tp_layout.items() if v != "replicate"}
    if plan.tp == 1:
        return
    if not split:
        raise MeshplanError(f"tp {plan.tp} on {name} needs a tp_layout naming the block linears to split "
                            f"(colwise / rowwise); `meshplan plan` writes one")
    linears = {}
    for index in traced.blocks:
        layer, prefix = traced.layers[index], layer_prefix(traced, index)
        for op in traced.cost_of(index).ops:
            if op.kind == "linear" and op.gemm is not None and op.module_path.startswith(prefix + "."):
                relative = op.module_path[len(prefix) + 1:]
                linears.setdefault(relative, op)
                linears.setdefault(f"{layer.name}.{relative}", op)
    for key, style in split.items():
        if style not in SPLIT_STYLES:
            raise MeshplanError(f"tp_layout {key!r}: {style!r} is not a style the runtime applies to {name}; "
                                f"use colwise, rowwise or replicate")
        if key not in linears:
            raise MeshplanError(f"tp_layout key {key!r} names no linear layer in {name}'s blocks")
        _, k, n, _ = gemm_dims(linears[key].gemm)
        size = n if style == "colwise" else k
        if size % plan.tp:
            raise MeshplanError(f"tp_layout {key!r} {style} splits {size} features over tp {plan.tp}: "
                                f"make tp divide it, or replicate it")


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _itemsize(dtype: str) -> int:
    return _DTYPE_BYTES.get(str(dtype).replace("torch.", ""), DTYPE_BYTES["fp32"])

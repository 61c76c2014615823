"""Any nn.Module (`--model file.py:factory`) as the runtime trains it.

- The model: the factory's module, built on the CPU after `torch.manual_seed(seed)` (so
  every rank builds the same weights), its blocks those the tracer finds
  (planner.trace.find_units) - the units of checkpointing, FSDP wrapping and pipeline
  stages, numbered in call order as the plan's `stages` and `checkpoint` number them.
- Its loss: what its forward returns (its first tensor, or `.loss`), which must be a
  scalar; the runtime backpropagates it as it is.
- Its data (`ExampleSource`): the factory file's `example_inputs(global_batch, seq)`,
  called with the RNG seeded by (seed, step), gives a step's global batch - the same
  whatever the layout - and each dp rank keeps its rows (every tensor's first dimension).
- Pipeline stages: runtime.split, over the model traced by torch.fx with its blocks as leaves.
- Tensor parallelism (`tensor_parallel`): DTensor's ColwiseParallel / RowwiseParallel with
  their default layouts on the block linears the plan's `tp_layout` names, by block-relative
  path ("fc1") or full path ("blocks.3.fc1"); what that issues is what
  planner.simulate.factory_tp prices.
- Precision: under ZeRO 1-3 FSDP2 holds the parameters in 16 bits and casts floating inputs
  to them (MixedPrecisionPolicy, cast_forward_inputs); otherwise autocast runs the forward
  (runtime.parallelize.autocast_context), as for a zoo model.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from cost_models.errors import MeshplanError
from planner.plan import Plan
from planner.torch_compat import pipeline_passes_integer_tensors
from planner.trace.inputs import Call, primary_output
from planner.trace.signature import find_units
from planner.trace.skeleton import leaf_graph_module
from runtime.split import split_stages

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def example_maker(spec):
    maker = getattr(sys.modules.get(getattr(spec.factory, "__module__", None)), "example_inputs", None)
    if not callable(maker):
        raise MeshplanError(f"model {spec.name!r} has no example_inputs(micro_batch, seq) next to its factory: "
                            f"the runtime makes its training data with it")
    return maker


def call_maker(maker, name: str, batch: int, seq: int):
    """(args, kwargs) of one call of the model with `batch` rows."""
    try:
        out = maker(batch, seq)
    except Exception as exc:  # the user's function: its errors are theirs to fix
        raise MeshplanError(f"example_inputs of {name!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(out, torch.Tensor):
        return (out,), {}
    if isinstance(out, dict):
        return (), dict(out)
    if isinstance(out, (tuple, list)):
        return tuple(out), {}
    raise MeshplanError(f"example inputs of {name!r} must be a tensor, a tuple or a dict, not {type(out).__name__}")


class FactoryModel:
    """The user's module and what the runtime needs to know of it."""

    def __init__(self, spec, plan: Plan, device: str = "cpu", seed: int = 0):
        self.spec, self.plan = spec, plan
        self.maker = example_maker(spec)
        torch.manual_seed(seed)
        self.module = spec.build(device)
        self.block_paths = [p for p, kind in find_units(self.module).items() if kind == "block"]
        with torch.device("meta" if device == "meta" else "cpu"):
            self.example = call_maker(self.maker, spec.name, plan.micro_batch, plan.seq)

    # -- checks that need no process group ---------------------------------------------
    def check(self):
        plan, name = self.plan, self.spec.name
        if plan.sequence_parallel:
            raise MeshplanError(f"sequence parallelism needs a preset or JSON model: the runtime cannot shard "
                                f"{name}'s sequence dimension; drop sequence_parallel")
        if not self.block_paths and plan.virtual_stages > 1:
            raise MeshplanError(f"{name} has no repeated blocks to cut into pipeline stages: use pp 1")
        plan.check_fits(len(self.block_paths) or None)
        if plan.tp > 1:
            self.tp_plan(self.module)
        self._check_loss()
        if plan.virtual_stages > 1:
            self.stages()
            self._check_stage_inputs()

    def _check_stage_inputs(self):
        args, _ = self.example
        integer = [a.dtype for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()]
        if integer and not pipeline_passes_integer_tensors():
            raise MeshplanError(f"{self.spec.name}'s example_inputs include {integer[0]} tensors, which pass between "
                                f"pipeline stages only on torch >= 2.13 (this is {torch.__version__}): use pp 1 or "
                                f"upgrade torch")

    def _check_loss(self):
        args, kwargs = self.example
        with torch.no_grad():
            try:
                loss = primary_output(self.module(*args, **kwargs))
            except MeshplanError:
                raise
            except Exception as exc:  # the user's model: its errors are theirs to fix
                raise MeshplanError(f"{self.spec.name} failed on its example_inputs: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if loss.dim() != 0 or not loss.is_floating_point():
            raise MeshplanError(f"{self.spec.name} returns a {loss.dtype} tensor of shape {tuple(loss.shape)}, not a "
                                f"scalar loss: meshplan train backpropagates what forward returns, so return the loss")

    # -- blocks -------------------------------------------------------------------------
    def blocks(self, part: nn.Module) -> dict:
        """{block number: module} of the blocks `part` holds."""
        out = {}
        for number, path in enumerate(self.block_paths):
            try:
                out[number] = part.get_submodule(path)
            except AttributeError:
                continue
        return out

    # -- pipeline stages ----------------------------------------------------------------
    def stages(self) -> list:
        """One module per virtual stage (runtime.split), blocks cut as the plan's stages say."""
        plan, name = self.plan, self.spec.name
        args, kwargs = self.example
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            raise MeshplanError(f"a pipeline feeds its first stage positional tensors: {name}'s example_inputs must "
                                f"return a tensor or a tuple of tensors for pp > 1")
        try:
            gm = leaf_graph_module(self.module, Call.from_example(args, kwargs), find_units(self.module))
        except MeshplanError as exc:
            raise MeshplanError(f"the runtime cuts a model into pipeline stages by torch.fx, which cannot trace "
                                f"{name} ({exc}): use pp 1") from None
        called = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in self.block_paths]
        if called != self.block_paths:
            raise MeshplanError(f"{name} calls its blocks in another order than it holds them, or more than once: "
                                f"the runtime cannot cut it into pipeline stages; use pp 1")
        from runtime.pipeline import stage_ranges
        block_stage = {}
        for stage, (first, end) in enumerate(stage_ranges(plan, len(self.block_paths))):
            block_stage.update({self.block_paths[b]: stage for b in range(first, end)})
        return split_stages(gm, self.module, block_stage, plan.virtual_stages)

    # -- tensor parallelism -------------------------------------------------------------
    def tp_plan(self, part: nn.Module) -> dict:
        """{module path: ParallelStyle} of the plan's tp_layout within `part` (checked against the model)."""
        plan, name = self.plan, self.spec.name
        split = {k: v for k, v in plan.tp_layout.items() if v != "replicate"}
        if not split:
            raise MeshplanError(f"tp {plan.tp} on {name} needs a tp_layout naming the block linears to split "
                                f"(colwise / rowwise); `meshplan plan` writes one")
        out = {}
        for key, style in split.items():
            if style not in STYLES:
                raise MeshplanError(f"tp_layout {key!r}: {style!r} is not a style the runtime applies to {name}; "
                                    f"use colwise, rowwise or replicate")
            paths = [key] if any(key.startswith(b + ".") for b in self.block_paths) else \
                [f"{b}.{key}" for b in self.block_paths]
            found = [p for p in paths if _has(self.module, p)]
            if not found:
                raise MeshplanError(f"tp_layout key {key!r} names no module in {name}'s blocks "
                                    f"({', '.join(self.block_paths[:2])}, ...)")
            for path in found:
                _check_linear(self.module.get_submodule(path), path, style, plan.tp, name)
                if _has(part, path):
                    out[path] = STYLES[style]()
        return out

    def tensor_parallel(self, part: nn.Module, tp_mesh):
        styles = self.tp_plan(part)
        if styles:
            parallelize_module(part, tp_mesh, styles)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _check_linear(module, path: str, style: str, tp: int, name: str):
    if not isinstance(module, nn.Linear):
        raise MeshplanError(f"tp_layout {path!r} is a {type(module).__name__}: the runtime splits nn.Linear "
                            f"layers of {name} only")
    size, what = (module.out_features, "output") if style == "colwise" else (module.in_features, "input")
    if size % tp:
        raise MeshplanError(f"tp_layout {path!r} {style} splits {size} {what} features over tp {tp}: "
                            f"make tp divide it, or replicate it")


def chunks(batch, micro_batch: int) -> list:
    """(args, kwargs) -> one (args, kwargs) per micro-batch of `micro_batch` rows."""
    leaves, tree = tree_flatten(batch)
    rows = next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim()), micro_batch)
    return [tree_unflatten([x[i:i + micro_batch] if isinstance(x, torch.Tensor) and x.dim() else x
                            for x in leaves], tree) for i in range(0, rows, micro_batch)]


def loss_of(module: nn.Module, batch) -> torch.Tensor:
    args, kwargs = batch
    return primary_output(module(*args, **kwargs))


class ExampleSource:
    """Each step's global batch from example_inputs; this dp rank's rows of it (module docstring)."""

    name = "example_inputs"

    def __init__(self, maker, model_name: str, global_batch: int, seq: int, seed: int, dp: int, dp_rank: int,
                 device: torch.device):
        self.maker, self.model_name = maker, model_name
        self.global_batch, self.seq, self.seed = global_batch, seq, seed
        self.dp, self.dp_rank, self.device = dp, dp_rank, device
        self.position = 0   # samples of the run consumed so far (all ranks together), as runtime.data.Loader

    def next_batch(self):
        """(this rank's (args, kwargs), None): the runtime's (inputs, targets) of a zoo model."""
        step = self.position // self.global_batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + step) % 2**63)
            with torch.device("cpu"):
                args, kwargs = call_maker(self.maker, self.model_name, self.global_batch, self.seq)
        self.position += self.global_batch
        rows = self.global_batch // self.dp
        first = self.dp_rank * rows

        def mine(x):
            if not isinstance(x, torch.Tensor) or not x.dim():
                return x
            if x.shape[0] != self.global_batch:
                raise MeshplanError(f"example_inputs({self.global_batch}, {self.seq}) of {self.model_name!r} returned "
                                    f"a tensor of shape {tuple(x.shape)}: every tensor's first dimension must be the "
                                    f"batch, which the runtime splits over data-parallel ranks and micro-batches")
            return x[first:first + rows].to(self.device)

        return tree_map(mine, (args, kwargs)), None

    def state_dict(self) -> dict:
        return {"position": self.position, "source": self.name}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])

"""The skeleton trace: the whole model as one aten graph with every block one opaque
`meshplan::unit` op, by fx first and make_fx as the fallback, and the error naming each
route's failure when both fail."""
from __future__ import annotations

import functools
import inspect
import linecache
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from cost_models.errors import MeshplanError
from planner.trace.fake import autocast, fake_state, module_stack
from planner.trace.inputs import Call, TensorSpec, primary_output
from planner.trace.kernels import kernel_choices
from planner.trace.signature import digest, module_signature, value_key

ROUTES = ("torch.fx.symbolic_trace", "make_fx")


# ----------------------------------------------------------------------------- the opaque unit op

_UNIT_OUTPUTS: dict[str, list[TensorSpec]] = {}


@torch.library.custom_op("meshplan::unit", mutates_args=())
def _unit_op(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """A whole block, as one node of the skeleton graph; it only ever runs on fake tensors."""
    raise RuntimeError("meshplan::unit stands for a traced block and has no real kernel")


@_unit_op.register_fake
def _unit_op_fake(inputs, key):
    return [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device="cpu") for s in _UNIT_OUTPUTS[key]]


@dataclass
class UnitCall:
    """One call of a block during the skeleton trace."""

    path: str
    kind: str
    module: nn.Module
    signature: str
    call: Call          # its inputs (specs) and their structure
    out_tree: Any
    out_leaves: list     # TensorSpec for tensors, values otherwise


class _UnitStubs:
    """While active, calling a unit records the call and returns the outputs of one
    `meshplan::unit` op instead of running the block; the first call of each signature
    runs the real block (untraced) to learn its output shapes."""

    def __init__(self, units: dict[str, str], model: nn.Module):
        self.units = {path: (model.get_submodule(path), kind) for path, kind in units.items()}
        self.calls: list[UnitCall] = []
        self.outputs: dict[str, tuple[Any, list]] = {}
        self.token = f"{id(self)}:{time.perf_counter_ns()}"
        self._module_sigs: dict[int, str] = {}
        self._saved: dict[int, Any] = {}

    def __enter__(self):
        for path, (mod, kind) in self.units.items():
            own = self._saved[id(mod)] = mod.__dict__.get("forward")
            forward = own if own is not None else type(mod).forward.__get__(mod)
            mod.forward = functools.partial(self._stub, path, kind, mod, forward)
        return self

    def __exit__(self, *exc):
        for mod, _ in self.units.values():
            saved = self._saved.pop(id(mod), None)
            if saved is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
        for key in [k for k in _UNIT_OUTPUTS if k.startswith(self.token)]:
            del _UNIT_OUTPUTS[key]

    def _module_sig(self, mod):
        if id(mod) not in self._module_sigs:
            self._module_sigs[id(mod)] = module_signature(mod)
        return self._module_sigs[id(mod)]

    def _stub(self, path, kind, mod, forward, *args, **kwargs):
        call = Call.from_example(args, kwargs)
        sig = f"{type(mod).__name__}:" + digest(self._module_sig(mod), *map(value_key, call.leaves))
        if sig not in self.outputs:
            with disable_proxy_modes_tracing():
                out = forward(*args, **kwargs)
            leaves, tree = tree_flatten(out)
            specs = [TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves]
            self.outputs[sig] = (tree, specs)
            _UNIT_OUTPUTS[f"{self.token}:{sig}"] = [s for s in specs if isinstance(s, TensorSpec)]
        tree, specs = self.outputs[sig]
        self.calls.append(UnitCall(path, kind, mod, sig, call, tree, specs))
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        with torch.no_grad():
            outs = iter(_unit_op(tensors, f"{self.token}:{sig}"))
        leaves = []
        for spec in specs:
            if isinstance(spec, TensorSpec):
                t = next(outs)
                leaves.append(t.requires_grad_() if spec.requires_grad else t)
            else:
                leaves.append(spec)
        return tree_unflatten(leaves, tree)


# ----------------------------------------------------------------------------- skeleton trace

class _LeafTracer(fx.Tracer):
    """symbolic_trace that keeps each unit (block) as one call_module node."""

    def __init__(self, unit_modules):
        super().__init__()
        self.unit_ids = {id(m) for m in unit_modules}

    def is_leaf_module(self, m, qualname):
        return id(m) in self.unit_ids or super().is_leaf_module(m, qualname)


@dataclass
class Skeleton:
    gm: fx.GraphModule        # aten graph; placeholders = state tensors, then input tensors
    state_names: list
    state_is_param: list
    state_requires_grad: list
    call: Call
    calls: list               # UnitCall per meshplan::unit node, in graph order


def _symbolic_root(module: nn.Module, call: Call, units: dict[str, str]) -> nn.Module:
    """Route 1: an fx GraphModule of the model with each block as one call_module node.

    The call's tensor arguments become placeholders; its other arguments and the defaults
    of the ones it leaves out are baked in as concrete values."""
    slot = object()
    args, kwargs = call.rebuild([slot] * len(call.tensor_specs()))
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    concrete = {}
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if bound.get(p.name):
                raise _RouteUnsupported(f"fx cannot take arguments through *{p.name}")
        elif p.name not in bound:
            concrete[p.name] = None if p.default is inspect.Parameter.empty else p.default
        elif bound[p.name] is not slot:
            if any(x is slot for x in tree_flatten(bound[p.name])[0]):
                raise _RouteUnsupported(f"fx cannot take tensors nested in argument {p.name!r}")
            concrete[p.name] = bound[p.name]
    tracer = _LeafTracer([module.get_submodule(p) for p in units])
    graph = tracer.trace(module, concrete_args=concrete or None)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def leaf_graph_module(module: nn.Module, call: Call, units: dict[str, str]) -> fx.GraphModule:
    """The model as torch.fx traces it with every unit (block) one call_module node of the
    original module - route 1 - for the runtime to cut into pipeline stages (runtime.split).
    MeshplanError, naming where, when fx cannot trace it."""
    try:
        return _symbolic_root(module, call, units)
    except Exception as exc:  # the model's code (control flow fx cannot follow)
        if _raised_by_tracer(exc) and not isinstance(exc, _RouteUnsupported):
            raise
        raise MeshplanError(_describe_failure(ROUTES[0], exc)) from None


class _RouteUnsupported(Exception):
    """A route cannot take this model (raised by the tracer itself, not a bug)."""


def trace_skeleton(module, name, call, units, precision, kernels, low=None) -> tuple[Skeleton, str]:
    """Try the routes in order; one MeshplanError naming each route's failure if all fail."""
    failures = []
    for route in ROUTES:
        try:
            root = _symbolic_root(module, call, units) if route == ROUTES[0] else module
            return _lower(root, module, call, units, precision, kernels, low), route
        except MeshplanError:
            raise
        except Exception as exc:  # a failure in the model's code (or torch's) sends us to the next route
            if _raised_by_tracer(exc) and not isinstance(exc, _RouteUnsupported):
                raise  # a bug in meshplan: do not disguise it as the model's fault
            failures.append(_describe_failure(route, exc))
    raise MeshplanError(f"cannot trace {name}: " + "; ".join(failures))


def _raised_by_tracer(exc: BaseException) -> bool:
    frames = list(traceback.walk_tb(exc.__traceback__))
    return bool(frames) and os.path.dirname(os.path.abspath(frames[-1][0].f_code.co_filename)) == _PACKAGE_DIR


def _lower(root: nn.Module, model: nn.Module, call: Call, units, precision, kernels, low=None) -> Skeleton:
    """make_fx of `root` on fake CPU tensors under autocast (or with parameters in the low
    dtype `low`), blocks as meshplan::unit ops."""
    fake = FakeTensorMode()
    with fake:
        names, state, is_param = fake_state(root, low)
        tensors = [s.make() for s in call.tensor_specs()]

    def step(state_list, tensor_list):
        args, kwargs = call.rebuild(tensor_list)
        out = functional_call(root, dict(zip(names, state_list)), args, kwargs)
        return primary_output(out)

    stubs = _UnitStubs(units, model)
    with fake, autocast(precision, low is None), module_stack(model), stubs, kernel_choices(kernels):
        gm = make_fx(step, tracing_mode="real")(state, tensors)
    unit_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.meshplan.unit.default]
    assert len(unit_nodes) == len(stubs.calls), "every block call is one unit node"
    return Skeleton(gm, names, is_param, [t.requires_grad for t in state], call, stubs.calls)


# ----------------------------------------------------------------------------- errors

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # planner/trace/: the tracer's own code
_STDLIB_DIR = os.path.dirname(os.__file__)


def _user_frame(exc: BaseException):
    """The deepest traceback frame in model code (not torch, not meshplan's tracer, not
    the standard library): where the untraceable construct is."""
    best = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = os.path.abspath(frame.f_code.co_filename)
        if (filename.startswith(_TORCH_DIR) or os.path.dirname(filename) == _PACKAGE_DIR
                or filename.startswith(_STDLIB_DIR) or filename.startswith("<")):
            continue
        best = (filename, lineno, frame.f_code.co_name)
    return best


def _describe_failure(route: str, exc: BaseException) -> str:
    """One clause of the error: route, where in the model code, what failed."""
    message = " ".join(str(exc).split())
    for marker in (" While executing", " Original traceback", " Exception raised from"):
        message = message.split(marker)[0]
    if len(message) > 200:
        message = message[:197] + "..."
    if "_local_scalar_dense" in message or "data-dependent" in message.lower() or "DataDependent" in type(exc).__name__:
        message += " (Python control flow or .item() on tensor values)"
    where = ""
    frame = _user_frame(exc)
    if frame is not None:
        filename, lineno, func = frame
        code = linecache.getline(filename, lineno).strip()
        where = f" at {os.path.basename(filename)}:{lineno} in {func}" + (f" (`{code}`)" if code else "")
    return f"{route} failed{where}: {type(exc).__name__}: {message}"

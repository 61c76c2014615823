"""What a traced step takes: the model resolved to a module, its example call as tensor
specs, the step's checks (micro-batch, seq, precision), and where backward starts."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from cost_models.errors import MeshplanError
from planner import hf
from planner.models import Decoder
from planner.plan import PRECISIONS
from planner.zoo import ModelSpec, load_model



@dataclass(frozen=True)
class TensorSpec:
    """Shape, strides, dtype and requires_grad of a tensor: enough to recreate it fake."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    requires_grad: bool = False

    @classmethod
    def of(cls, t: torch.Tensor, requires_grad: bool | None = None) -> "TensorSpec":
        rg = t.requires_grad if requires_grad is None else requires_grad
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, bool(rg))

    def make(self, device: str | torch.device = "cpu") -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)
        return t.requires_grad_() if self.requires_grad else t

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize

    def key(self) -> str:
        return f"T{self.shape}{self.stride}{self.dtype}{'g' if self.requires_grad else ''}"


@dataclass
class Call:
    """The arguments of a call, tensors replaced by their specs: (args, kwargs) as a pytree."""

    tree: Any
    leaves: list

    @classmethod
    def from_example(cls, args: tuple, kwargs: dict) -> "Call":
        leaves, tree = tree_flatten((tuple(args), dict(kwargs)))
        leaves = [TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        return cls(tree, leaves)

    def tensor_specs(self) -> list[TensorSpec]:
        return [x for x in self.leaves if isinstance(x, TensorSpec)]

    def rebuild(self, tensors: list) -> tuple[tuple, dict]:
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorSpec) else x for x in self.leaves]
        return tree_unflatten(leaves, self.tree)

    def build(self, device="cpu") -> tuple[tuple, dict]:
        return self.rebuild([s.make(device) for s in self.tensor_specs()])

    def cast_floating(self, dtype: torch.dtype | None) -> "Call":
        """The call with its floating tensors in `dtype` (None: unchanged): what FSDP2's
        MixedPrecisionPolicy(cast_forward_inputs=True) does to a module's inputs when its
        parameters are held in the low precision (torch/distributed/fsdp/_fully_shard/
        _fsdp_state.py, FSDPState._cast_forward_inputs)."""
        if dtype is None:
            return self
        leaves = [replace(x, dtype=dtype) if isinstance(x, TensorSpec) and x.dtype.is_floating_point else x
                  for x in self.leaves]
        return Call(self.tree, leaves)


def check_step(micro_batch, seq, precision):
    for key, value in (("micro_batch", micro_batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeshplanError(f"{key} must be a whole number >= 1, got {value!r}")
    if precision not in PRECISIONS:
        raise MeshplanError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")


def resolve(model, micro_batch: int, seq: int, inputs) -> tuple[nn.Module, str, Call]:
    """The module (on meta unless the caller built it elsewhere), a display name, and its call."""
    if isinstance(model, (str, Path, dict)) and hf.is_hf_config(model):
        model = hf.hf_model_from_config(model)
    elif isinstance(model, (str, dict)):
        model = load_model(model)
    factory_module = None
    if isinstance(model, ModelSpec):
        name = model.name
        if model.factory is not None:
            factory_module = sys.modules.get(getattr(model.factory, "__module__", None))
        model = model.build("meta")
    elif isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "name", None) if isinstance(model, Decoder) else None
        name = name or (hf.hf_model_name(model) if hf.is_hf_model(model) else type(model).__name__)
        factory_module = sys.modules.get(type(model).__module__)
    else:
        raise MeshplanError(f"cannot trace a {type(model).__name__}: pass an nn.Module, a preset name, "
                            "a JSON config, file.py:factory or a Hugging Face config")
    return model, name, _example_call(model, name, micro_batch, seq, inputs, factory_module)


def _example_call(model, name, micro_batch, seq, inputs, factory_module) -> Call:
    if inputs is not None:
        return _call_from_user(inputs, micro_batch, seq, name)
    if isinstance(model, Decoder):
        if seq > model.config.max_seq:
            raise MeshplanError(f"sequence length {seq} exceeds {name}'s max_seq {model.config.max_seq}")
        idx = TensorSpec((micro_batch, seq), (seq, 1), torch.int64)
        return Call.from_example((idx.make("meta"), idx.make("meta")), {})
    if hf.is_hf_model(model):
        limit = hf.hf_max_positions(model)
        if limit is not None and seq > limit:
            raise MeshplanError(f"sequence length {seq} exceeds {name}'s max_position_embeddings {limit}")
        ids = torch.empty(micro_batch, seq, dtype=torch.int64, device="meta")
        return Call.from_example((), dict(input_ids=ids, labels=ids.clone(), use_cache=False))
    maker = getattr(factory_module, "example_inputs", None)
    if not callable(maker):
        raise MeshplanError(f"model {name!r} is not a zoo or Hugging Face model: define "
                            "example_inputs(micro_batch, seq) next to its factory, or pass inputs=")
    return _call_from_user(maker, micro_batch, seq, name)


def _call_from_user(inputs, micro_batch, seq, name) -> Call:
    if callable(inputs):
        try:
            with torch.device("meta"):
                inputs = inputs(micro_batch, seq)
        except MeshplanError:
            raise
        except Exception as exc:  # the user's function: its errors are theirs to fix
            raise MeshplanError(f"example_inputs of {name!r} failed: {type(exc).__name__}: {exc}")
    if isinstance(inputs, torch.Tensor):
        return Call.from_example((inputs,), {})
    if isinstance(inputs, dict):
        return Call.from_example((), inputs)
    if isinstance(inputs, (tuple, list)):
        return Call.from_example(tuple(inputs), {})
    raise MeshplanError(f"example inputs of {name!r} must be a tensor, a tuple or a dict, "
                        f"not {type(inputs).__name__}")


def primary_output(out):
    """The tensor a training step calls backward on: the loss, else the first tensor."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise MeshplanError(f"the model returned no tensor ({type(out).__name__}); nothing to train")


def backward_from(outputs: list):
    """Backward from every float output that needs grad (ones as the incoming gradient).

    Runs autograd's engine directly: `torch.autograd.backward` is itself a torch function,
    and a TorchFunctionMode's handler runs it with the mode popped, so the kernel choices
    (`kernel_choices`) would not reach a checkpoint that recomputes in backward."""
    outs = tuple(t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad)
    if outs:
        torch.autograd.graph._engine_run_backward(outs, tuple(torch.ones_like(t) for t in outs), False, False,
                                                  (), True, True)

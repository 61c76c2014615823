"""Which modules become layers (find_units) and the signatures that tell equal blocks
apart, so that each distinct block is costed once."""
from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn as nn

from planner.trace.inputs import TensorSpec

# Attributes that only number a layer (HF's layer_idx picks a KV-cache slot): two blocks
# differing only here compute the same thing.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num",
                          "block_idx", "block_id", "block_index"})


def _is_repeated(container: nn.Module) -> bool:
    """A trunk of blocks: a ModuleList/ModuleDict of 2+ callable modules (their classes
    may differ - hybrid stacks - signatures tell the blocks apart), or an nn.Sequential
    of 2+ modules of one class (a Sequential of mixed classes is a plain pipeline)."""
    children = list(container.children())
    if len(children) < 2 or any(isinstance(c, (nn.ModuleList, nn.ModuleDict)) for c in children):
        return False
    if isinstance(container, nn.Sequential):
        return len({type(c) for c in children}) == 1
    return isinstance(container, (nn.ModuleList, nn.ModuleDict))


def find_units(model: nn.Module) -> dict[str, str]:
    """Module path -> layer kind ("block" or "other") of the modules that become layers.

    Blocks: children of the outermost trunks (`_is_repeated`). Without any, an
    nn.Sequential model's children become layers of kind "other"."""
    units: dict[str, str] = {}

    def visit(module: nn.Module, path: str):
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if _is_repeated(child):
                units.update({f"{child_path}.{n}": "block" for n, _ in child.named_children()})
            else:
                visit(child, child_path)

    if _is_repeated(model):
        return {n: "block" for n, _ in model.named_children()}
    visit(model, "")
    if not units and isinstance(model, nn.Sequential):
        units = {n: "other" for n, _ in model.named_children()}
    return units


def _plain(value, depth=0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)) and depth < 2 and len(value) <= 64:
        return all(_plain(v, depth + 1) for v in value)
    return False


@functools.lru_cache(maxsize=None)
def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_signature(module: nn.Module) -> str:
    """Hash of what makes two modules compute the same thing on the same inputs."""
    h = hashlib.sha1()
    for name, sub in module.named_modules():
        h.update(f"|{name}:{_class_name(type(sub))}:{sub.training}".encode())
        for key, value in sorted(vars(sub).items()):
            if not key.startswith("_") and key not in _INDEX_ATTRS and key != "training" and _plain(value):
                h.update(f"{key}={value!r};".encode())
        for kind, tensors in (("P", sub._parameters), ("B", sub._buffers)):
            for key, t in tensors.items():
                if t is not None:
                    h.update(f"{kind}{key}{tuple(t.shape)}{t.dtype}{t.requires_grad};".encode())
    return h.hexdigest()


def value_key(value) -> str:
    if isinstance(value, TensorSpec):
        return value.key()
    if _plain(value):
        return repr(value)
    return _class_name(type(value))


def digest(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]

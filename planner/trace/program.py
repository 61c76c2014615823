"""A layer as something the tracer can trace and run (shared by layers, ops and saved)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
import torch.nn as nn


@dataclass
class Program:
    """A layer as something we can trace and run: fn(state, tensors) -> outputs."""

    fn: Callable
    state_names: list         # model paths of the parameters/buffers it takes
    state_specs: list         # TensorSpec of each (requires_grad = trainable parameter)
    state_is_param: list
    input_specs: list         # TensorSpec of each input tensor
    autocast: bool            # module code: run under autocast; an aten replay already has the casts
    graph: fx.GraphModule | None = None   # its aten graph when already known
    output_specs: list = field(default_factory=list)
    module: nn.Module | None = None       # a block's module (its recompute_attention flag)

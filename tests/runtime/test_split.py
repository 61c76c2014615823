"""runtime.split: a factory model cut into pipeline stages at its block boundaries computes what
the whole model computes, in one process: the stages chained by hand give the same loss and
gradients, the labels ride through the stages that do not use them, arguments fx took as
constants reach no stage, and a weight two stages would share is refused in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cost_models import MeshplanError
from planner.trace.inputs import Call
from planner.trace.signature import find_units
from planner.trace.skeleton import leaf_graph_module
from runtime.split import split_stages

pytestmark = pytest.mark.runtime


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*[Block() for _ in range(4)])
        self.out = nn.Linear(8, 3)

    def forward(self, x, labels, scale=None):
        h = self.blocks(self.inp(x))
        if scale is not None:   # fx takes the unused default as a constant
            h = h * scale
        return F.cross_entropy(self.out(h), labels)


def _cut(model, x, y, block_stage, stages):
    gm = leaf_graph_module(model, Call.from_example((x, y), {}), find_units(model))
    return split_stages(gm, model, block_stage, stages)


def test_stages_chained_compute_the_models_loss_and_gradients():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    parts = _cut(model, x, y, {"blocks.0": 0, "blocks.1": 1, "blocks.2": 1, "blocks.3": 2}, 3)
    assert [sorted({n.split(".")[0] + "." + n.split(".")[1] for n, _ in p.named_parameters()}) for p in parts] == [
        ["blocks.0", "inp.bias", "inp.weight"], ["blocks.1", "blocks.2"], ["blocks.3", "out.bias", "out.weight"]]
    out = parts[0](x, y)
    assert isinstance(out, tuple) and out[0].dtype == torch.int64   # the labels, handed on
    out = parts[1](*out)
    loss = parts[2](*out)
    assert loss.shape == (1,)   # the schedule concatenates it over micro-batches
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x, y)
    expected.backward()
    torch.testing.assert_close(loss[0], expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_an_empty_stage_hands_its_inputs_on():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    parts = _cut(model, x, y, {"blocks.0": 0, "blocks.1": 0, "blocks.2": 2, "blocks.3": 2}, 3)
    assert not list(parts[1].parameters())
    torch.testing.assert_close(parts[2](*parts[1](*parts[0](x, y)))[0], model(x, y))


def test_a_weight_used_by_two_stages_is_refused():
    model, x, y = Net(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    model.blocks[3].fc = model.blocks[0].fc   # one Linear called in the first and the last stage
    with pytest.raises(MeshplanError, match="blocks.0.fc.weight is used by pipeline stages 0 and 1") as err:
        _cut(model, x, y, {"blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "blocks.3": 1}, 2)
    assert "\n" not in str(err.value)

"""A residual MLP classifier as a meshplan factory: `--model examples/mlp.py:factory`.

    meshplan plan --model examples/mlp.py:factory --cluster dgx-a100 --global-batch 1024 --seq 1

Eight pre-norm residual blocks (LayerNorm, Linear to 4x the width, GELU, Linear back) in
one nn.Sequential, so meshplan finds them as the model's repeated blocks: the pipeline
cuts between blocks, and tensor parallelism can split each block's two linears (the first
column-wise, the second row-wise) as Megatron-LM splits a transformer's MLP. `wide` is the
same model at a width where that pays on A100s. The loss is computed in forward, so
`meshplan train` trains it as it is.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES, CLASSES = 32, 10


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 8):
        super().__init__()
        self.inp = nn.Linear(FEATURES, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x, labels):
        logits = self.out(self.norm(self.blocks(self.inp(x))))
        return F.cross_entropy(logits.float(), labels)


def factory():
    return ResidualMLP()


def wide():
    return ResidualMLP(width=8192)


def example_inputs(micro_batch, seq):
    """Features and labels; the label is the largest of the first CLASSES features, so the
    loss can fall. An MLP has no sequence: `seq` is unused (plan with --seq 1)."""
    x = torch.randn(micro_batch, FEATURES)
    return x, x[:, :CLASSES].argmax(dim=1)

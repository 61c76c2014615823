"""A small ResNet (He et al. 2016, the CIFAR variant) as a meshplan factory:
`--model examples/resnet.py:factory`.

    meshplan plan --model examples/resnet.py:factory --cluster dgx-a100 --global-batch 1024 --seq 1

Three stages of BasicBlocks (two 3x3 convolutions with BatchNorm, and a 1x1 projection
where the shape changes), two blocks each, on 16x16 images: small enough to train on CPU
ranks in seconds (`ResNet(widths=(16, 32, 64), blocks_per_stage=3)` on 32x32 images is
CIFAR's ResNet-20). The blocks sit in one nn.Sequential of one class, so meshplan finds
them as the repeated blocks the pipeline cuts between. Written here because torchvision
is not a meshplan dependency.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE, CLASSES = 16, 10


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), blocks_per_stage: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, width, 2 if i and not j else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, images, labels):
        features = self.blocks(self.stem(images)).mean(dim=(2, 3))
        return F.cross_entropy(self.fc(features).float(), labels)


def factory():
    return ResNet()


def example_inputs(micro_batch, seq):
    """Images and labels; the label is the brightest colour channel, so the loss can fall.
    Images have no sequence: `seq` is unused (plan with --seq 1)."""
    images = torch.randn(micro_batch, 3, IMAGE, IMAGE)
    return images, images.mean(dim=(2, 3)).argmax(dim=1)

"""Training data: each data-parallel rank gets its own rows of every global batch.

A global batch is `global_batch` sequences of `seq + 1` tokens (inputs and targets
shifted by one). Sequence k of the run (k = 0, 1, 2, ...) is fixed by the source and
the seed alone, so the global batch of a step is the same whatever the layout: dp rank
r takes rows [r * G/dp, (r+1) * G/dp) of it, and its micro-batches are consecutive
runs of `micro_batch` of those rows, in order. The loader's whole state is the number
of sequences consumed, which checkpoints save and resume from.

Sources:
- `synthetic`: sequence k is an arithmetic progression modulo the vocabulary with a
  start and stride drawn from a generator seeded by (seed, k) - random, but learnable,
  so the loss visibly falls; only the rows a rank needs are generated.
- a `.npy` file of token ids (1-D, integer dtype; e.g. np.save of np.uint16 tokens),
  read through a memory map: the file is cut into windows of seq + 1 tokens starting
  every `seq` tokens, visited in a fresh seeded permutation each epoch; a rank reads
  only its own windows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cost_models.errors import MeshplanError


class _Source:
    name = "source"

    def rows(self, first: int, count: int) -> np.ndarray:
        """Sequences first .. first+count-1 of the run, as a (count, seq+1) int64 array."""
        raise NotImplementedError


class SyntheticSource(_Source):
    name = "synthetic"

    def __init__(self, vocab: int, seq: int, seed: int):
        self.vocab, self.seq, self.seed = vocab, seq, seed

    def rows(self, first, count):
        out = np.empty((count, self.seq + 1), dtype=np.int64)
        steps = np.arange(self.seq + 1, dtype=np.int64)
        for i in range(count):
            gen = np.random.default_rng([self.seed, first + i])
            start, stride = gen.integers(0, self.vocab), gen.integers(1, max(2, self.vocab))
            out[i] = (start + stride * steps) % self.vocab
        return out


class MemmapSource(_Source):
    def __init__(self, path: str, vocab: int, seq: int, seed: int):
        p = Path(path)
        if not p.is_file():
            raise MeshplanError(f"data file {path!r} does not exist")
        if p.suffix != ".npy":
            raise MeshplanError(f"data file {path!r} must be a .npy array of token ids (np.save), or use --data synthetic")
        try:
            tokens = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise MeshplanError(f"cannot read {path!r} as a numpy array: {str(exc).splitlines()[0]}")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise MeshplanError(f"data file {path!r} holds a {tokens.ndim}-D {tokens.dtype} array; "
                                f"it must be a 1-D array of integer token ids")
        if len(tokens) < seq + 1:
            raise MeshplanError(f"data file {path!r} has {len(tokens)} tokens, fewer than seq + 1 = {seq + 1}")
        self.name = p.name
        self.path, self.tokens, self.vocab, self.seq, self.seed = path, tokens, vocab, seq, seed
        self.windows = (len(tokens) - 1) // seq
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._perm_epoch = epoch
        return self._perm

    def rows(self, first, count):
        out = np.empty((count, self.seq + 1), dtype=np.int64)
        for i in range(count):
            epoch, pos = divmod(first + i, self.windows)
            start = int(self._permutation(epoch)[pos]) * self.seq
            out[i] = self.tokens[start:start + self.seq + 1]
        bad = (out < 0) | (out >= self.vocab)
        if bad.any():
            raise MeshplanError(f"data file {self.path!r} has token id {int(out[bad][0])} outside the model's "
                                f"vocabulary [0, {self.vocab}): tokenise for this model")
        return out


def make_source(data: str, vocab: int, seq: int, seed: int) -> _Source:
    if data == "synthetic":
        return SyntheticSource(vocab, seq, seed)
    return MemmapSource(data, vocab, seq, seed)


class Loader:
    """This dp rank's micro-batches of each global batch, and the position to resume from."""

    def __init__(self, source: _Source, global_batch: int, micro_batch: int, dp: int, dp_rank: int,
                 device: torch.device, position: int = 0):
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.dp, self.dp_rank, self.device = dp, dp_rank, device
        self.position = position          # sequences of the run consumed so far (all ranks together)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: (inputs, targets), each (G/dp, seq)."""
        first = self.position + self.dp_rank * self.local_batch
        rows = torch.from_numpy(self.source.rows(first, self.local_batch))
        self.position += self.global_batch
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor):
        m = self.micro_batch
        return [(inputs[i:i + m], targets[i:i + m]) for i in range(0, inputs.shape[0], m)]

    def state_dict(self) -> dict:
        return {"position": self.position, "source": self.source.name}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])

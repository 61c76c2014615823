"""What FSDP2 gathers, reduces and keeps, action by action, as the runtime drives it.

FSDP2 (`torch.distributed.fsdp.fully_shard`, one parameter group per block plus the
part's root) keeps a group's parameters sharded and all-gathers them before a forward or
a backward that finds them sharded. After a forward it reshards them when
`reshard_after_forward` is set (ZeRO-3; the runtime sets it explicitly, so the root
group reshards too: `FSDPState._lazy_init` keeps the root gathered only when the flag
was left to its default). After a backward it reshards when `reshard_after_backward`,
and reduce-scatters the gradient when `requires_gradient_sync`; without it the
unsharded gradient is kept and accumulated, in the reduce dtype
(`FSDPParam.to_accumulated_grad_if_needed`: fp32 under the runtime's bf16/fp16 policy),
until a backward that does reduce.

The runtime drives those flags two ways (torch/distributed/fsdp/_fully_shard/
_fsdp_param_group.py `post_backward`; torch/distributed/pipelining/stage.py):
- no pipeline (`runtime.engine.Engine.step`): FSDP's defaults, so every micro-batch's
  backward reduce-scatters and reshards;
- a pipeline stage: `backward_maybe_with_nosync` turns `reshard_after_backward` and
  `requires_gradient_sync` off for every backward; `perform_reduce_grad`, after the
  stage's last backward, reduce-scatters once and reshards. So after its first backward
  a stage holds every layer's unsharded parameters and an unsharded fp32 gradient until
  the step's reduction (ZeRO-3 still reshards after each later forward, and gathers
  again for the next backward).

`play` runs one chunk's actions (a pipeline rank's forwards and backwards of one
virtual stage, in order) through that state machine; the simulator charges the
collectives and the memory it returns, and tests/parity/test_comm_volume.py checks them
against what the runtime sends.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Drive:
    """How the runtime sets FSDP2's per-backward flags for one plan."""

    reshard_after_forward: bool
    reshard_after_backward: bool   # on every backward but the step's last
    reduce_every_backward: bool    # requires_gradient_sync on every backward
    reduce_after_last: bool        # once a step, after the last backward (a pipeline stage)


@dataclass(frozen=True)
class Traffic:
    """One chunk's FSDP collectives in one step, and what it keeps between micro-batches."""

    forward_gathers: frozenset      # micro-batches whose forward all-gathers the parameters
    backward_gathers: frozenset     # micro-batches whose backward all-gathers them
    backward_reduces: frozenset     # micro-batches whose backward reduce-scatters inside it
    reduce_after_last: bool         # one more reduce-scatter after the last backward
    holds_unsharded: bool           # unsharded parameters and gradient kept across micro-batches

    @property
    def gathers_per_step(self) -> int:
        return len(self.forward_gathers) + len(self.backward_gathers)

    @property
    def reduce_scatters_per_step(self) -> int:
        return len(self.backward_reduces) + self.reduce_after_last


def drive(zero: int, pipelined: bool, dp: int, replicate_zero0: bool = True) -> Drive | None:
    """The flags the runtime gives FSDP2 (None: no FSDP-family wrapper).

    ZeRO 2/3 are `fully_shard` with FSDP's defaults. ZeRO 1 is `fully_shard` too, as
    Megatron-LM's distributed optimizer runs: parameters kept unsharded and gradients
    accumulated unsharded over the step's micro-batches, reduce-scattered once, the
    optimizer stepping on its 1/dp shard and the next step all-gathering the result
    (runtime.engine sets the flags per micro-batch; a pipeline stage does it anyway).
    ZeRO 0 with dp > 1 is the FSDP-family `replicate`
    (torch/distributed/_composable/replicate_with_fsdp.py: a one-way "shard", no reshard
    after forward), whose unsharded parameters are a second copy of the parameters,
    gathered locally - no collective - and kept from forward to backward;
    `replicate_zero0=False` for an engine whose ZeRO 0 is plain DDP."""
    if zero == 0 and (dp == 1 or not replicate_zero0):
        return None
    if pipelined:
        return Drive(zero == 3, reshard_after_backward=False, reduce_every_backward=False, reduce_after_last=True)
    if zero == 1:
        return Drive(False, reshard_after_backward=False, reduce_every_backward=False, reduce_after_last=False)
    return Drive(zero == 3, reshard_after_backward=True, reduce_every_backward=zero >= 2, reduce_after_last=False)


@lru_cache(maxsize=256)
def in_sequence(micro_batches: int) -> tuple:
    """Actions of micro-batches run one after another, forward then backward."""
    return tuple(action for mb in range(micro_batches) for action in (("F", mb), ("B", mb)))


@lru_cache(maxsize=1024)
def play(how: Drive, actions: tuple) -> Traffic:
    """Run one chunk's ((kind, micro_batch), ...) actions, in the order the rank runs them,
    through FSDP2's gather/reshard state; the chunk starts the step sharded. The step's
    last backward reduces and reshards inside it unless a pipeline stage reduces after it."""
    sharded = True
    forward, backward, reduces = set(), set(), set()
    last = max((i for i, (kind, _) in enumerate(actions) if kind == "B"), default=-1)
    for i, (kind, micro_batch) in enumerate(actions):
        if sharded:
            (forward if kind == "F" else backward).add(micro_batch)
            sharded = False
        if kind == "F":
            sharded = how.reshard_after_forward
        elif i == last and not how.reduce_after_last:
            reduces.add(micro_batch)
            sharded = True
        else:
            if how.reduce_every_backward:
                reduces.add(micro_batch)
            sharded = how.reshard_after_backward
    return Traffic(frozenset(forward), frozenset(backward), frozenset(reduces), how.reduce_after_last,
                   holds_unsharded=not how.reshard_after_backward)

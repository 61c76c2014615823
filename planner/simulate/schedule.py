"""Pipeline schedules as data, and an event simulation of them.

A schedule is, for each pipeline rank, the ordered list of actions it runs:
`Action("F", micro_batch, chunk)` or `Action("B", micro_batch, chunk)`. Rank r's chunk c
holds virtual stage `c * pp + r` (Megatron's interleaving; with one chunk the virtual
stage is the rank). This mirrors torch.distributed.pipelining, whose schedules are
per-rank action lists too, so a plan's schedule can be dry-run and drawn without a GPU.

`simulate_pipeline` plays the lists against durations: each rank has one compute stream
that runs its actions in order; an action starts when the rank is free and its input
has arrived (forward: the previous virtual stage's forward of the same micro-batch plus
a point-to-point transfer; backward: the next virtual stage's backward plus a
transfer, and its own forward). Bubbles, and how much of the transfers is hidden, fall
out of the timeline rather than a closed formula.

`in_flight_peak` counts, per rank, the most micro-batch chunks whose forward has run
but whose backward has not: activation memory is that count times one chunk's saved
activations (1F1B gives p - r on rank r; GPipe gives every micro-batch; interleaving
gives Korthikanti et al.'s larger count on the first rank).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from cost_models.errors import MeshplanError


class Action(NamedTuple):   # a tuple: cheap to build, hash and unpack
    kind: str          # "F" or "B"
    micro_batch: int
    chunk: int = 0


@lru_cache(maxsize=256)
def build_schedule(schedule: str, pp: int, micro_batches: int, chunks: int = 1) -> tuple[tuple[Action, ...], ...]:
    """Per-rank action lists for gpipe, 1f1b or interleaved (chunks > 1). Immutable and
    cached: the planner simulates many plans with the same pipeline shape."""
    _check_shape(schedule, pp, micro_batches, chunks)
    if schedule == "gpipe":
        ranks = [_gpipe(micro_batches, chunks) for _ in range(pp)]
    elif schedule == "1f1b":
        ranks = [_one_f_one_b(pp, r, micro_batches) for r in range(pp)]
    else:
        ranks = [_interleaved(pp, r, micro_batches, chunks) for r in range(pp)]
    return tuple(tuple(actions) for actions in ranks)


def _check_shape(schedule: str, pp: int, micro_batches: int, chunks: int) -> None:
    if micro_batches < 1 or pp < 1 or chunks < 1:
        raise MeshplanError("a pipeline needs pp, micro-batches and chunks >= 1")
    if schedule not in ("gpipe", "1f1b", "interleaved"):
        raise MeshplanError(f"unknown schedule {schedule!r}; use gpipe, 1f1b or interleaved")
    if schedule == "1f1b" and chunks != 1:
        raise MeshplanError("1f1b runs one chunk per rank: use schedule 'interleaved' for chunks > 1")
    if schedule == "interleaved" and micro_batches % pp:
        raise MeshplanError(f"interleaved needs micro-batches ({micro_batches}) divisible by pp ({pp})")


def _gpipe(m: int, chunks: int) -> list[Action]:
    forwards = [Action("F", mb, c) for c in range(chunks) for mb in range(m)]
    backwards = [Action("B", mb, c) for c in reversed(range(chunks)) for mb in range(m)]
    return forwards + backwards


def _one_f_one_b(pp: int, rank: int, m: int) -> list[Action]:
    warmup = _warmup(pp, rank, m, 1)
    actions = [Action("F", mb) for mb in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < m:
        if next_f < m:
            actions.append(Action("F", next_f))
            next_f += 1
        actions.append(Action("B", next_b))
        next_b += 1
    return actions


def _interleaved(pp: int, rank: int, m: int, chunks: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: micro-batches go through chunks in groups of pp."""
    total = m * chunks

    def forward_at(k):   # the k-th forward this rank runs
        group, pos = divmod(k, pp * chunks)
        return Action("F", group * pp + pos % pp, (k // pp) % chunks)

    def backward_at(k):
        group, pos = divmod(k, pp * chunks)
        return Action("B", group * pp + pos % pp, chunks - 1 - (k // pp) % chunks)

    warmup = _warmup(pp, rank, total, chunks)
    actions = [forward_at(k) for k in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < total:
        if next_f < total:
            actions.append(forward_at(next_f))
            next_f += 1
        actions.append(backward_at(next_b))
        next_b += 1
    return actions


@lru_cache(maxsize=4096)
def in_flight_counts(schedule: str, pp: int, micro_batches: int, chunks: int = 1) -> tuple[int, ...]:
    """in_flight_peak of every rank, without building the action lists: a 1F1B-style rank
    holds its warm-up forwards plus the one of its first steady 1F1B pair."""
    _check_shape(schedule, pp, micro_batches, chunks)
    if schedule == "gpipe":
        return (micro_batches * chunks,) * pp
    total = micro_batches * chunks
    return tuple(min(_warmup(pp, rank, total, chunks) + 1, total) for rank in range(pp))


def _warmup(pp: int, rank: int, total: int, chunks: int) -> int:
    """Forwards a rank runs before its first backward (1F1B; interleaved when chunks > 1)."""
    if chunks == 1:
        return min(pp - rank - 1, total)
    return min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)


def in_flight_peak(actions: list[Action]) -> int:
    """Most (micro-batch, chunk) activations held at once by one rank."""
    held = peak = 0
    for action in actions:
        held += 1 if action.kind == "F" else -1
        peak = max(peak, held)
    return peak


class Event(NamedTuple):   # a tuple: simulations create thousands of them
    rank: int
    kind: str          # "F", "B", "send", "recv-wait"
    micro_batch: int
    chunk: int
    start_s: float
    end_s: float


@dataclass
class PipelineTimeline:
    events: list
    finish_s: list          # per rank: when its last action ends
    busy_s: list            # per rank: compute time
    pp: int

    @property
    def makespan_s(self) -> float:
        return max(self.finish_s)

    def bubble_s(self, rank: int) -> float:
        return self.makespan_s - self.busy_s[rank]

    def to_chrome_trace(self, offset_s: float = 0.0) -> list[dict]:
        """Chrome/Perfetto "X" events: one thread per pipeline rank."""
        names = {"F": "forward", "B": "backward", "send": "p2p"}
        return [dict(name=f"{names.get(e.kind, e.kind)} mb{e.micro_batch} c{e.chunk}", cat=e.kind,
                     ph="X", pid=0, tid=e.rank, ts=(e.start_s + offset_s) * 1e6,
                     dur=(e.end_s - e.start_s) * 1e6) for e in self.events]


def simulate_pipeline(schedule, fwd_s, bwd_s, p2p_s: float = 0.0,
                      blocking_p2p: bool = False, extra_s: dict | None = None) -> PipelineTimeline:
    """Event simulation of `schedule` (per-rank action lists, as build_schedule gives).
    fwd_s[v] / bwd_s[v]: one micro-batch on virtual stage v; `extra_s` adds time to single
    actions, {(kind, micro_batch, virtual stage): seconds} (work that only some
    micro-batches do, such as FSDP's all-gathers under a pipeline).

    `p2p_s` is the time to move one micro-batch's boundary activation (or its gradient)
    to the neighbouring stage. Transfers run beside compute and delay only the receiver,
    or, with `blocking_p2p`, also hold the sender until they are done.
    """
    pp = len(schedule)
    stages = len(fwd_s)
    if len(bwd_s) != stages or stages % pp:
        raise MeshplanError("need one forward and one backward time per virtual stage (pp x chunks)")
    done = {}                 # (kind, mb, virtual stage) -> end time
    cursor = [0] * pp
    free_at = [0.0] * pp
    busy = [0.0] * pp
    events = []
    pending = list(range(pp))
    waiting = defaultdict(list)  # dependency key -> ranks blocked on it
    while pending:
        rank = pending.pop()
        actions = schedule[rank]
        while cursor[rank] < len(actions):
            kind, mb, chunk = action = actions[cursor[rank]]
            vs = chunk * pp + rank
            # the input: the previous stage's forward, or the next stage's backward (the last
            # stage's backward starts from its own forward); a backward needs its own forward
            forward = kind == "F"
            dep = (("F", mb, vs - 1) if vs > 0 else None) if forward else \
                  (("F", mb, vs) if vs == stages - 1 else ("B", mb, vs + 1))
            ready = 0.0
            if dep is not None:
                ready = done.get(dep)
                if ready is None or not forward and ("F", mb, vs) not in done:
                    waiting[dep if ready is None else ("F", mb, vs)].append(rank)
                    break
                if dep[2] % pp != rank:
                    ready += p2p_s
            start = free_at[rank] if free_at[rank] > ready else ready
            key = (kind, mb, vs)
            duration = (fwd_s[vs] if forward else bwd_s[vs]) + (extra_s.get(key, 0.0) if extra_s else 0.0)
            end = start + duration
            done[key] = end
            events.append(Event(rank, kind, mb, chunk, start, end))
            free_at[rank], busy[rank] = end, busy[rank] + duration
            if blocking_p2p and p2p_s > 0 and _sends_to_other_rank(action, vs, stages, pp):
                events.append(Event(rank, "send", mb, chunk, end, end + p2p_s))
                free_at[rank] = end + p2p_s
            cursor[rank] += 1
            if key in waiting:
                pending.extend(waiting.pop(key))
    stuck = [r for r in range(pp) if cursor[r] < len(schedule[r])]
    if stuck:
        raise MeshplanError(f"pipeline schedule deadlocks on rank(s) {stuck}: its action lists are inconsistent")
    return PipelineTimeline(events, free_at, busy, pp)


def _sends_to_other_rank(action: Action, vs: int, stages: int, pp: int) -> bool:
    """Whether the action's output (activation forward, gradient backward) leaves the rank."""
    consumer = vs + 1 if action.kind == "F" else vs - 1
    return 0 <= consumer < stages and consumer % pp != vs % pp

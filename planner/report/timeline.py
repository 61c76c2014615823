"""The pipeline timeline as data for the report's script (which draws and zooms it), and a
per-rank summary table that stays readable however many micro-batches there are."""
from __future__ import annotations

import json

KINDS = ("F", "B", "send")
# Past this many events the page would hold a rect each (tens of MB of DOM): the timeline is
# drawn from per-rank time bins instead, each split by the share of it each kind fills.
MAX_EVENTS = 40_000
BINS_PER_RANK = 2_000


def _num(x: float) -> float:
    return float(f"{x:.6g}")   # 6 digits: a 30 s step keeps 10 us; halves the page's size


def timeline_data(result) -> dict:
    """{"step_s", "ranks", "kinds", "events": [[rank, kind, mb, chunk, start_s, end_s]...],
    "tails": [[last backward end s, exposed DP comm s, optimizer s] per rank], "binned"}; a
    binned row is [rank, kind, -1, 0, start_s, end_s, share of the time, share below it]."""
    timeline = result.timeline
    events = [e for e in timeline.events if e.kind in KINDS]
    binned = len(events) > MAX_EVENTS
    rows = _binned(events, timeline.pp, result.step_time_s) if binned else [
        [e.rank, KINDS.index(e.kind), e.micro_batch, e.chunk, _num(e.start_s), _num(e.end_s)] for e in events]
    tails = result.rank_tails_s or [(0.0, 0.0)] * timeline.pp
    return {"step_s": _num(result.step_time_s), "ranks": timeline.pp, "kinds": list(KINDS), "events": rows,
            "tails": [[_num(timeline.finish_s[r]), _num(dp), _num(opt)] for r, (dp, opt) in enumerate(tails)],
            "binned": binned, "event_count": len(events)}


def _binned(events, ranks: int, step_s: float) -> list[list]:
    """Each rank's step cut into BINS_PER_RANK bins, each split by the share of it every kind
    fills (to a tenth, drawn as stacked heights); runs of bins with equal shares merge."""
    width = step_s / BINS_PER_RANK
    cover = [[[0.0] * len(KINDS) for _ in range(BINS_PER_RANK)] for _ in range(ranks)]
    for e in events:
        k = KINDS.index(e.kind)
        first, last = int(e.start_s / width), min(int(e.end_s / width), BINS_PER_RANK - 1)
        for b in range(first, last + 1):
            overlap = min(e.end_s, (b + 1) * width) - max(e.start_s, b * width)
            if overlap > 0:
                cover[e.rank][b][k] += overlap
    rows = []
    for rank in range(ranks):
        run_shares, run_start = None, 0
        for b in range(BINS_PER_RANK + 1):
            shares = tuple(round(10 * c / width) / 10 for c in cover[rank][b]) if b < BINS_PER_RANK else None
            if shares != run_shares:
                below = 0.0
                for kind, share in enumerate(run_shares or ()):
                    if share > 0:
                        rows.append([rank, kind, -1, 0, _num(run_start * width), _num(b * width), share, _num(below)])
                        below += share
                run_shares, run_start = shares, b
    return rows


def rank_summary(result) -> list[dict]:
    """Per pipeline rank: seconds of forward, backward, blocking sends, idle (bubble), exposed
    data-parallel communication and optimizer step; they add up to the step time."""
    timeline = result.timeline
    tails = result.rank_tails_s or [(0.0, 0.0)] * timeline.pp
    rows = [{"rank": r, "F": 0.0, "B": 0.0, "send": 0.0} for r in range(timeline.pp)]
    for e in timeline.events:
        if e.kind in KINDS:
            rows[e.rank][e.kind] += e.end_s - e.start_s
    for r, row in enumerate(rows):
        row["dp_s"], row["optimizer_s"] = tails[r]
        row["idle_s"] = max(result.step_time_s - row["F"] - row["B"] - row["send"] - row["dp_s"]
                            - row["optimizer_s"], 0.0)
    return rows


def as_script_json(data) -> str:
    """JSON safe inside a <script> element (no '</script>' can close it early)."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")

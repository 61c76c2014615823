"""One simulated step as a Chrome / Perfetto trace (`meshplan simulate --trace FILE`): per
pipeline stage a compute track (forward, backward, optimizer step) and a communication track
(blocking pipeline sends, the exposed data-parallel gradient sync), each named, so that
chrome://tracing or ui.perfetto.dev shows the whole step and not only the pipeline."""
from __future__ import annotations

US_PER_S = 1e6
_NAMES = {"F": "forward", "B": "backward", "send": "pipeline send (blocking)"}


def chrome_trace(result, title: str = "") -> dict:
    """{"traceEvents": [...], "displayTimeUnit": "ms"}: "X" events in microseconds, the tracks
    named by "M" metadata events; `title` names the process (model, cluster and plan)."""
    timeline = result.timeline
    tails = result.rank_tails_s or [(0.0, 0.0)] * timeline.pp
    events = [_meta("process_name", 0, {"name": title or "meshplan simulate"})]
    for rank in range(timeline.pp):
        compute, comm = 2 * rank, 2 * rank + 1
        events += [_meta("thread_name", compute, {"name": f"stage {rank}: compute"}),
                   _meta("thread_sort_index", compute, {"sort_index": compute}),
                   _meta("thread_name", comm, {"name": f"stage {rank}: communication"}),
                   _meta("thread_sort_index", comm, {"sort_index": comm})]
    for e in timeline.events:
        track = 2 * e.rank + (1 if e.kind == "send" else 0)
        events.append(_span(f"{_NAMES.get(e.kind, e.kind)} mb{e.micro_batch}" + (f" c{e.chunk}" if e.chunk else ""),
                            e.kind, track, e.start_s, e.end_s, {"micro_batch": e.micro_batch, "chunk": e.chunk}))
    for rank, (dp_s, optimizer_s) in enumerate(tails):
        start = timeline.finish_s[rank]
        if dp_s > 0:   # the gradient reduction left after backward: the optimizer waits for it
            events.append(_span("data-parallel gradient sync (exposed)", "dp", 2 * rank + 1, start, start + dp_s))
        if optimizer_s > 0:
            events.append(_span("optimizer step", "optimizer", 2 * rank, start + dp_s, start + dp_s + optimizer_s))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _meta(name: str, tid: int, args: dict) -> dict:
    return {"name": name, "ph": "M", "pid": 0, "tid": tid, "args": args}


def _span(name: str, cat: str, tid: int, start_s: float, end_s: float, args: dict | None = None) -> dict:
    event = {"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": tid, "ts": start_s * US_PER_S,
             "dur": (end_s - start_s) * US_PER_S}
    if args:
        event["args"] = args
    return event

"""The three reports: `plan --html` (the ranked plans, why the winner wins and the others
lost, then the winner in detail), `simulate --html` (one plan in detail) and `compare --html`
(the cluster table and the days-vs-dollars front). Each is one HTML string (page.page)."""
from __future__ import annotations

from html import escape

from cost_models.units import GIB
from planner.fp8 import precision_words
from planner.report import charts
from planner.report.page import cards, legend, page, section, table
from planner.plan import degree_words
from planner.report.timeline import as_script_json, rank_summary, timeline_data
from planner.version import version


def _footer(command: str, calibration: list[str]) -> str:
    lines = [f"made by meshplan {escape(version())}" + (f": <code>{escape(command)}</code>" if command else "")]
    lines += [escape(line) for line in calibration]
    return "<br>".join(lines)


def _plan_words(plan) -> str:
    text = (degree_words(plan) + f" zero={plan.zero}, micro-batch {plan.micro_batch} x "
            f"{plan.grad_accum} accumulation, {precision_words(plan)}, {plan.schedule}")
    if plan.interleave > 1:
        text += f" x{plan.interleave}"
    if plan.sequence_parallel:
        text += ", sequence parallel"
    if plan.offload_optimizer:
        text += ", optimizer offloaded"
    return text + f", run by {plan.engine}"


def _result_cards(result) -> str:
    worst = result.worst_stage
    fit = ("fits", "fits") if result.fits else ("does not fit", "nofit")
    return cards([(f"{result.step_time_s:.3f} s", "step time", ""),
                  (f"{result.tokens_per_s:,.0f}", "tokens/s", ""),
                  (f"{100 * result.mfu:.1f}%", "MFU (model FLOPs / peak)", ""),
                  (f"{worst.peak_reserved_bytes / GIB:.1f} / {result.capacity_bytes / GIB:.1f} GiB",
                   f"peak reserved per GPU (stage {worst.stage}) / usable", ""),
                  (fit[0], "memory", fit[1])])


def phases_section(result) -> str:
    from planner.simulate import PHASE_WORDS
    total = result.step_time_s or 1.0
    rows = [[PHASE_WORDS.get(k, k), f"{v:.3f}", f"{100 * v / total:.1f}%"] for k, v in result.phases.items()]
    items = [(PHASE_WORDS.get(k, k), c) for k, c in charts.PHASE_COLORS.items()]
    body = (charts.phases_svg(result.phases, PHASE_WORDS) + legend(items)
            + '<p class="note">The slowest pipeline rank\'s step; recomputation (hatched) is part of compute.</p>'
            + table(["phase", "seconds", "share of step"], rows, left=(0,)))
    return section("Where the step's time goes", body, "phases")


def timeline_section(result) -> str:
    if result.timeline is None:
        return ""
    data = timeline_data(result)
    micro_batches = max((e[2] for e in data["events"]), default=0) + 1
    # many micro-batches: start zoomed in far enough to read their numbers (scroll sideways)
    readable = min(2 ** ((micro_batches // 16).bit_length()), 32)
    data["start_zoom"] = 1 if micro_batches <= 16 or data["binned"] else readable
    names = "".join(f'<div style="height:{_row_px(data["ranks"])}px;line-height:{_row_px(data["ranks"])}px">'
                    f"stage {r}</div>" for r in range(data["ranks"]))
    note = (f'<p class="note">{data["event_count"]:,} events: each stage\'s row is cut into time bins, '
            f"each filled by the share of it forward, backward and sends take; simulate fewer micro-batches "
            f"to see each one.</p>" if data["binned"] else "")
    colors = [("forward", "#4C72B0"), ("backward (+ recompute)", "#DD8452"), ("blocking send", "#8172B3"),
              ("exposed data-parallel communication", "#55A868"), ("optimizer step", "#CCB974"),
              ("idle (bubble)", "#E4E4E4")]
    body = (f'<div class="tl-box"><div class="controls">zoom <button class="out" title="zoom out">&minus;</button>'
            f'<input class="zoom" type="range" min="0" max="8" step="1" value="0" aria-label="zoom">'
            f'<button class="in" title="zoom in">+</button><span class="zoomv">1x</span>'
            f'<button class="fit">fit the whole step</button></div>'
            f'<div class="tl"><div class="names">{names}</div><div class="plot"></div></div>'
            f'<script type="application/json" class="tl-data">{as_script_json(data)}</script></div>'
            + legend(colors) + note
            + '<p class="note">Numbers in the bars are micro-batches; hover a bar for its times. '
              'Zoom and scroll sideways to read them at any micro-batch count.</p>'
            + _rank_table(result))
    return section("Pipeline timeline, one step", body, "timeline")


def _row_px(ranks: int) -> int:   # the script's row height (page.SCRIPT, draw)
    return max(8, 520 // ranks) if ranks > 24 else 24


def _rank_table(result) -> str:
    rows = [[r["rank"], f"{r['F']:.3f}", f"{r['B']:.3f}", f"{r['send']:.3f}", f"{r['idle_s']:.3f}",
             f"{r['dp_s']:.3f}", f"{r['optimizer_s']:.3f}"] for r in rank_summary(result)]
    return ("<details><summary>Seconds per stage (they add up to the step)</summary>"
            + table(["stage", "forward", "backward", "blocking sends", "idle", "exposed DP comm", "optimizer"], rows)
            + "</details>")


def memory_section(result, budget_bytes: float | None = None) -> str:
    items = [(label, color) for _, label, color in charts.MEMORY_PARTS]
    rows = [[s.stage, *[f"{getattr(s, k) / GIB:.2f}" for k, _, _ in charts.MEMORY_PARTS],
             f"{s.peak_allocated_bytes / GIB:.2f}", f"{s.peak_reserved_bytes / GIB:.2f}",
             f"{100 * s.peak_reserved_bytes / result.capacity_bytes:.0f}%"] for s in result.stages]
    body = (charts.memory_svg(result.stages, result.capacity_bytes, budget_bytes) + legend(items)
            + '<p class="note">At each stage\'s peak; the black tick is what PyTorch\'s caching allocator '
              'reserves. GiB = 2<sup>30</sup> bytes.</p>'
            + table(["stage", *[f"{label} GiB" for _, label, _ in charts.MEMORY_PARTS], "allocated GiB",
                     "reserved GiB", "of usable"], rows))
    return section("Memory per GPU, by pipeline stage", body, "memory")


def simulate_report(plan, result, model_name: str, cluster_name: str, calibration: str, command: str = "",
                    misfit: str | None = None) -> str:
    """`misfit`: planner.simulate.fit.advice's line, for a plan that does not fit."""
    subtitle = escape(_plan_words(plan))
    sections = [_result_cards(result), phases_section(result), timeline_section(result), memory_section(result)]
    if not result.fits:
        sections.insert(1, section("Does not fit", f'<p class="nofit">{escape(misfit or fit_advice(result))}</p>',
                                   "fit"))
    return page(f"{model_name} on {cluster_name}", subtitle, sections, _footer(command, [calibration]))


def fit_advice(result) -> str:
    worst = result.worst_stage
    over = worst.peak_reserved_bytes - result.capacity_bytes
    return (f"stage {worst.stage} needs {worst.peak_reserved_bytes / GIB:.1f} GiB, {over / GIB:.1f} GiB over the "
            f"{result.capacity_bytes / GIB:.1f} GiB usable")


def plan_report(plans, model_name: str, cluster_name: str, calibration: str, command: str = "") -> str:
    from planner.search.explain import deciding_term, rejected_families, winner_vs_runner_up
    best = plans[0]
    rows = []
    for i, p in enumerate(plans):
        r = p.result
        vs = "winner"
        if i:
            term, gap_s = deciding_term(best, p)
            vs = f"+{100 * (r.step_time_s / best.result.step_time_s - 1):.1f}%: {gap_s:.3f} s more {term}"
        rows.append([i + 1, p.dp, p.tp, p.pp, p.zero, f"{p.micro_batch} x {p.grad_accum}", _schedule(p),
                     _checkpoints(p), f"{r.step_time_s:.3f}", f"{r.tokens_per_s:,.0f}", f"{100 * r.mfu:.1f}%",
                     f"{r.worst_stage.peak_reserved_bytes / GIB:.1f}", vs])
    s = plans.stats
    ranked = (table(["#", "dp", "tp", "pp", "zero", "mb x acc", "schedule", "checkpointed", "step s", "tokens/s",
                     "MFU", "peak GiB", "against the winner"], rows, left=(6, 7, 12), best=0)
              + f'<p class="note">Memory budget {plans.budget_bytes / GIB:.1f} GiB per GPU of '
                f"{plans.capacity_bytes / GIB:.1f} GiB usable ({plans.reserve_bytes / GIB:.1f} GiB reserve). "
                f"Searched {s.candidates:,} candidates in {s.search_s:.2f} s: {s.pruned_model_states:,} pruned on "
                f"model states, {s.pruned_dominated:,} dominated, {s.pruned_bound:,} bounded out, "
                f"{s.no_partition:,} without a fitting split, {s.simulated:,} simulated.</p>")
    why = f"<p>{escape(winner_vs_runner_up(plans))}</p>"
    lost = rejected_families(plans)
    if lost:
        why += ("<p>Each other dp x tp x pp family, and why it lost:</p><ul class=\"why\">"
                + "".join(f"<li>{escape(line)}</li>" for line in lost) + "</ul>")
    subtitle = f"best of {len(plans)} plans: {escape(_plan_words(best))}"
    sections = [_result_cards(best.result), section("The best plans", ranked, "plans"),
                section("Why the winner wins, and why the others lost", why, "why"),
                phases_section(best.result), timeline_section(best.result),
                memory_section(best.result, plans.budget_bytes)]
    return page(f"{model_name} on {cluster_name}", subtitle, sections, _footer(command, [calibration]))


def _schedule(p) -> str:
    text = p.schedule + (f" x{p.interleave}" if p.interleave > 1 else "")
    return text + (" +sp" if p.sequence_parallel else "") + (" +offload" if p.offload_optimizer else "")


def _checkpoints(p) -> str:
    if not p.checkpoint:
        return "none"
    counts = {m: p.checkpoint.count(m) for m in dict.fromkeys(p.checkpoint) if m != "none"}
    return ", ".join(f"{n} {m}" for m, n in counts.items()) or "none"


def compare_report(choices, model: str, tokens: float, command: str = "") -> str:
    from planner.compare import TRANSFERRED_UNCERTAINTY as band
    rows, points = [], []
    for c in choices:
        source = "measured" if c.measured else "transferred"
        if not c.fits:
            rows.append([c.cluster, c.gpus, f'<span class="nofit">does not fit</span>: {escape(c.reason or "")}',
                         *["-"] * 7, source])
            continue
        r, cost = c.plan.result, c.run_cost
        days = f"{c.days:,.1f}" + ("" if c.measured else f" ±{100 * c.uncertainty:.0f}%")
        rows.append([c.cluster, c.gpus, escape(f"dp{c.plan.dp} tp{c.plan.tp} pp{c.plan.pp} zero{c.plan.zero}"),
                     f"{r.step_time_s:.3f}", f"{100 * r.mfu:.1f}%", days, f"{cost.gpu_hours:,.0f}",
                     f"{cost.cost_usd:,.0f}", f"{cost.energy_kwh / 1e3:,.1f}", f"{cost.co2_kg / 1e3:,.1f}",
                     source if c.measured else f'<span class="transferred">{source}</span>'])
        points.append((c.cluster, c.days, cost.cost_usd, c.measured))
    body = table(["cluster", "GPUs", "best plan", "step s", "MFU", "days", "GPU-hours", "USD", "MWh", "t CO2",
                  "calibration"], rows, left=(0, 2, 10), best=0 if choices and choices[0].fits else None, raw=(2, 10))
    notes = "".join(f"<li>{escape(line)}</li>" for line in dict.fromkeys(c.calibration for c in choices))
    body += (f'<p class="note">Transferred: the GPU was never measured; its numbers reuse another GPU\'s '
             f"fractions of peak. The one transfer that can be checked (the H100's fit on measured A100 runs) "
             f"misses by 13-24% on average, so its days and dollars carry ±{100 * band:.0f}% "
             f"(benchmarks/transfer_error.py).</p><ul class=\"why note\">{notes}</ul>")
    front = charts.front_svg(points, band)
    sections = [section("Best plan per cluster, fastest first", body, "clusters")]
    if front:
        sections.append(section("Time against cost", front + legend(
            [("measured calibration", "#4C72B0"), ("transferred calibration (box: uncertainty)", "#DD8452"),
             ("front: no other cluster is both faster and cheaper", "#55A868")]), "front"))
    fitting = [c for c in choices if c.fits]
    if fitting:
        words = _phase_words()
        rows = [(c.cluster, c.plan.result.phases) for c in fitting]
        plans = [[c.cluster, escape(_plan_words(c.plan))] for c in fitting]
        sections.append(section("Where each cluster's step goes", charts.phase_rows_svg(rows, words) + legend(
            [(words.get(k, k), col) for k, col in charts.PHASE_COLORS.items()]) + table(
            ["cluster", "best plan"], plans, left=(0, 1), raw=(1,)), "phases"))
    return page(f"{model}: {tokens / 1e9:,.4g} B tokens on {len(choices)} clusters",
                "the best plan per cluster, priced", sections, _footer(command, []))


def _phase_words() -> dict:
    from planner.simulate import PHASE_WORDS
    return PHASE_WORDS


# The phase chart of a batch report draws this many cases at most (a bar each); the table lists all.
BATCH_CHART_CASES = 40


def batch_report(rows, source: str, command: str = "") -> str:
    """`simulate --batch --html`: one row per case line - its model, cluster, plan and
    result, or the error that case got - and the phases of the first cases as bars on one
    time axis. `rows`: (line, model, cluster, plan, result, error) in file order."""
    from planner.simulate import PHASE_WORDS
    table_rows, bars = [], []
    for line, model, cluster, plan, result, error in rows:
        if error is not None:
            table_rows.append([line, "", "", error, "", "", "", "", "error"])   # table() escapes cells
            continue
        worst = result.worst_stage
        table_rows.append([line, model, cluster, _plan_words(plan),
                           f"{result.step_time_s:.3f}", f"{result.tokens_per_s:,.0f}", f"{100 * result.mfu:.1f}%",
                           f"{worst.peak_reserved_bytes / GIB:.1f} / {result.capacity_bytes / GIB:.1f}",
                           "fits" if result.fits else "does not fit"])
        if len(bars) < BATCH_CHART_CASES:
            bars.append((f"line {line}", result.phases))
    errors = sum(r[5] is not None for r in rows)
    listed = table(["line", "model", "cluster", "plan", "step s", "tokens/s", "MFU", "peak / usable GiB", "memory"],
                   table_rows, left=(1, 2, 3, 8))
    sections = [section("Every case", listed, "cases")]
    if bars:
        note = (f'<p class="note">The first {BATCH_CHART_CASES} of {len(rows) - errors} cases.</p>'
                if len(rows) - errors > BATCH_CHART_CASES else "")
        items = [(PHASE_WORDS.get(k, k), c) for k, c in charts.PHASE_COLORS.items()]
        sections.append(section("Where each step's time goes",
                                 charts.phase_rows_svg(bars, PHASE_WORDS) + legend(items) + note, "phases"))
    subtitle = f"{len(rows)} case(s) from {escape(source)}" + (f", {errors} with an error" if errors else "")
    return page(f"simulate --batch {source}", subtitle, sections, _footer(command, []))

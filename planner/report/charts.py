"""The report's pictures as inline SVG text (no script, no network): step phases, per-stage
memory against capacity, and compare's time-vs-cost front. The pipeline timeline is drawn
by the page's script from data (planner.report.timeline), so that it can zoom."""
from __future__ import annotations

import math
from html import escape

from cost_models.units import GIB

# One colour per phase / memory part, shared with the legend tables (and close to plots.py's).
PHASE_COLORS = {"compute_s": "#4C72B0", "exposed_tp_comm_s": "#8172B3", "exposed_dp_comm_s": "#55A868",
                "exposed_ep_comm_s": "#DD8452", "exposed_cp_comm_s": "#8C613C", "pipeline_bubble_s": "#BBBBBB", "optimizer_s": "#CCB974"}
MEMORY_PARTS = (("params_bytes", "parameters", "#4C72B0"), ("grads_bytes", "gradients", "#DD8452"),
                ("optimizer_bytes", "optimizer state", "#55A868"), ("activations_bytes", "activations", "#C44E52"),
                ("transient_bytes", "transient", "#8172B3"))
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{escape(label)}" {FONT}>'
            + "".join(body) + "</svg>")


def _rect(x, y, w, h, color, tip: str, extra: str = "") -> str:
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{color}" {extra}>'
            f"<title>{escape(tip)}</title></rect>")


def _text(x, y, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{escape(text)}</text>'


HATCH = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><rect width="3" height="6" fill="rgba(255,255,255,0.45)"/></pattern></defs>')


def phases_svg(phases: dict, words: dict, width: int = 900) -> str:
    """One horizontal bar, the slowest rank's step split into its phases (recomputation is
    part of compute, so it is drawn as a hatched share of the compute segment)."""
    return phase_rows_svg([("", phases)], words, width)


def phase_rows_svg(rows: list[tuple[str, dict]], words: dict, width: int = 900) -> str:
    """One bar per (label, phases), on one time axis, so that the bars compare in seconds."""
    label_w = 150.0 if any(label for label, _ in rows) else 10.0
    longest = max(sum(v for k, v in p.items() if k != "recompute_s") for _, p in rows) or 1.0
    bar_w, body = width - label_w - 70, [HATCH]
    for i, (label, phases) in enumerate(rows):
        y, x = 8 + 44 * i, label_w
        total = sum(v for k, v in phases.items() if k != "recompute_s") or 1.0
        if label:
            body.append(_text(label_w - 8, y + 21, label, "end"))
        for key, seconds in phases.items():
            if key == "recompute_s" or seconds <= 0:
                continue
            w = bar_w * seconds / longest
            tip = (f"{label + ': ' if label else ''}{words.get(key, key)}: {seconds:.3f} s "
                   f"({100 * seconds / total:.1f}%)")
            body.append(_rect(x, y, w, 32, PHASE_COLORS.get(key, "#999"), tip, 'class="phase"'))
            if key == "compute_s" and phases.get("recompute_s"):
                rw = bar_w * phases["recompute_s"] / longest
                body.append(_rect(x + w - rw, y, rw, 32, "url(#hatch)",
                                  f"recomputation (inside compute): {phases['recompute_s']:.3f} s"))
            if w > 60:
                body.append(_text(x + w / 2, y + 21, f"{100 * seconds / total:.0f}%", "middle", 'fill="white"'))
            x += w
        body.append(_text(x + 6, y + 21, f"{total:.3f} s"))
    return _svg(width, 16 + 44 * len(rows), body, "step time by phase")


def memory_svg(stages: list, capacity_bytes: float, budget_bytes: float | None = None) -> str:
    """Stacked bars per pipeline stage (GiB) with the allocator's reserved peak and the
    usable capacity (and the planner's budget, when there is one) as lines."""
    n = len(stages)
    slot = max(24.0, min(110.0, 820.0 / max(n, 1)))
    left, top, plot_h = 56.0, 16.0, 260.0
    width = left + slot * n + 200   # room for the lines' labels
    top_gib = max([capacity_bytes / GIB, *(s.peak_reserved_bytes / GIB for s in stages)]) * 1.08
    y_of = lambda gib: top + plot_h * (1 - gib / top_gib)   # noqa: E731
    body = []
    for tick in _ticks(top_gib):
        y = y_of(tick)
        body.append(f'<line x1="{left}" x2="{left + slot * n}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        body.append(_text(left - 6, y + 4, f"{tick:g}", "end"))
    for i, s in enumerate(stages):
        x, base = left + slot * i + slot * 0.15, 0.0
        for key, label, color in MEMORY_PARTS:
            gib = getattr(s, key) / GIB
            body.append(_rect(x, y_of(base + gib), slot * 0.7, plot_h * gib / top_gib, color,
                              f"stage {s.stage} {label}: {gib:.2f} GiB", 'class="mem"'))
            base += gib
        reserved = s.peak_reserved_bytes / GIB
        body.append(f'<line x1="{x - 3:.1f}" x2="{x + slot * 0.7 + 3:.1f}" y1="{y_of(reserved):.1f}" '
                    f'y2="{y_of(reserved):.1f}" stroke="black" stroke-width="2"><title>stage {s.stage} '
                    f'reserved peak: {reserved:.2f} GiB</title></line>')
        if n <= 24 or i % max(1, n // 16) == 0:
            body.append(_text(x + slot * 0.35, top + plot_h + 16, str(s.stage), "middle"))
    lines = [(capacity_bytes, "usable capacity", "#C44E52", "6 4")]
    if budget_bytes is not None:
        lines.append((budget_bytes, "planner's budget", "#DD8452", "2 3"))
    label_y = None
    for value, label, color, dash in lines:
        y = y_of(value / GIB)
        # two lines a few pixels apart: the second label goes below the first, not on top of it
        label_y = y if label_y is None or abs(y - label_y) >= 14 else label_y + 14
        body.append(f'<line x1="{left}" x2="{left + slot * n}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                    f'stroke-width="2" stroke-dasharray="{dash}"/>')
        body.append(_text(left + slot * n + 6, label_y + 4, f"{label} {value / GIB:.1f} GiB", extra=f'fill="{color}"'))
    body.append(_text(left + slot * n / 2, top + plot_h + 32, "pipeline stage", "middle"))
    body.append(_text(14, top + plot_h / 2, "GiB per GPU", "middle",
                      f'transform="rotate(-90 14 {top + plot_h / 2:.0f})"'))
    return _svg(width, top + plot_h + 40, body, "memory per GPU by pipeline stage")


def front_svg(points: list[tuple[str, float, float, bool]], band: float = 0.0, width: int = 760,
              height: int = 360) -> str:
    """Days to train (x) against dollars (y), one dot per cluster that fits; the Pareto front
    (no other cluster both faster and cheaper) joined by a line. points: (label, days, usd, measured);
    a cluster whose calibration is transferred gets a box of +-`band` on both axes."""
    if not points:
        return ""
    left, right, top, bottom = 70.0, 30.0, 16.0, 44.0
    max_days = max(p[1] for p in points) * (1.15 + band)
    max_usd = max(p[2] for p in points) * (1.15 + band)
    x_of = lambda d: left + (width - left - right) * d / max_days   # noqa: E731
    y_of = lambda u: top + (height - top - bottom) * (1 - u / max_usd)   # noqa: E731
    body = []
    for tick in _ticks(max_usd):
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{y_of(tick):.1f}" y2="{y_of(tick):.1f}" '
                    f'stroke="#eee"/>')
        body.append(_text(left - 6, y_of(tick) + 4, f"{tick:,.0f}", "end"))
    for tick in _ticks(max_days):
        body.append(_text(x_of(tick), height - bottom + 16, f"{tick:g}", "middle"))
    front = pareto_front([(d, u) for _, d, u, _ in points])
    path = " ".join(f"{'M' if i == 0 else 'L'}{x_of(points[j][1]):.1f},{y_of(points[j][2]):.1f}"
                    for i, j in enumerate(front))
    body.append(f'<path d="{path}" fill="none" stroke="#55A868" stroke-width="2" class="front"/>')
    for i, (label, days, usd, measured) in enumerate(points):
        if not measured and band > 0:   # the run's time, and so its cost, is uncertain by +-band
            x0, x1 = x_of(days * (1 - band)), x_of(days * (1 + band))
            y0, y1 = y_of(usd * (1 + band)), y_of(usd * (1 - band))
            body.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
                        f'fill="#DD8452" fill-opacity="0.18" stroke="#DD8452" stroke-dasharray="3 2" class="band">'
                        f"<title>{escape(label)}: transferred calibration, +-{100 * band:.0f}% on time and cost"
                        f"</title></rect>")
        color = "#4C72B0" if measured else "#DD8452"
        ring = "" if measured else ' stroke-dasharray="3 2"'
        kind = "measured calibration" if measured else "transferred calibration"
        body.append(f'<circle cx="{x_of(days):.1f}" cy="{y_of(usd):.1f}" r="{7 if i in front else 5}" '
                    f'fill="{color}" stroke="black"{ring} class="cluster"><title>{escape(label)}: {days:,.1f} days, '
                    f'${usd:,.0f} ({kind})</title></circle>')
        right_side = x_of(days) > width * 0.7
        body.append(_text(x_of(days) + (-9 if right_side else 9), y_of(usd) - 8, label,
                          "end" if right_side else "start"))
    body.append(_text((left + width - right) / 2, height - 8, "days to train", "middle"))
    body.append(_text(14, (top + height - bottom) / 2, "USD", "middle",
                      f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})"'))
    return _svg(width, height, body, "days to train against cost, one dot per cluster")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better),
    by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to below `top`."""
    if top <= 0:
        return [0.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), raw)
    return [i * step for i in range(int(top / step) + 1)]

"""The CLI's pictures (matplotlib, headless Agg backend).

- `timeline_png`: a Gantt chart per pipeline rank of forward / backward / bubble, plus the
  data-parallel tail and optimizer step after the last backward.
- `memory_png`: stacked bars per pipeline stage of parameters, gradients, optimizer state,
  activations and transients against the GPU's capacity.
- `plans_png`: the top plans' step time and memory side by side (`meshplan plan --plot`).
- `compare_png`: days, dollars and MWh per cluster (`meshplan compare --plot`).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cost_models.units import GIB  # noqa: E402
from planner.plan import degree_words  # noqa: E402

COLORS = {"F": "#4C72B0", "B": "#DD8452", "send": "#8172B3", "tail": "#55A868", "bubble": "#DDDDDD"}
LEGEND = {"F": "forward", "B": "backward (+ recompute)", "send": "blocking send", "tail": "dp sync + optimizer",
          "bubble": "idle"}
MEMORY_PARTS = (("params_bytes", "parameters", "#4C72B0"), ("grads_bytes", "gradients", "#DD8452"),
                ("optimizer_bytes", "optimizer", "#55A868"), ("activations_bytes", "activations", "#C44E52"),
                ("transient_bytes", "transient", "#8172B3"))


def plan_title(model: str, cluster: str, plan) -> str:
    """"gpt3-175b on a100-sxm-80gb:128x8, dp16 tp8 pp8 zero0 mb1 x96 interleaved x2": what a
    picture shows, so that two pictures side by side say which is which."""
    return f"{model} on {cluster}, {plan_label(plan)}"


def plan_label(plan) -> str:
    """Every field two plans of one search may differ in, in one short line."""
    text = f"{degree_words(plan, eq='')} zero{plan.zero} mb{plan.micro_batch} x{plan.grad_accum} {plan.schedule}"
    text += f" x{plan.interleave}" if plan.interleave > 1 else ""
    text += " +sp" if plan.sequence_parallel else ""
    text += " +offload" if plan.offload_optimizer else ""
    modes = [m for m in ("full", "selective", "attention") if m in (plan.checkpoint or [])]
    return text + (" ckpt " + "/".join(f"{plan.checkpoint.count(m)} {m}" for m in modes) if modes else "")


def timeline_png(result, path, title: str = "") -> None:
    timeline = result.timeline
    ranks = timeline.pp
    per_rank = len(timeline.events) / max(ranks, 1)
    # past ~60 actions a rank, white edges between bars turn the chart into a barcode: drop them
    # and widen the figure (the HTML report, `--html`, zooms instead)
    edge = 0.3 if per_rank <= 60 else 0.0
    fig, ax = plt.subplots(figsize=(min(12 + per_rank / 40, 24), 0.6 * ranks + 1.6))
    ax.broken_barh([(0, result.step_time_s)], (-0.4, ranks - 0.2), color=COLORS["bubble"], zorder=0)
    for event in timeline.events:
        ax.broken_barh([(event.start_s, event.end_s - event.start_s)], (event.rank - 0.4, 0.8),
                       color=COLORS[event.kind], edgecolor="white", linewidth=edge, zorder=1)
    for rank in range(ranks):
        ax.broken_barh([(timeline.finish_s[rank], result.step_time_s - timeline.finish_s[rank])],
                       (rank - 0.4, 0.8), color=COLORS["tail"], alpha=0.8, zorder=1)
    ax.set_yticks(range(ranks), [f"stage {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, result.step_time_s * 1.01)
    shown = [k for k in LEGEND if k != "send" or any(e.kind == "send" for e in timeline.events)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in shown]
    ax.legend(handles, [LEGEND[k] for k in shown], loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if ranks < 4 else -0.12), ncol=len(shown), frameon=False)
    stats = f"step {result.step_time_s:.3f} s, MFU {100 * result.mfu:.1f}%"
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_png(result, path, title: str = "") -> None:
    stages = result.stages
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(stages) + 3), 4.5))
    bottoms = [0.0] * len(stages)
    xs = range(len(stages))
    for key, label, color in MEMORY_PARTS:
        values = [getattr(s, key) / GIB for s in stages]
        ax.bar(xs, values, bottom=bottoms, color=color, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    reserved = [s.peak_reserved_bytes / GIB for s in stages]
    ax.scatter(xs, reserved, marker="_", s=400, color="black", label="reserved (allocator)", zorder=3)
    ax.axhline(result.capacity_bytes / GIB, color="red", linestyle="--", label="usable capacity")
    ax.set_xticks(list(xs), [f"stage {s.stage}" for s in stages])
    ax.set_ylabel("GiB per GPU")
    ax.legend(fontsize=8, loc="upper right")
    worst = result.worst_stage
    over = worst.peak_reserved_bytes - result.capacity_bytes
    verdict = "fits" if result.fits else (f"does not fit: stage {worst.stage} is {over / GIB:.1f} GiB over"
                                          if over > 0 else "does not fit (host memory)")
    ax.set_title(f"{title}\n{verdict}" if title else verdict, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plans_png(plans, path, title: str = "") -> None:
    """The top plans side by side: step time, and peak memory against the budget."""
    labels = [f"#{i + 1} " + plan_label(p).replace(" mb", "\nmb", 1) for i, p in enumerate(plans)]
    times = [p.result.step_time_s for p in plans]
    memory = [p.result.worst_stage.peak_reserved_bytes / GIB for p in plans]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(14, 0.7 * len(plans) + 2.5), sharey=True)
    y = range(len(plans))
    ax_time.barh(y, times, color=COLORS["F"])
    ax_time.set_xlabel("step time (s)")
    ax_time.set_yticks(list(y), labels)
    ax_time.invert_yaxis()
    ax_mem.barh(y, memory, color=COLORS["B"])
    ax_mem.axvline(plans.capacity_bytes / GIB, color="black", linestyle="--", label="capacity")
    ax_mem.axvline(plans.budget_bytes / GIB, color="red", linestyle=":", label="budget (capacity - reserve)")
    ax_mem.set_xlabel("peak reserved memory per GPU (GiB)")
    ax_mem.legend(loc="lower right")
    fig.suptitle(title or "top plans")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_png(choices: list, path: str, title: str = "") -> None:
    """Three bar charts side by side - days, dollars and MWh per cluster (non-fitting: no bar) -
    and the time-vs-$ and time-vs-CO2 planes of every option with interruptions priced (on
    demand, spot), each Pareto front joined."""
    labels = [c.cluster for c in choices]
    panels = (("days to train", lambda c: c.days), ("cost (USD)", lambda c: c.run_cost.cost_usd),
              ("energy (MWh)", lambda c: c.run_cost.energy_kwh / 1e3))
    fig, axes = plt.subplots(1, len(panels) + 2, figsize=(4.5 * (len(panels) + 2), 0.5 * len(choices) + 3.0))
    y = list(range(len(choices)))
    for ax, (label, value) in zip(axes, panels):
        ax.barh(y, [value(c) if c.fits else 0.0 for c in choices], color="#4C72B0")
        for i, c in enumerate(choices):
            if not c.fits:
                ax.text(0, i, " does not fit", va="center", color="#C44E52")
        ax.set_xlabel(label)
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(y))
        ax.invert_yaxis()
    _pareto_axes(axes[-2], choices)
    _pareto_axes(axes[-1], choices, co2=True)
    fig.suptitle(title or "training run per cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto_axes(ax, choices: list, co2: bool = False) -> None:
    """Days vs dollars (or vs tonnes of CO2) with failures and checkpoints priced; the Pareto
    front as a line."""
    def value(o):
        return o.run_cost.co2_kg / 1e3 if co2 else o.run_cost.cost_usd

    points = [(o.days, value(o), f"{c.cluster} {kind}", o.pareto_co2 if co2 else o.pareto) for c in choices if c.fits
              for kind, o in (("on-demand", c.with_failures), ("spot", c.spot)) if o is not None and o.run_cost]
    for days, usd, label, front in points:
        ax.scatter([days], [usd], color="#C44E52" if front else "#8C8C8C", zorder=3)
        ax.annotate(label, (days, usd), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((d, u) for d, u, _, on in points if on)
    if len(front) > 1:
        ax.plot(*zip(*front), color="#C44E52", zorder=2)
    ax.set_xlabel("days to train (interruptions included)")
    ax.set_ylabel("CO2 (t)" if co2 else "cost (USD)")
    ax.set_title(f"time vs {'CO2' if co2 else '$'}: Pareto front in red", fontsize=9)

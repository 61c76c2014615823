"""Why the planner chose what it chose: the deciding cost term and each rejected family."""
from __future__ import annotations

from planner.search.ranking import RankedPlans, describe_family
from planner.simulate import PHASE_WORDS

# A family's reason is its variant that got furthest: simulated and slower, then at best
# slower (its compute bound alone loses), then out of memory, then over on model states. A
# family whose ZeRO-0 variant overflows but whose ZeRO-3 variant fits and is merely slower
# lost on time, not memory.
REASON_ORDER = ("slower", "bound", "memory", "model states")


def phase_gaps(winner, other) -> dict:
    """Seconds per step `other` spends beyond `winner` in each phase (negative: saves)."""
    return {PHASE_WORDS.get(k, k): other.result.phases[k] - winner.result.phases[k] for k in winner.result.phases}


def deciding_term(winner, other) -> tuple[str, float]:
    """The phase where `other` loses most time against `winner` (name, seconds)."""
    gaps = phase_gaps(winner, other)
    name = max(gaps, key=gaps.get)
    return name, gaps[name]


def winner_vs_runner_up(plans: RankedPlans) -> str:
    if not plans:
        return ""
    best = plans[0]
    if len(plans) == 1:
        return f"{describe_family(best)} is the only plan that fits."
    second = plans[1]
    term, gap_s = deciding_term(best, second)
    gaps = phase_gaps(best, second)
    saved = min(gaps, key=gaps.get)
    lead = second.result.step_time_s / best.result.step_time_s - 1
    text = (f"{describe_family(best)} beats {describe_family(second)} by {100 * lead:.1f}% "
            f"({best.result.step_time_s:.3f} s vs {second.result.step_time_s:.3f} s per step): "
            f"the runner-up spends {gap_s:.3f} s more on {term}")
    if gaps[saved] < 0:
        text += f" and saves {-gaps[saved]:.3f} s on {saved}"
    return text + "."


def rejected_families(plans: RankedPlans, limit: int = 40) -> list[str]:
    """One line per dp x tp x pp family without a plan in the list: its best reason."""
    kept = {_degrees(describe_family(p)) for p in plans}
    by_family: dict[str, object] = {}
    for rejection in plans.rejections:
        family = _degrees(rejection.family)
        if family in kept:
            continue
        current = by_family.get(family)
        if current is None or REASON_ORDER.index(rejection.reason) < REASON_ORDER.index(current.reason):
            by_family[family] = rejection
    lines = []
    for family, rejection in sorted(by_family.items(), key=lambda kv: REASON_ORDER.index(kv[1].reason)):
        detail = rejection.detail
        if rejection.planned is not None and plans:
            term, gap_s = deciding_term(plans[0], rejection.planned)
            detail += f", {gap_s:.3g} s more {term} than the winner"
        lines.append(f"{family}: {_reason_words(rejection)} (best variant {rejection.family}: {detail})")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more families"]
    return lines


def _degrees(family: str) -> str:
    return " ".join(family.split()[:3])


def _reason_words(rejection) -> str:
    return {"slower": "slower", "memory": "out of memory", "model states": "model states overflow",
            "bound": "pruned by the step-time bound"}[rejection.reason]


def explain(plans: RankedPlans) -> list[str]:
    return [winner_vs_runner_up(plans), "rejected families:", *("  " + line for line in rejected_families(plans))]

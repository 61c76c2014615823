"""plan(): ranked plans that fit, honour pins, match simulate(), and beat a brute force."""
import itertools

import pytest

from cost_models import MeshplanError
from cost_models.cluster import parse_cluster
from planner.search.partition import StageCosts, partition
from planner.plan import CHECKPOINT_MODES, Plan
from planner.simulate.schedule import in_flight_counts
from planner.search import plan
from planner.simulate import prepare, simulate
from planner.torch_compat import traces_attention_core

MODEL, CLUSTER = "gpt3-350m", "a100-sxm-80gb:1x8"


@pytest.fixture(scope="module")
def ranked():
    return plan(MODEL, CLUSTER, global_batch=32, seq=1024, top_k=4)


def test_plans_are_ranked_fit_the_budget_and_are_what_simulate_says(ranked):
    assert 1 <= len(ranked) <= 4
    times = [p.result.step_time_s for p in ranked]
    assert times == sorted(times)
    for p in ranked:
        assert p.world_size == 8 and p.global_batch == 32 and p.seq == 1024
        assert all(s.peak_reserved_bytes <= ranked.budget_bytes for s in p.result.stages)
        assert ranked.budget_bytes == pytest.approx(ranked.capacity_bytes - ranked.reserve_bytes)
        again = simulate(Plan.from_dict(p.to_dict()), MODEL, CLUSTER)
        assert again.step_time_s == pytest.approx(p.result.step_time_s, rel=1e-12)


def test_search_statistics_account_for_every_candidate(ranked):
    s = ranked.stats
    assert s.candidates == s.pruned_model_states + s.pruned_bound + s.no_partition + s.partitioned
    assert 0 < s.simulated and s.search_s > 0 and s.families >= 4


def test_pinned_dimensions_are_kept():
    pinned = plan(MODEL, CLUSTER, 32, 1024, top_k=3, tp=2, pp=2, checkpoint="full", schedule="1f1b")
    for p in pinned:
        assert (p.tp, p.pp, p.dp, p.schedule) == (2, 2, 2, "1f1b")
        assert p.checkpoint == ["full"] * 24


def test_search_is_at_least_as_good_as_brute_force_over_uniform_plans():
    """Every dp x tp x pp x zero x micro-batch x uniform checkpoint, simulated: the planner's
    best (which also chooses stage splits and per-layer checkpointing) is no slower."""
    model, cluster, gb, seq = "gpt3-125m", "a10:1x4", 16, 1024
    best = plan(model, cluster, gb, seq, top_k=1)[0]
    budget = plan(model, cluster, gb, seq, top_k=1).budget_bytes
    fastest = float("inf")
    for tp, pp in itertools.product((1, 2, 4), (1, 2, 4)):
        if 4 % (tp * pp):
            continue
        dp = 4 // (tp * pp)
        modes = [m for m in CHECKPOINT_MODES if m != "attention" or traces_attention_core()]   # see torch_compat
        for zero, mb, mode in itertools.product((0, 1, 2, 3), (1, 2, 4), modes):
            if gb % (dp * mb) or (zero and dp == 1) or (zero == 1 and tp > 1):
                continue
            candidate = Plan(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=mb, global_batch=gb, seq=seq,
                             checkpoint=[mode] * 12)
            result = simulate(candidate, model, cluster)
            if max(s.peak_reserved_bytes for s in result.stages) <= budget:
                fastest = min(fastest, result.step_time_s)
    assert fastest < float("inf")
    assert best.result.step_time_s <= fastest * (1 + 1e-9)


def test_partition_mixes_recompute_modes_as_a_brute_force_would():
    """GPT-3-shaped blocks (unfused attention, dropout; tp 8 with sequence parallelism):
    attention-core recompute saves 5as^2b/t per block for less time per byte than op-level
    selective (torchtitan's policy, which reruns every other linear too). With the budget of
    every block under "attention" the partition takes exactly that; with a budget between the
    all-"attention" and all-"selective" needs it mixes attention with full recompute on one
    block and spares one block - the cheapest of all 4^n assignments that fit, and faster than
    every block selective (which fits too). Over a sweep of budgets it is never more than one
    block's rounding (the inner problem is solved at its LP vertices, rounded up to blocks)
    slower than the brute force."""
    cfg = {"arch": "gpt", "layers": 8, "hidden": 12288, "heads": 96, "vocab": 51200, "max_seq": 2048,
           "attention": "unfused", "dropout": 0.1}
    p = Plan(tp=8, micro_batch=1, global_batch=8, seq=2048, precision="fp16", sequence_parallel=True)
    costs = StageCosts(prepare(p, cfg, "a100-sxm-80gb:1x8"), in_flight_counts(p.schedule, p.pp, p.grad_accum, 1))
    b, n = costs.block, len(costs.blocks)

    def need_bytes(counts):
        return costs.g[0] + n * b.state_bytes + costs.k[0] * sum(c * b.act_bytes[m] for m, c in counts.items())

    def time_s(counts):
        return costs.f[0] + sum(c * b.time_s[m] for m, c in counts.items())

    def per_byte(mode):
        return (b.time_s[mode] - b.time_s["none"]) / (b.act_bytes["none"] - b.act_bytes[mode])

    def chosen_by(split):
        return {m: split.checkpoint.count(m) for m in CHECKPOINT_MODES}

    assert b.act_bytes["attention"] > b.act_bytes["selective"] and per_byte("attention") < per_byte("selective")
    every = [dict(zip(CHECKPOINT_MODES, (n - a - s - f, a, s, f)))
             for a in range(n + 1) for s in range(n + 1 - a) for f in range(n + 1 - a - s)]
    attention, selective = need_bytes({"attention": n}), need_bytes({"selective": n})
    for budget in (attention, (attention + selective) / 2):
        split = partition(costs, budget)
        chosen = chosen_by(split)
        best = min(time_s(c) for c in every if need_bytes(c) <= budget)
        assert need_bytes(chosen) <= budget and split.stage_memory_bytes[0] == pytest.approx(need_bytes(chosen))
        assert split.stage_time_s[0] == pytest.approx(time_s(chosen)) == pytest.approx(best, rel=1e-12)
        assert split.stage_time_s[0] < time_s({"selective": n})
    assert chosen == {"none": 1, "attention": n - 2, "selective": 0, "full": 1}   # the mix, at the lower budget
    assert partition(costs, attention).checkpoint == ["attention"] * n
    one_block_s = max(b.time_s[m] - b.time_s["none"] for m in CHECKPOINT_MODES)
    full, none = need_bytes({"full": n}), need_bytes({"none": n})
    for i in range(21):
        budget = full + (none - full) * i / 20
        chosen = chosen_by(partition(costs, budget))
        best = min(time_s(c) for c in every if need_bytes(c) <= budget)
        assert need_bytes(chosen) <= budget and best <= time_s(chosen) <= best + one_block_s


def test_memory_pressure_makes_the_planner_checkpoint_only_what_it_must():
    roomy = plan("gpt3-1.3b", "a100-sxm-80gb:1x8", 64, 2048, top_k=1, tp=1, pp=1, zero=3, micro_batch=8)[0]
    tight = plan("gpt3-1.3b", "a10:1x8", 64, 2048, top_k=1, tp=1, pp=1, zero=3, micro_batch=8)[0]
    assert roomy.checkpoint.count("none") == 24 or not roomy.checkpoint
    recomputed = sum(m != "none" for m in tight.checkpoint)
    assert 0 < recomputed
    budget = plan("gpt3-1.3b", "a10:1x8", 64, 2048, top_k=1, tp=1, pp=1, zero=3, micro_batch=8).budget_bytes
    assert tight.result.worst_stage.peak_reserved_bytes <= budget
    # one checkpointed block fewer would not fit: only what memory needs is recomputed
    lighter = list(tight.checkpoint)
    first = next(i for i, m in enumerate(lighter) if m != "none")
    lighter[first] = "selective" if lighter[first] == "full" else "none"
    again = simulate(Plan.from_dict({**tight.to_dict(), "checkpoint": lighter}), "gpt3-1.3b", "a10:1x8")
    assert again.worst_stage.peak_reserved_bytes > budget


def test_a_larger_reserve_is_honoured():
    reserve = 10e9
    plans = plan("gpt3-1.3b", "a10:1x8", 64, 2048, top_k=2, reserve_bytes=reserve)
    capacity = plans.capacity_bytes
    for p in plans:
        assert p.result.worst_stage.peak_reserved_bytes <= capacity - reserve


def test_nothing_fits_names_the_memory_needed_and_the_gpus_that_would_hold_it():
    with pytest.raises(MeshplanError) as err:
        plan("gpt3-6.7b", "a10:1x1", 16, 2048)
    message = str(err.value)
    assert "\n" not in message and message.startswith("nothing fits")
    assert "GiB per GPU" in message and "GPUs" in message
    gpus = int(message.split("about ")[1].split(" GPUs")[0])
    found = plan("gpt3-6.7b", f"a10:{gpus}x1", 16, 2048, top_k=1)
    assert found and found[0].world_size == gpus


@pytest.mark.parametrize("kwargs,words", [
    (dict(tp=3), "no dp x tp x pp"),
    (dict(zero=5), "zero 5"),
    (dict(checkpoint="some"), "checkpoint 'some'"),
    (dict(unknown_knob=1), "cannot pin"),
])
def test_bad_constraints_are_one_line_errors(kwargs, words):
    with pytest.raises(MeshplanError, match=words):
        plan(MODEL, CLUSTER, 32, 1024, **kwargs)


def test_nothing_fits_under_pins_names_the_overflow_and_the_pin_to_drop():
    """The leanest plan the pins allow is priced as pinned (not with full recomputation),
    and the message names where it overflows and which pin, dropped, lets a plan fit."""
    pins = dict(dp=4, micro_batch=4, checkpoint="none")
    with pytest.raises(MeshplanError) as err:
        plan("gpt3-2.7b", "a10:1x4", 16, 2048, top_k=1, **pins)
    message = str(err.value)
    assert "\n" not in message and message.startswith("nothing fits: the leanest plan with dp=4")
    need = float(message.split(" needs ")[1].split(" GiB")[0])
    budget = float(message.split(" leaves ")[1].split(" GiB")[0])
    assert need > budget and "pipeline stage 0 (activations" in message
    assert "dropping any one of these pins fits: " in message
    freed = float(message.split("--checkpoint (then ")[1].split(" GiB")[0])
    assert freed <= budget
    found = plan("gpt3-2.7b", "a10:1x4", 16, 2048, top_k=1, dp=4, micro_batch=4)
    assert found[0].result.fits


def test_free_search_is_as_fast_as_any_pinned_micro_batch():
    """Every micro-batch size dividing a rank's share is searched, not only powers of two:
    global batch 60 on 8 GPUs leaves 15 sequences per rank of a dp4 family, and a
    micro-batch of 15 (one per step) beats every power of two that divides it."""
    free = plan("gpt3-1.3b", "dgx-a100", 60, 2048, top_k=1)[0]
    for micro_batch in (1, 3, 5, 15):
        pinned = plan("gpt3-1.3b", "dgx-a100", 60, 2048, top_k=1, micro_batch=micro_batch)[0]
        assert free.result.step_time_s <= pinned.result.step_time_s * (1 + 1e-9), micro_batch
    assert free.micro_batch not in (1, 2, 4, 8)

import json

import pytest

from cost_models import MeshplanError
from planner.simulate.schedule import build_schedule, in_flight_peak, simulate_pipeline


def run(schedule, pp, m, chunks=1, f=1.0, b=2.0, p2p=0.0):
    actions = build_schedule(schedule, pp, m, chunks)
    stages = pp * chunks
    return actions, simulate_pipeline(actions, [f / chunks] * stages, [b / chunks] * stages, p2p)


@pytest.mark.parametrize("schedule,chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_every_micro_batch_runs_once_per_stage(schedule, chunks, pp, m):
    actions, _ = run(schedule, pp, m, chunks)
    for rank_actions in actions:
        assert sorted((a.kind, a.micro_batch, a.chunk) for a in rank_actions) == sorted(
            (k, mb, c) for k in "FB" for mb in range(m) for c in range(chunks))


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (8, 32)])
def test_bubble_matches_textbook_for_uniform_stages(pp, m):
    f, b = 1.0, 2.0
    for schedule in ("gpipe", "1f1b"):
        _, timeline = run(schedule, pp, m, f=f, b=b)
        assert timeline.makespan_s == pytest.approx((m + pp - 1) * (f + b))
    _, timeline = run("interleaved", pp, m, chunks=2, f=f, b=b)
    # Narayanan et al. 2021: the interleaved bubble is (p - 1)(f + b) / v.
    assert timeline.makespan_s == pytest.approx(m * (f + b) + (pp - 1) * (f + b) / 2)


def test_activation_in_flight_counts():
    assert [in_flight_peak(a) for a in build_schedule("1f1b", 4, 8)] == [4, 3, 2, 1]
    assert [in_flight_peak(a) for a in build_schedule("gpipe", 4, 8)] == [8] * 4
    # Korthikanti et al.: rank 0 of interleaved 1F1B holds p(1 + (p-1)/(p v)) stage-equivalents.
    pp, v = 4, 2
    first = in_flight_peak(build_schedule("interleaved", pp, 8, v)[0])
    assert first / v == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))


def test_transfers_sit_on_the_critical_path_at_most_twice_per_slot():
    _, no_comm = run("1f1b", 4, 8)
    _, comm = run("1f1b", 4, 8, p2p=0.1)
    assert comm.makespan_s > no_comm.makespan_s + 2 * 3 * 0.1 - 1e-9   # fill and drain hops at least
    # in steady 1F1B each (forward, backward) slot waits for at most one hop each way
    assert comm.makespan_s <= (8 + 4 - 1) * (1.0 + 2.0 + 2 * 0.1) + 1e-9
    _, single = run("1f1b", 1, 8, p2p=0.1)
    assert single.makespan_s == pytest.approx(8 * 3.0)  # one stage: nothing to send


def test_slowest_stage_dominates():
    actions = build_schedule("1f1b", 4, 16)
    fast = simulate_pipeline(actions, [1.0] * 4, [2.0] * 4)
    slow = simulate_pipeline(actions, [1.0, 1.0, 1.5, 1.0], [2.0, 2.0, 3.0, 2.0])
    assert slow.makespan_s >= 16 * 4.5
    assert slow.makespan_s > fast.makespan_s


def test_chrome_trace_is_json():
    _, timeline = run("interleaved", 2, 4, chunks=2)
    events = timeline.to_chrome_trace()
    json.dumps(events)
    assert len(events) == 2 * 2 * 4 * 2 and {e["tid"] for e in events} == {0, 1}
    assert all(e["dur"] > 0 for e in events)


def test_bad_schedules():
    with pytest.raises(MeshplanError, match="divisible by pp"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(MeshplanError, match="unknown schedule"):
        build_schedule("zigzag", 2, 2)
    with pytest.raises(MeshplanError, match="one chunk"):
        build_schedule("1f1b", 2, 2, 2)


@pytest.mark.parametrize("schedule,pp,m,chunks", [("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1), ("gpipe", 4, 6, 1),
                                                  ("gpipe", 2, 4, 2), ("interleaved", 4, 8, 2),
                                                  ("interleaved", 4, 4, 3), ("interleaved", 2, 2, 4),
                                                  ("interleaved", 8, 16, 2), ("1f1b", 4, 2, 1)])
def test_in_flight_counts_match_the_action_lists(schedule, pp, m, chunks):
    from planner.simulate.schedule import in_flight_counts
    expected = tuple(in_flight_peak(a) for a in build_schedule(schedule, pp, m, chunks))
    assert in_flight_counts(schedule, pp, m, chunks) == expected


def test_blocking_sends_hold_the_sender():
    """GPipe, 2 stages, 2 micro-batches, F 1 s, B 2 s, transfers 0.5 s, worked by hand.
    Sends beside compute: rank 1 ends its backwards at 7.5, rank 0 at 10. Blocking sends
    (Megatron waits on each p2p): rank 0's second forward starts at 1.5, rank 1's backwards
    end at 8.5 and its last send at 9, so rank 0's last backward runs 9-11."""
    actions = build_schedule("gpipe", 2, 2, 1)
    beside = simulate_pipeline(actions, [1.0, 1.0], [2.0, 2.0], 0.5)
    blocking = simulate_pipeline(actions, [1.0, 1.0], [2.0, 2.0], 0.5, blocking_p2p=True)
    assert beside.makespan_s == pytest.approx(10.0)
    assert blocking.makespan_s == pytest.approx(11.0)
    sends = [(e.rank, e.start_s, e.end_s) for e in blocking.events if e.kind == "send"]
    assert sorted(sends) == [(0, 1.0, 1.5), (0, 2.5, 3.0), (1, 6.0, 6.5), (1, 8.5, 9.0)]
    assert blocking.busy_s == beside.busy_s == [6.0, 6.0]
    assert not any(e.kind == "send" for e in beside.events)

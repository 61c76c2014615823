"""The planner's explanation names, for each losing dp x tp x pp family, the variant that got furthest."""
from planner.search.explain import rejected_families
from planner.search import RankedPlans, Rejection, SearchStats


def ranked(rejections) -> RankedPlans:
    return RankedPlans([], SearchStats(), rejections, budget_bytes=80e9, capacity_bytes=85e9, reserve_bytes=5e9)


def test_a_family_that_fits_with_zero3_lost_on_time_not_on_model_states():
    lines = rejected_families(ranked([
        Rejection("dp512 tp2 pp1 zero0 mb1 1f1b", "model states", "model states alone need 1480.7 GiB per GPU"),
        Rejection("dp512 tp2 pp1 zero3 mb1 1f1b", "bound", "even perfectly split its compute and pipeline fill take 31 s > 20 s"),
        Rejection("dp512 tp2 pp1 zero3 mb1 1f1b sp", "bound", "even perfectly split its compute and pipeline fill take 32 s > 20 s"),
        Rejection("dp256 tp4 pp1 zero0 mb1 1f1b", "model states", "model states alone need 740.4 GiB per GPU"),
        Rejection("dp256 tp4 pp1 zero3 mb1 1f1b", "memory", "needs 90.0 GiB per GPU even with every block fully "
                                                          "checkpointed"),
        Rejection("dp8 tp8 pp16 zero0 mb1 1f1b", "memory", "needs 95.0 GiB per GPU"),
        Rejection("dp8 tp8 pp16 zero2 mb2 1f1b", "slower", "estimated 25 s per step"),
    ]))
    assert lines == [
        "dp8 tp8 pp16: slower (best variant dp8 tp8 pp16 zero2 mb2 1f1b: estimated 25 s per step)",
        "dp512 tp2 pp1: pruned by the step-time bound (best variant dp512 tp2 pp1 zero3 mb1 1f1b: even perfectly "
        "split its compute and pipeline fill take 31 s > 20 s)",
        "dp256 tp4 pp1: out of memory (best variant dp256 tp4 pp1 zero3 mb1 1f1b: needs 90.0 GiB per GPU even with "
        "every block fully checkpointed)",
    ]

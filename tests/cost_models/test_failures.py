"""Failures, checkpoints and spot preemption in the run forecast (cost_models/failures.py,
`meshplan compare`)."""
import json
import math

import pytest

from cost_models.cluster import cluster_from_dict
from cost_models.errors import MeshplanError
from cost_models.failures import (GPU_FAILURE_RATE_PER_HOUR, Reliability, forecast, reliability_from_dict,
                                  young_daly_interval_s)
from helpers import assert_user_error, run_cli_in_process
from planner.compare import compare


def test_the_default_failure_rate_is_llama_3s():
    """419 interruptions in 54 days on 16,384 H100s: one every ~3.1 hours at that scale."""
    assert 1 / (GPU_FAILURE_RATE_PER_HOUR * 16384) == pytest.approx(54 * 24 / 419)


def test_a_worked_example_matches_the_closed_form():
    """1000 GPUs at 1e-5 failures per GPU-hour: M = 100 h = 360,000 s. A 1 TB checkpoint at
    1 GB/s per GPU saves in delta = 1 s, so tau = sqrt(2 x 1 x 360000) = 848.53 s. With
    R = 600 s, 100 h of work takes W = 360000 (1 + 1/848.53) / (1 - (600 + 849.53/2) / 360000)
    = 361,453.2 s: goodput 99.598 %."""
    rel = Reliability(failure_rate_per_gpu_hour=1e-5, checkpoint_write_bytes_per_s_per_gpu=1e9, restart_s=600)
    f = forecast(360000.0, 1000, 125, 1e12, rel)
    assert (f.mtbf_s, f.checkpoint_s) == (pytest.approx(360000.0), pytest.approx(1.0))
    assert f.interval_s == pytest.approx(848.528, abs=1e-3) == young_daly_interval_s(1.0, 360000.0)
    assert f.wall_s == pytest.approx(361453.2, abs=0.1)
    assert f.goodput == pytest.approx(0.995980, abs=1e-6)
    assert f.interruptions == pytest.approx(361453.2 / 360000.0, rel=1e-6)


def test_spot_adds_preemptions_and_a_job_can_lose_work_as_fast_as_it_makes_it():
    rel = Reliability(failure_rate_per_gpu_hour=1e-5, checkpoint_write_bytes_per_s_per_gpu=1e9, restart_s=600,
                      spot_price_usd_per_gpu_hour=1.0, preemption_rate_per_node_hour=0.2)
    on_demand, spot = (forecast(360000.0, 1000, 125, 1e12, rel, spot=s) for s in (False, True))
    assert spot.mtbf_s == pytest.approx(3600 / (0.01 + 125 * 0.2))
    assert spot.interval_s < on_demand.interval_s and spot.goodput < on_demand.goodput
    hopeless = Reliability(failure_rate_per_gpu_hour=1.0, restart_s=3600)   # a failure a GPU-hour, 1 h restarts
    assert forecast(1000.0, 8, 1, 1e9, hopeless).wall_s == math.inf
    assert forecast(1000.0, 8, 1, 1e9, Reliability(failure_rate_per_gpu_hour=0)).goodput == 1.0


def test_a_cluster_file_sets_reliability():
    cluster = cluster_from_dict({"gpu": "h100", "nodes": 2, "gpus_per_node": 8,
                                 "reliability": {"failure_rate_per_gpu_hour": 1e-4, "checkpoint_write_GBps_per_gpu": 2,
                                                 "restart_s": 60, "spot_price_usd_per_gpu_hour": 1.5,
                                                 "preemption_rate_per_node_hour": 0.1}})
    assert cluster.reliability == Reliability(1e-4, 2e9, 60, 1.5, 0.1)
    assert cluster_from_dict({"gpu": "h100"}).reliability == Reliability()


@pytest.mark.parametrize("data, fragment", [
    ({"failure_rate_per_gpu_hour": -1}, "failure_rate_per_gpu_hour"),
    ({"checkpoint_write_GBps_per_gpu": 0}, "checkpoint write bandwidth"),
    ({"spot_price_usd_per_gpu_hour": 1.0}, "needs a preemption rate"),
    ({"mtbf": 3}, "unknown key(s) ['mtbf']"),
])
def test_bad_reliability_is_one_line(data, fragment):
    with pytest.raises(MeshplanError) as err:
        reliability_from_dict(data, "cluster: reliability")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_compare_prices_failures_spot_and_the_front():
    clusters = ["h100-sxm-80gb:2x8", "a100-sxm-80gb:4x8"]
    choices = compare("gpt3-1.3b", clusters, 30e9, 256, 2048, spot_prices={"h100": 1.0},
                      preemption_rates={"h100": 0.1})
    by_name = {c.cluster: c for c in choices}
    h100, a100 = by_name["h100-sxm-80gb:2x8"], by_name["a100-sxm-80gb:4x8"]
    for c in (h100, a100):
        assert c.with_failures.run_cost.time_to_train_s > c.run_cost.time_to_train_s
        assert c.with_failures.run_cost.cost_usd > c.run_cost.cost_usd
    assert a100.spot is None and h100.spot.forecast.goodput < h100.with_failures.forecast.goodput
    assert h100.spot.run_cost.cost_usd < h100.with_failures.run_cost.cost_usd
    options = [o for c in choices for o in (c.with_failures, c.spot) if o]
    for o in options:   # on the front iff nothing else is at least as fast and as cheap, and better in one
        beaten = any(p is not o and p.run_cost.time_to_train_s <= o.run_cost.time_to_train_s
                     and p.run_cost.cost_usd <= o.run_cost.cost_usd for p in options)
        assert o.pareto == (not beaten)
        beaten_co2 = any(p is not o and p.run_cost.time_to_train_s <= o.run_cost.time_to_train_s
                         and p.run_cost.co2_kg <= o.run_cost.co2_kg for p in options)
        assert o.pareto_co2 == (not beaten_co2)
    assert h100.spot.pareto   # the cheapest option is always on the front
    fastest = min(options, key=lambda o: o.run_cost.time_to_train_s)
    assert fastest.pareto and fastest.pareto_co2   # and the fastest on both
    assert {o.pareto_co2 for o in options} == {True, False}   # the spot run's restarts burn energy too


@pytest.mark.cli
def test_compare_cli_spot_flags_and_json(tmp_path):
    args = ["compare", "--model", "gpt3-1.3b", "--tokens", "30e9", "--global-batch", "256",
            "--clusters", "h100-sxm-80gb:2x8"]
    proc = run_cli_in_process(*args, "--spot-price", "h100=1.0", "--preemption-rate", "h100=0.1", "--json")
    assert proc.returncode == 0, proc.stderr
    cluster = json.loads(proc.stdout)["clusters"][0]
    assert cluster["spot"]["price_usd_per_gpu_hour"] == 1.0 and cluster["with_failures"]["forecast"]["goodput"] < 1
    proc = run_cli_in_process(*args, "--spot-price", "h100=1.0")
    assert_user_error(proc, "needs a preemption rate")
    assert_user_error(run_cli_in_process(*args, "--failure-rate", "-1"), "--failure-rate")
    assert_user_error(run_cli_in_process(*args, "--preemption-rate", "h100=fast"), "write GPU=RATE_PER_NODE_HOUR")


def test_failure_rate_is_llama3s_interruptions_per_gpu_hour():
    # 419 unexpected interruptions, 54 days, 16,384 H100s (Dubey et al. 2024)
    assert GPU_FAILURE_RATE_PER_HOUR * 54 * 24 * 16384 == pytest.approx(419)
    job_mtbf_h = 1 / (GPU_FAILURE_RATE_PER_HOUR * 16384)
    assert job_mtbf_h == pytest.approx(3.09, abs=0.01)          # "one interruption every ~3 hours"


def test_young_daly_worked_example():
    # a 60 s save on a job that fails every 3 h: sqrt(2 x 60 x 10,800) = sqrt(1,296,000) = 1,138.4 s
    assert young_daly_interval_s(60.0, 3 * 3600.0) == pytest.approx(1138.42, abs=0.01)
    # 4x the save time doubles the interval; so does 4x the MTBF
    assert young_daly_interval_s(240.0, 10800.0) == pytest.approx(2 * young_daly_interval_s(60.0, 10800.0))
    assert young_daly_interval_s(60.0, 43200.0) == pytest.approx(2 * young_daly_interval_s(60.0, 10800.0))
    assert young_daly_interval_s(1.0, math.inf) == math.inf      # no failures: never worth a checkpoint


@pytest.mark.parametrize("save_s, mtbf_s, fragment", [
    (0.0, 100.0, "save time must be"), (-1.0, 100.0, "save time must be"), (math.inf, 100.0, "save time must be"),
    (1.0, 0.0, "between failures must be > 0"), (1.0, -5.0, "between failures must be > 0"),
    (float("nan"), 100.0, "needs a number"), ("60", 100.0, "needs a number"), (1.0, None, "needs a number"),
])
def test_bad_inputs_are_refused_in_one_line(save_s, mtbf_s, fragment):
    with pytest.raises(MeshplanError, match=fragment) as exc:
        young_daly_interval_s(save_s, mtbf_s)
    assert "\n" not in str(exc.value)

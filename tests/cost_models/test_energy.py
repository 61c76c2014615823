import pytest

from cost_models import MeshplanError
from cost_models.energy import gpu_power_w, run_cost


def test_first_principles():
    # 1e9 tokens at 1e5 tokens/s on 8 GPUs: 1e4 s = 2.78 h -> 22.2 GPU-hours
    r = run_cost(1e9, 1e5, 8, price_usd_per_gpu_hour=2.0, tdp_w=400, busy_fraction=1.0, pue=1.0,
                 grid_kg_per_kwh=0.5)
    assert r.time_to_train_s == pytest.approx(1e4)
    assert r.gpu_hours == pytest.approx(8 * 1e4 / 3600)
    assert r.cost_usd == pytest.approx(2.0 * r.gpu_hours)
    assert r.energy_kwh == pytest.approx(8 * 400 * 1e4 / 3.6e6)   # full TDP, no overhead
    assert r.co2_kg == pytest.approx(0.5 * r.energy_kwh)


def test_power_between_idle_and_tdp():
    assert gpu_power_w(700, 0.0) == pytest.approx(0.15 * 700)
    assert gpu_power_w(700, 1.0) == pytest.approx(700)
    assert gpu_power_w(700, 0.5) < gpu_power_w(700, 0.9)
    with pytest.raises(MeshplanError):
        gpu_power_w(700, 1.5)


def test_pue_scales_energy_not_cost():
    base = run_cost(1e9, 1e5, 8, 2.0, 400, 0.7, pue=1.0)
    cooled = run_cost(1e9, 1e5, 8, 2.0, 400, 0.7, pue=1.5)
    assert cooled.energy_kwh == pytest.approx(1.5 * base.energy_kwh)
    assert cooled.cost_usd == base.cost_usd
    with pytest.raises(MeshplanError, match="PUE"):
        run_cost(1e9, 1e5, 8, 2.0, 400, 0.7, pue=0.9)

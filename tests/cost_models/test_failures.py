import math

import pytest

from cost_models import MeshplanError
from cost_models.failures import GPU_FAILURE_RATE_PER_HOUR, young_daly_interval_s


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

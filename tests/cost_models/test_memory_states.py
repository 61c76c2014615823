import pytest

from cost_models import MeshplanError
from cost_models.memory import gathered_param_bytes, model_state_bytes


@pytest.mark.parametrize("zero,expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_model_states(zero, expected_gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, Nd = 64, mixed-precision Adam.
    states = model_state_bytes(7.5e9, "fp16", zero, 64, accounting="deepspeed")
    assert states.total_bytes / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_pytorch_accounting_follows_the_runtime():
    p, dp = 1e9, 8
    z0 = model_state_bytes(p, "bf16", 0, dp)
    assert (z0.params_bytes, z0.grads_bytes, z0.optimizer_bytes) == (4e9, 4e9, 8e9)
    # ZeRO 1 is FSDP2 too: fp32 shards of parameters and gradients (the unsharded copies it
    # keeps across micro-batches are planner.simulate's, checked by tests/parity/test_state_bytes.py)
    z1 = model_state_bytes(p, "bf16", 1, dp)
    assert (z1.params_bytes, z1.grads_bytes, z1.optimizer_bytes) == (0.5e9, 0.5e9, 1e9)
    z3 = model_state_bytes(p, "bf16", 3, dp)
    assert z3.total_bytes == pytest.approx(16e9 / dp)
    off = model_state_bytes(p, "bf16", 3, dp, offload_optimizer=True)
    assert off.total_bytes == 0 and off.host_bytes == pytest.approx(16e9 / dp)
    with pytest.raises(MeshplanError, match="zero 2 or 3"):
        model_state_bytes(p, "bf16", 1, dp, offload_optimizer=True)


def test_gathered_parameters():
    layers = [100, 100, 100, 100]
    assert gathered_param_bytes(1, "bf16", layers) == 0
    assert gathered_param_bytes(3, "bf16", layers) == 2 * 200      # current + one prefetched layer
    assert gathered_param_bytes(2, "bf16", layers) == 2 * 400      # all layers between fwd and bwd
    assert gathered_param_bytes(3, "fp32", [10, 300, 20]) == 4 * 320

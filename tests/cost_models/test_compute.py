"""Compute cost model: roofline bounds, monotonicity, and the H100 fit against real measurements."""

import pytest

from cost_models import MeshplanError, get_gpu
from cost_models.calibration import shipped_calibration
from cost_models.fitting import build_calibration, measurements_from_reference
from cost_models.compute import (ComputeModel, OP_KINDS, adamw_bytes_per_param, attention_flops,
                                 causal_fraction, gemm_bytes, gemm_flops)
from cost_models.units import GIB

H100 = get_gpu("h100-sxm-80gb")
# The held-out split: fit on the other 6 GEMM shapes of each precision, score these 3
# (a square mid-size, a tall-skinny, the GPT-2 LM head). Same split as
# benchmarks/fit_h100_compute.py.
HELD_OUT_SHAPES = {(4096, 4096, 4096), (16384, 4096, 1024), (4096, 768, 50304)}
SHAPES = [(64, 64, 64), (512, 768, 3072), (4096, 4096, 4096), (8192, 1024, 50304), (1, 8192, 8192)]


def reference_rows(reference):
    """measured.jsonl in the calibration's measurement format (as the fit script reads it)."""
    return measurements_from_reference(reference / "h100" / "measured.jsonl")[0]


def errors(model, rows):
    return [model.matmul_time_s(r["m"], r["k"], r["n"], r["precision"]) / r["seconds"] - 1 for r in rows]


# --------------------------------------------------------------------------- first principles

def test_flop_and_byte_counts():
    assert gemm_flops(2, 3, 4, batch=5) == 2 * 2 * 3 * 4 * 5
    assert gemm_bytes(2, 3, 4, "bf16") == 2 * (6 + 12 + 8)
    assert causal_fraction(1024, 1024) == pytest.approx(1025 / 2048)
    assert causal_fraction(1, 100) == pytest.approx(1 / 100)           # a decode step sees key 0 only
    assert causal_fraction(100, 10) == pytest.approx((55 + 90 * 10) / 1000)
    fwd = attention_flops(2, 3, 128, 128, 64, causal=False)
    assert fwd == 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 128, 64, causal=False, backward=True) == 2.5 * fwd
    assert adamw_bytes_per_param() == 28                                # fp32 p/g, 2 fp32 moments
    assert adamw_bytes_per_param("bf16", "bf16", master_weights=True) == 2 + 16 + 8 + 2


# --------------------------------------------------------------------------- bounds and shape

@pytest.mark.parametrize("gpu_name", ["h100-sxm-80gb", "a100-sxm-80gb", "v100-32gb", "mi300x", "cpu"])
def test_never_faster_than_the_roofline(gpu_name):
    gpu = get_gpu(gpu_name)
    model = ComputeModel(gpu)
    for precision, peak in gpu.peak_flops.items():
        for m, k, n in SHAPES:
            t = model.matmul_time_s(m, k, n, precision)
            assert t >= gemm_flops(m, k, n) / peak
            assert t >= gemm_bytes(m, k, n, precision) / gpu.memory_bw_bytes_per_s
        for backward in (False, True):
            t = model.attention_time_s(4, 16, 2048, 2048, 128, precision, backward=backward)
            assert t >= attention_flops(4, 16, 2048, 2048, 128, True, backward) / peak
    assert model.memory_bound_time_s(GIB) >= GIB / gpu.memory_bw_bytes_per_s
    for kind in OP_KINDS[3:]:
        assert model.op_time_s(kind, 1e9, 1e8, "fp32") >= 1e8 / gpu.memory_bw_bytes_per_s or kind == "view"


def test_times_grow_with_every_size():
    model = ComputeModel(H100)
    for precision in ("bf16", "fp32", "tf32", "fp8"):
        base = model.matmul_time_s(1024, 1024, 1024, precision)
        for bigger in ((2048, 1024, 1024), (1024, 2048, 1024), (1024, 1024, 2048)):
            assert model.matmul_time_s(*bigger, precision) > base
        assert model.matmul_time_s(1024, 1024, 1024, precision, batch=2) > base
    sizes = [model.memory_bound_time_s(b) for b in (1e3, 1e6, 1e9)]
    assert sizes == sorted(sizes) and sizes[0] > 0
    attention = [model.attention_time_s(b, 16, s, s, 128, "bf16") for b, s in ((1, 512), (1, 1024), (2, 1024), (2, 4096))]
    assert attention == sorted(attention)
    steps = [model.optimizer_step_time_s(p, 100) for p in (1e6, 1e8, 1e10)]
    assert steps == sorted(steps)


def test_small_ops_pay_the_kernel_overhead_and_empty_ones_nothing():
    model = ComputeModel(H100)
    assert 1e-6 < model.kernel_overhead_s < 2e-5       # an H100 launch: a few microseconds
    assert model.matmul_time_s(1, 1, 1, "bf16") == pytest.approx(model.kernel_overhead_s, rel=0.01)
    assert model.matmul_time_s(0, 1024, 1024, "bf16") == 0.0
    assert model.memory_bound_time_s(0) == 0.0
    assert model.op_time_s("view", 0, 1e9, "bf16") == 0.0


def test_sizes_may_be_numpy_integers():
    import numpy as np
    model = ComputeModel(H100)
    assert model.matmul_time_s(np.int64(512), 512, 512.0, "bf16") == model.matmul_time_s(512, 512, 512, "bf16")


def test_higher_precision_is_slower_on_tensor_cores():
    model = ComputeModel(H100)
    times = [model.matmul_time_s(8192, 8192, 8192, p) for p in ("fp8", "bf16", "tf32", "fp32")]
    assert times == sorted(times)


# --------------------------------------------------------------------------- the H100 fit

def test_shipped_h100_calibration_is_the_fit_of_the_reference(reference):
    """The kernel fit of the microbenchmarks, with the single-shot attention cases' host
    dispatch taken out (fixed time = the flash kernels' launches) and the constants that
    only whole training steps show (benchmarks/fit_h100_compute.py stage 2)."""
    fresh = build_calibration(H100, reference_rows(reference), "test")
    shipped = shipped_calibration("h100-sxm-80gb")
    assert shipped.kernel_overhead_s == pytest.approx(fresh.kernel_overhead_s)
    for precision, fit in fresh.gemm.items():
        assert vars(shipped.at_burst().gemm[precision]) == pytest.approx(vars(fit))
    for shipped_fit, fresh_fit, kernels in ((shipped.attention_fwd, fresh.attention_fwd, 1),
                                            (shipped.attention_bwd, fresh.attention_bwd, 3)):
        assert shipped_fit.peak_fraction == pytest.approx(fresh_fit.peak_fraction)
        assert shipped_fit.fixed_s == pytest.approx(kernels * fresh.kernel_overhead_s)
        assert fresh_fit.fixed_s > 10 * shipped_fit.fixed_s   # what the host added to one call
    # GEMMs under sustained load and the host's time per op come from the training steps
    assert 0.6 < shipped.gemm["bf16"].sustained < 0.9 and shipped.gemm["fp32"].sustained == 1.0
    assert shipped.host_s_per_op > 0


def test_h100_reproduces_its_measured_matmuls(reference):
    rows = reference_rows(reference)["matmul"]
    errs = errors(ComputeModel(H100, shipped_calibration("h100-sxm-80gb").at_burst()), rows)
    assert len(rows) == 36
    assert sum(map(abs, errs)) / len(errs) < 0.05          # in-sample MAPE 3.7%
    assert max(map(abs, errs)) < 0.20                      # worst: tf32 8192x2048x8192, -15%


def test_h100_fit_predicts_held_out_shapes(reference):
    measurements = reference_rows(reference)
    train = [r for r in measurements["matmul"] if (r["m"], r["k"], r["n"]) not in HELD_OUT_SHAPES]
    test = [r for r in measurements["matmul"] if (r["m"], r["k"], r["n"]) in HELD_OUT_SHAPES]
    model = ComputeModel(H100, build_calibration(H100, dict(measurements, matmul=train), "split"))
    errs = errors(model, test)
    assert len(test) == 12 and len(train) == 24
    assert sum(map(abs, errs)) / len(errs) < 0.07          # held-out MAPE 4.4%
    assert max(map(abs, errs)) < 0.15                      # worst: fp16 16384x4096x1024, +10%


def test_h100_attention_and_copy_match_measurements(reference):
    """The kernel fit reproduces the single-shot attention calls it was fitted on."""
    model = ComputeModel(H100, build_calibration(H100, reference_rows(reference), "test"))
    for r in reference_rows(reference)["attention"]:
        fwd = model.attention_time_s(r["batch"], r["heads"], r["seq_q"], r["seq_kv"], r["head_dim"], "bf16")
        bwd = model.attention_time_s(r["batch"], r["heads"], r["seq_q"], r["seq_kv"], r["head_dim"], "bf16",
                                     backward=True)
        assert fwd == pytest.approx(r["fwd_s"], rel=0.05)
        assert bwd == pytest.approx(r["bwd_s"], rel=0.15)
    copy = reference_rows(reference)["copy"][0]
    assert model.memory_bound_time_s(2 * copy["bytes"]) == pytest.approx(copy["seconds"], rel=0.02)


def test_large_bf16_gemm_reaches_a_realistic_fraction_of_peak():
    """~80 % of peak in a burst (the reference's 790 TFLOP/s), less in a training step."""
    shipped = shipped_calibration("h100-sxm-80gb")
    burst = ComputeModel(H100, shipped.at_burst()).matmul_time_s(8192, 8192, 8192, "bf16")
    sustained = ComputeModel(H100).matmul_time_s(8192, 8192, 8192, "bf16")
    assert 0.7 < gemm_flops(8192, 8192, 8192) / burst / H100.peak_flops["bf16"] < 0.9
    assert 0.5 < gemm_flops(8192, 8192, 8192) / sustained / H100.peak_flops["bf16"] < 0.7


# --------------------------------------------------------------------------- default curve

def test_uncalibrated_gpu_uses_the_h100_curve_as_fractions_of_peak():
    l40s = get_gpu("l40s")   # no calibration of its own is shipped
    model = ComputeModel(l40s)
    assert "transferred from the h100-sxm-80gb" in model.calibration.source
    h100 = ComputeModel(H100)
    big = (16384, 16384, 16384)      # math-bound: time ratio = peak ratio
    ratio = model.matmul_time_s(*big, "bf16") / h100.matmul_time_s(*big, "bf16")
    assert ratio == pytest.approx(H100.peak_flops["bf16"] / l40s.peak_flops["bf16"], rel=0.02)
    assert model.memory_bw_bytes_per_s == pytest.approx(
        h100.memory_bw_bytes_per_s * l40s.memory_bw_bytes_per_s / H100.memory_bw_bytes_per_s)


def test_a_custom_gpu_reusing_a_catalogue_name_gets_a_transferred_curve():
    from cost_models.hardware import custom_gpu
    slow = custom_gpu({"base": "h100", "name": "h100-sxm-80gb", "bf16_tflops": 500})
    model = ComputeModel(slow)
    assert model.peak_flops("bf16") == 500e12
    assert model.matmul_time_s(8192, 8192, 8192, "bf16") > 1.9 * ComputeModel(H100).matmul_time_s(8192, 8192, 8192, "bf16")


def test_calibration_must_belong_to_the_gpu():
    with pytest.raises(MeshplanError, match="profile this GPU"):
        ComputeModel(get_gpu("a100"), shipped_calibration("h100-sxm-80gb"))


def test_unsupported_precision_is_a_user_error():
    with pytest.raises(MeshplanError, match="no bf16 support"):
        ComputeModel(get_gpu("v100")).matmul_time_s(64, 64, 64, "bf16")


# --------------------------------------------------------------------------- optimizer, dispatcher

def test_fused_adamw_is_bandwidth_bound():
    model = ComputeModel(H100)
    params = 1.5e9
    t = model.optimizer_step_time_s(params, num_tensors=400)
    streaming_s = 28 * params / model.memory_bw_bytes_per_s
    launches = 72                  # 1.5e9 / (320 blocks x 65536 elements) per multi-tensor launch
    assert t == pytest.approx(streaming_s + launches * model.kernel_overhead_s)
    # bf16 weights with fp32 masters and fp32 gradients: 4 + 16 + 8 + 2 = 30 bytes per parameter
    assert model.optimizer_step_time_s(params, 400, "bf16", "fp32", master_weights=True) > t


def test_op_time_dispatches_by_kind():
    model = ComputeModel(H100)
    assert model.op_time_s("linear", 0, 0, "bf16", gemm=(4096, 768, 3072)) == \
        model.matmul_time_s(4096, 768, 3072, "bf16")
    assert model.op_time_s("matmul", 0, 0, "bf16", gemm=(8, 128, 64, 128)) == \
        model.matmul_time_s(128, 64, 128, "bf16", batch=8)
    args = (8, 16, 1024, 1024, 64, True)
    assert model.op_time_s("attention", 0, 0, "bf16", attention=args, backward=True) == \
        model.attention_time_s(*args[:5], "bf16", causal=True, backward=True)
    assert model.op_time_s("elementwise", 1e6, 4e8, "bf16") == model.memory_bound_time_s(4e8)
    # without a shape, a GEMM uses its fitted efficiency on the given counts
    flops, moved = gemm_flops(4096, 4096, 4096), gemm_bytes(4096, 4096, 4096, "bf16")
    assert model.op_time_s("linear", flops, moved, "bf16") == pytest.approx(model.matmul_time_s(4096, 4096, 4096, "bf16"))
    # flop-heavy vector ops are bound by the fp32 vector units
    assert model.op_time_s("loss", 1e12, 1e3, "bf16") == pytest.approx(1e12 / H100.peak_flops["fp32"], rel=0.01)


@pytest.mark.parametrize("call", [
    lambda m: m.op_time_s("conv", 1, 1, "bf16"),
    lambda m: m.op_time_s("linear", 1, 1, "bf16", gemm=(1, 2)),
    lambda m: m.op_time_s("attention", 1, 1, "bf16", attention=(1, 2, 3)),
    lambda m: m.op_time_s("elementwise", -1, 1, "bf16"),
    lambda m: m.matmul_time_s(1.5, 2, 2, "bf16"),
    lambda m: m.matmul_time_s(2, 2, 2, "int4"),
])
def test_bad_arguments_are_user_errors(call):
    with pytest.raises(MeshplanError):
        call(ComputeModel(H100))

import json

import pytest

from cost_models import GPUS, MeshplanError, get_gpu
from cost_models.hardware import custom_gpu
from cost_models.units import GB, TERA

REQUIRED = ["v100-32gb", "a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm-80gb", "h200-141gb",
            "b200", "l40s", "a10", "mi300x", "cpu"]

# catalogue name -> row name in shared/reference/gpu_specs.json
DATASHEET_ROWS = {"v100-32gb": "V100 SXM2 (16/32 GB)", "a100-sxm-40gb": "A100 SXM4 40GB",
                  "a100-sxm-80gb": "A100 SXM4 80GB", "a100-pcie-80gb": "A100 PCIe 80GB",
                  "h100-sxm-80gb": "H100 SXM5 80GB", "h200-141gb": "H200 SXM 141GB",
                  "b200": "B200 (HGX B200, 1000 W)", "l40s": "L40S", "a10": "A10", "mi300x": "MI300X"}


def test_required_gpus_have_every_figure():
    for name in REQUIRED:
        gpu = get_gpu(name)
        assert gpu.memory_bytes > 0 and gpu.memory_bw_bytes_per_s > 0 and gpu.tdp_w > 0
        assert gpu.price_usd_per_hour > 0
        assert gpu.peak_flops["fp32"] > 0
        assert (gpu.peak_flops.get("bf16") or gpu.peak_flops["fp16"]) > gpu.peak_flops["fp32"] or name == "cpu"


def test_catalogue_matches_datasheets(reference):
    rows = {r["gpu"]: r for r in json.loads((reference / "gpu_specs.json").read_text())["rows"]}
    for name, row_name in DATASHEET_ROWS.items():
        gpu, row = GPUS[name], rows[row_name]
        for precision, key in (("bf16", "bf16_tensor_dense_tflops"), ("fp16", "fp16_tensor_dense_tflops"),
                               ("tf32", "tf32_tensor_dense_tflops"), ("fp32", "fp32_tflops"),
                               ("fp8", "fp8_dense_tflops")):
            if row.get(key) is None:
                assert precision not in gpu.peak_flops, (name, precision)
            else:
                assert gpu.peak_flops[precision] == pytest.approx(row[key] * TERA), (name, precision)
        assert gpu.memory_bw_bytes_per_s == pytest.approx(row["memory_bw_GBps"] * GB)
        assert gpu.tdp_w == row["tdp_w"]
        nvlink = row.get("nvlink_total_bidirectional_GBps")
        if nvlink and "bridge" not in row.get("nvlink_note", "").lower():
            assert gpu.nvlink_bw_bytes_per_s == pytest.approx(nvlink * GB / 2), name


def test_h100_capacity_is_the_measured_usable_memory(reference):
    env = json.loads((reference / "h100" / "measured.jsonl").read_text().splitlines()[0])
    assert env["kind"] == "env"
    assert get_gpu("h100").memory_bytes == env["total_mem"]


def test_aliases_and_case():
    assert get_gpu("H100") is get_gpu("h100-sxm-80gb")
    assert get_gpu("A100_80GB") is get_gpu("a100-sxm-80gb")


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(MeshplanError) as err:
        get_gpu("z100")
    assert "z100" in str(err.value) and "h100-sxm-80gb" in str(err.value)


def test_precision_support_is_checked():
    assert get_gpu("h100").peak_flops_for("bf16") == pytest.approx(989.5e12)
    with pytest.raises(MeshplanError, match="no bf16 support"):
        get_gpu("v100").peak_flops_for("bf16")


def test_custom_gpu_from_base_and_from_scratch():
    bigger = custom_gpu({"base": "h100", "memory_GB": 96, "name": "h100-96"})
    assert bigger.memory_bytes == 96 * GB
    assert bigger.peak_flops == get_gpu("h100").peak_flops
    scratch = custom_gpu({"name": "x1", "memory_GB": 64, "memory_bw_GBps": 2000, "bf16_tflops": 500})
    assert scratch.peak_flops_for("bf16") == 500 * TERA
    with pytest.raises(MeshplanError, match="unknown key"):
        custom_gpu({"base": "h100", "memmory_GB": 1})
    with pytest.raises(MeshplanError, match="positive and finite"):
        custom_gpu({"base": "h100", "memory_GB": -1})


def test_custom_gpu_memory_in_gib_or_gb():
    """GiB is meshplan's memory unit; a datasheet's decimal GB is taken when spelled memory_GB."""
    assert custom_gpu({"base": "h100", "memory_GiB": 96}).memory_bytes == 96 * 2 ** 30
    assert custom_gpu({"name": "x1", "memory_GiB": 64, "memory_bw_GBps": 2000, "bf16_tflops": 500}).memory_bytes \
        == 64 * 2 ** 30
    with pytest.raises(MeshplanError, match="not both"):
        custom_gpu({"base": "h100", "memory_GiB": 96, "memory_GB": 96})

"""GPU catalogue: datasheet peaks, memory, links, power and a default price per GPU.

Every figure is a first-principles datasheet value copied from
`shared/reference/gpu_specs.json` (the vendor datasheet named in each row's
`source`), except where a comment says it was measured. Prices are defaults
(representative public-cloud on-demand list prices per GPU-hour in 2025) that a
user overrides with `--price GPU=USD` or a cluster file; they are not facts of the
hardware.

Conventions: FLOP/s are dense (no 2:4 sparsity), link bandwidths are
*unidirectional per GPU* in bytes/s (datasheets print NVLink as bidirectional
totals, so we halve them), memory capacities are bytes usable by the framework.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cost_models.errors import MeshplanError
from cost_models.inputs import finite_number, shown
from cost_models.units import GB, GIB, TERA

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")
# the torch dtype each precision's tensors are held in, by name (`getattr(torch, name)`; no
# torch import here); fp8 is absent: it is not measured or trained, only a catalogue peak
TORCH_DTYPE_NAMES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# the tensor-core half precisions (equal peaks on NVIDIA GPUs; one GEMM fit serves both)
SIXTEEN_BIT = ("bf16", "fp16")

# torch.cuda.get_device_properties(0).total_memory on the reference H100 80GB HBM3
# (shared/reference/h100/measured.jsonl, "kind": "env").
H100_USABLE_MEMORY_BYTES = 85017493504


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator model. Units are in the field names."""

    name: str
    display_name: str
    vendor: str
    peak_flops: dict            # precision -> dense FLOP/s; a precision absent = unsupported
    memory_bytes: int
    memory_bw_bytes_per_s: float
    nvlink_bw_bytes_per_s: float  # unidirectional per GPU; 0.0 for PCIe-only cards
    host_link_bw_bytes_per_s: float  # PCIe to the host, unidirectional
    tdp_w: float
    price_usd_per_hour: float
    scaleout_bw_bytes_per_s: float  # typical NIC bandwidth per GPU in reference nodes
    aliases: tuple = field(default=())
    source: str = ""

    def __post_init__(self):
        if self.memory_bytes <= 0 or self.memory_bw_bytes_per_s <= 0:
            raise MeshplanError(f"GPU {self.name!r}: memory capacity and bandwidth must be positive")
        bad = sorted(set(self.peak_flops) - set(PRECISIONS))
        if bad:
            raise MeshplanError(f"GPU {self.name!r}: unknown precision(s) {bad}; use {list(PRECISIONS)}")
        if not self.peak_flops:
            raise MeshplanError(f"GPU {self.name!r}: give at least one peak FLOP/s figure")

    def peak_flops_for(self, precision: str) -> float:
        """Dense peak FLOP/s for a training precision.

        fp32 training on tensor-core GPUs runs without TF32 by default in PyTorch
        (torch.backends.cuda.matmul.allow_tf32 is False), so fp32 means the
        non-tensor fp32 peak. bf16 falls back to fp16 on GPUs without bf16 (V100
        has none: there bf16 is emulated and slow, so we refuse it instead).
        """
        if precision not in self.peak_flops:
            have = ", ".join(p for p in PRECISIONS if p in self.peak_flops)
            raise MeshplanError(
                f"{self.display_name} has no {precision} support; choose one of: {have}")
        return self.peak_flops[precision]

    def summary(self) -> str:
        bf16 = self.peak_flops.get("bf16") or self.peak_flops.get("fp16") or self.peak_flops["fp32"]
        return (f"{self.display_name}: {self.memory_bytes / GIB:.0f} GiB, "
                f"{bf16 / TERA:.0f} TFLOP/s (16-bit dense), "
                f"{self.memory_bw_bytes_per_s / GB:.0f} GB/s HBM, {self.tdp_w:.0f} W")


def _tf(**tflops) -> dict:
    """Datasheet TFLOP/s -> FLOP/s, dropping unsupported (None) precisions."""
    return {k: v * TERA for k, v in tflops.items() if v is not None}


def _gpu(name, display, vendor, tflops, mem_bytes, hbm_GBps, nvlink_bidir_GBps, pcie_GBps,
         tdp_w, price, scaleout_Gbps, aliases=(), source="") -> GPUSpec:
    return GPUSpec(
        name=name, display_name=display, vendor=vendor, peak_flops=_tf(**tflops),
        memory_bytes=int(mem_bytes), memory_bw_bytes_per_s=hbm_GBps * GB,
        nvlink_bw_bytes_per_s=(nvlink_bidir_GBps or 0) * GB / 2,
        host_link_bw_bytes_per_s=pcie_GBps * GB, tdp_w=tdp_w, price_usd_per_hour=price,
        scaleout_bw_bytes_per_s=scaleout_Gbps * GB / 8, aliases=tuple(aliases), source=source)


_SPECS = "shared/reference/gpu_specs.json"
# Marketed "80GB"-class HBM capacities are binary gigabytes (80 GiB of DRAM); where we
# have a measured usable figure (H100) we use it instead.
_CATALOGUE = [
    _gpu("v100-32gb", "NVIDIA V100 SXM2 32GB", "NVIDIA",
         dict(fp32=15.7, fp16=125), 32 * GIB, 900, 300, 16, 300, 3.06, 50,
         aliases=("v100", "v100-sxm2-32gb"), source=_SPECS + " (V100 SXM2)"),
    _gpu("v100-16gb", "NVIDIA V100 SXM2 16GB", "NVIDIA",
         dict(fp32=15.7, fp16=125), 16 * GIB, 900, 300, 16, 300, 2.48, 50,
         aliases=("v100-sxm2-16gb",), source=_SPECS + " (V100 SXM2)"),
    _gpu("a100-sxm-40gb", "NVIDIA A100 SXM4 40GB", "NVIDIA",
         dict(fp32=19.5, tf32=156, bf16=312, fp16=312), 40 * GIB, 1555, 600, 32, 400, 4.10, 200,
         aliases=("a100-40gb",), source=_SPECS + " (A100 SXM4 40GB)"),
    _gpu("a100-sxm-80gb", "NVIDIA A100 SXM4 80GB", "NVIDIA",
         dict(fp32=19.5, tf32=156, bf16=312, fp16=312), 80 * GIB, 2039, 600, 32, 400, 5.12, 200,
         aliases=("a100", "a100-80gb"), source=_SPECS + " (A100 SXM4 80GB)"),
    _gpu("a100-pcie-80gb", "NVIDIA A100 PCIe 80GB", "NVIDIA",
         dict(fp32=19.5, tf32=156, bf16=312, fp16=312), 80 * GIB, 1935, 0, 32, 300, 3.67, 100,
         source=_SPECS + " (A100 PCIe 80GB; its NVLink bridge pairs only 2 GPUs, so not modelled)"),
    _gpu("h100-sxm-80gb", "NVIDIA H100 SXM5 80GB", "NVIDIA",
         dict(fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979), H100_USABLE_MEMORY_BYTES,
         3350, 900, 64, 700, 6.88, 400,
         aliases=("h100", "h100-80gb", "h100-sxm"), source=_SPECS + " (H100 SXM5 80GB)"),
    _gpu("h200-141gb", "NVIDIA H200 SXM 141GB", "NVIDIA",
         dict(fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979), 141 * GB, 4800, 900, 64,
         700, 7.91, 400, aliases=("h200", "h200-sxm-141gb"), source=_SPECS + " (H200 SXM 141GB)"),
    _gpu("b200", "NVIDIA B200 (HGX, 1000 W)", "NVIDIA",
         dict(fp32=80, tf32=1100, bf16=2250, fp16=2250, fp8=4500), 180 * GB, 8000, 1800, 64,
         1000, 14.24, 400, aliases=("b200-180gb",), source=_SPECS + " (B200, HGX 1000 W)"),
    _gpu("l40s", "NVIDIA L40S 48GB", "NVIDIA",
         dict(fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733), 48 * GB, 864, 0, 32,
         350, 1.86, 50, aliases=("l40s-48gb",), source=_SPECS + " (L40S)"),
    _gpu("a10", "NVIDIA A10 24GB", "NVIDIA",
         dict(fp32=31.2, tf32=62.5, bf16=125, fp16=125), 24 * GB, 600, 0, 32, 150, 1.01, 25,
         aliases=("a10-24gb",), source=_SPECS + " (A10)"),
    _gpu("mi300x", "AMD Instinct MI300X 192GB", "AMD",
         dict(fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9), 192 * GB, 5300,
         # Infinity Fabric: 7 links x 128 GB/s = 896 GB/s aggregate (gpu_specs.json scaleup_note)
         896, 64, 750, 6.00, 400, aliases=("mi300x-192gb",), source=_SPECS + " (MI300X)"),
    # A CPU "device" so plans run on gloo ranks in tests and demos. Rough figures for a
    # small cloud VM (2 cores with AVX2, 4 GiB per rank); calibrate with `meshplan profile` before trusting them.
    # bf16 and fp16 run (emulated, slower than fp32) under CPU autocast.
    _gpu("cpu", "CPU (gloo ranks)", "generic",
         dict(fp32=0.1, bf16=0.05, fp16=0.05), 4 * GIB, 20, 0, 10, 65, 0.05, 10,
         source="assumed small-VM figures, not a datasheet"),
]

GPUS: dict[str, GPUSpec] = {g.name: g for g in _CATALOGUE}
_BY_ALIAS = {alias: g for g in _CATALOGUE for alias in (g.name, *g.aliases)}


def get_gpu(name: str) -> GPUSpec:
    """Look a GPU up by catalogue name or alias (case-insensitive)."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    if key not in _BY_ALIAS:
        raise MeshplanError(f"unknown GPU {shown(name)}; known GPUs: {', '.join(GPUS)}")
    return _BY_ALIAS[key]


def custom_gpu(fields: dict) -> GPUSpec:
    """A hypothetical GPU from a cluster file: either all fields, or `base` plus overrides.

    Keys use human units: `memory_GiB` (meshplan's memory unit) or `memory_GB` (decimal, as
    datasheets print), `memory_bw_GBps`, `nvlink_bidir_GBps`, `bf16_tflops` (and
    fp32/tf32/fp16/fp8), `tdp_w`, `price_usd_per_hour`.
    """
    known = {"name", "base", "memory_GB", "memory_GiB", "memory_bw_GBps", "nvlink_bidir_GBps", "tdp_w",
             "price_usd_per_hour", "host_link_GBps", "scaleout_Gbps",
             *(f"{p}_tflops" for p in PRECISIONS)}
    unknown = sorted(map(str, set(fields) - known))
    if unknown:
        raise MeshplanError(f"custom GPU: unknown key(s) {unknown}; allowed: {sorted(known)}")
    base = get_gpu(fields["base"]) if "base" in fields else None
    if "memory_GB" in fields and "memory_GiB" in fields:
        raise MeshplanError("custom GPU: give memory_GiB or memory_GB, not both")
    memory_key = "memory_GiB" if "memory_GiB" in fields else "memory_GB"
    if base is None and not {"name", memory_key, "memory_bw_GBps", "bf16_tflops"} <= set(fields):
        raise MeshplanError("custom GPU needs `base: <catalogue GPU>` or at least "
                            "name, memory_GiB (or memory_GB), memory_bw_GBps and bf16_tflops")

    def pick(key, scale, default):
        """A figure in human units (at most 10^9 of them): rates and sizes > 0; the NVLink
        bandwidth (0: PCIe only), power and price >= 0."""
        value = fields.get(key)
        if value is None:
            return default
        zero_ok = key in ("nvlink_bidir_GBps", "tdp_w", "price_usd_per_hour")
        return finite_number(value, f"custom GPU: {key}", low=0, low_open=not zero_ok, high=1e9) * scale

    flops = dict(base.peak_flops) if base else {}
    for p in PRECISIONS:
        flops_p = pick(f"{p}_tflops", TERA, None)
        if flops_p is not None:
            flops[p] = flops_p
    return GPUSpec(
        name=str(fields.get("name", f"custom-{base.name}" if base else "custom")),
        display_name=str(fields.get("name", f"custom {base.display_name}" if base else "custom")),
        vendor=base.vendor if base else "custom",
        peak_flops=flops,
        memory_bytes=int(pick(memory_key, GIB if memory_key == "memory_GiB" else GB,
                              base.memory_bytes if base else 0)),
        memory_bw_bytes_per_s=pick("memory_bw_GBps", GB, base.memory_bw_bytes_per_s if base else 0),
        nvlink_bw_bytes_per_s=pick("nvlink_bidir_GBps", GB / 2, base.nvlink_bw_bytes_per_s if base else 0.0),
        host_link_bw_bytes_per_s=pick("host_link_GBps", GB, base.host_link_bw_bytes_per_s if base else 32 * GB),
        tdp_w=pick("tdp_w", 1, base.tdp_w if base else 400),
        price_usd_per_hour=pick("price_usd_per_hour", 1, base.price_usd_per_hour if base else 0.0),
        scaleout_bw_bytes_per_s=pick("scaleout_Gbps", GB / 8, base.scaleout_bw_bytes_per_s if base else 25 * GB),
        source="user cluster file")

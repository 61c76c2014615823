"""Profiling: microbenchmarks of this machine (GEMMs, attention, score kernels, copies,
host AdamW, collectives) and `profile_device`, which fits and writes them as a calibration."""
from __future__ import annotations

import socket
import time
from pathlib import Path

from cost_models.calibration import Calibration, default_calibration, training_constants_like
from cost_models.errors import MeshplanError
from cost_models.inputs import check_output_path
from cost_models.fitting import build_calibration, fit_comm
from cost_models.hardware import TORCH_DTYPE_NAMES, GPUSpec, get_gpu
from cost_models.units import GB


# Shape grids (M, K, N). The full grid is the reference H100 grid plus smaller shapes, so
# a profile of any GPU is comparable with shared/reference/h100/measured.jsonl.
FULL_GEMM_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096), (16384, 1024, 4096), (16384, 4096, 1024),
                    (8192, 2048, 8192), (2048, 2048, 2048), (32768, 1600, 6400), (4096, 768, 3072),
                    (4096, 768, 50304), (1024, 1024, 1024), (512, 512, 512), (4096, 512, 1024))
QUICK_GEMM_SHAPES = ((4096, 4096, 4096), (2048, 2048, 2048), (4096, 768, 3072), (1024, 1024, 1024),
                     (512, 512, 512))
CPU_GEMM_SHAPES = ((1024, 1024, 1024), (512, 512, 512), (1024, 256, 1024), (256, 256, 256),
                   (512, 128, 256), (128, 128, 128), (64, 64, 64))
CPU_QUICK_GEMM_SHAPES = ((384, 384, 384), (256, 256, 256), (256, 64, 256), (128, 128, 128), (64, 64, 64))
# (batch, heads, seq, head_dim): the reference flash-attention cases, and small ones for CPUs.
FULL_ATTENTION = ((16, 12, 1024, 64), (8, 20, 2048, 64), (4, 32, 2048, 128), (2, 16, 4096, 128))
QUICK_ATTENTION = ((16, 12, 1024, 64), (4, 32, 2048, 128))
CPU_ATTENTION = ((2, 4, 512, 64), (1, 8, 1024, 64), (2, 4, 256, 128))
CPU_QUICK_ATTENTION = ((1, 4, 128, 64), (2, 4, 256, 64))
# Unfused attention score tensors, (batch x heads, seq): softmax and dropout over them.
FULL_SCORES = ((192, 1024), (96, 2048), (32, 4096))
QUICK_SCORES = ((96, 2048),)
CPU_SCORES = ((8, 512), (4, 1024))
CPU_QUICK_SCORES = ((4, 256),)
SCORE_DROPOUT = 0.1   # Megatron-LM's attention dropout
# Routed experts' GEMMs, (experts on a rank, rows each, hidden, expert ffn): Mixtral-, Qwen3-
# and DeepSeek-shaped layers at the rows ep gives each expert, down to a few hundred.
FULL_GROUPED = ((8, 2048, 4096, 14336), (16, 1024, 4096, 1536), (32, 512, 7168, 2048), (64, 256, 2048, 768))
QUICK_GROUPED = ((16, 1024, 4096, 1536), (64, 256, 2048, 768))
CPU_GROUPED = ((8, 256, 512, 512), (16, 64, 512, 256))
CPU_QUICK_GROUPED = ((4, 64, 256, 128), (8, 32, 256, 128))
COLLECTIVE_SIZES_BYTES = (2 ** 12, 2 ** 16, 2 ** 20, 2 ** 24, 2 ** 27)
QUICK_COLLECTIVE_SIZES_BYTES = (2 ** 12, 2 ** 20, 2 ** 23)
# (parameters, tensors) of the host AdamW measurement: 64M parameters (1 GB of fp32
# parameters, gradients and moments) stream through memory like a large layer's shard;
# the quick one (4M) fits in the caches of big CPUs, so it reads high.
HOST_ADAMW = (64 * 2 ** 20, 8)
QUICK_HOST_ADAMW = (4 * 2 ** 20, 4)


def _torch():
    import torch
    return torch


def _sync_fn(device: str):
    torch = _torch()
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def seconds_per_call(fn, sync, min_time_s: float, repeats: int = 7, max_iters: int = 10_000) -> float:
    """Fastest of `repeats` batches of back-to-back calls, each batch about `min_time_s` long.

    Back-to-back calls measure steady-state device time (the host queues ahead), which is
    what a training step sees for all but the tiniest kernels. The minimum, not the mean:
    other load on the machine only ever slows a batch down.
    """
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    one_s = max(time.perf_counter() - start, 1e-7)
    iters = max(1, min(max_iters, int(min_time_s / one_s)))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / iters)
    return min(samples)




def profile_precisions(device: str, gpu: GPUSpec) -> list:
    """16/32-bit precisions to measure: those the GPU has (fp8: measure_fp8_gemms)."""
    wanted = ("fp32", "bf16") if device == "cpu" else ("bf16", "fp16", "fp32", "tf32")
    return [p for p in wanted if p in gpu.peak_flops]


def measure_gemms(device: str, precisions, shapes, min_time_s: float) -> list:
    torch = _torch()
    sync, rows = _sync_fn(device), []
    for precision in precisions:
        dtype = getattr(torch, TORCH_DTYPE_NAMES[precision])
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            for m, k, n in shapes:
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                out = torch.empty(m, n, device=device, dtype=dtype)
                seconds = seconds_per_call(lambda: torch.mm(a, b, out=out), sync, min_time_s)
                rows.append(dict(precision=precision, m=m, k=k, n=n, batch=1, seconds=seconds))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return rows


def measure_fp8_gemms(device: str, gpu: GPUSpec, shapes, min_time_s: float) -> list:
    """float8 GEMMs as torchao's float8 training runs them: torch._scaled_mm of an e4m3 row-major
    A and column-major B with tensorwise scales, a bf16 output (torchao/float8/float8_ops.py).
    Only on a CUDA GPU with an fp8 peak (skipped on CPU: its emulated _scaled_mm is no model of
    a tensor core); shapes with a side not divisible by 16 are left out (_scaled_mm refuses them)."""
    if device == "cpu" or "fp8" not in gpu.peak_flops:
        return []
    torch = _torch()
    sync, rows, one = _sync_fn(device), [], torch.tensor(1.0, device=device)
    for m, k, n in shapes:
        if m % 16 or k % 16 or n % 16:
            continue
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
        seconds = seconds_per_call(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), sync,
                                   min_time_s)
        rows.append(dict(precision="fp8", m=m, k=k, n=n, batch=1, seconds=seconds))
    return rows


def measure_copy(device: str, size_bytes: int, min_time_s: float) -> list:
    torch = _torch()
    x = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    x.fill_(1)
    y = torch.empty_like(x)
    seconds = seconds_per_call(lambda: y.copy_(x), _sync_fn(device), min_time_s)
    return [dict(bytes=size_bytes, seconds=seconds)]


def measure_checkpoint_save(device: str, size_bytes: int, directory, repeats: int = 3) -> list:
    """Time `torch.distributed.checkpoint.save` of `size_bytes` of fp32 state on `device` into
    a fresh folder under `directory`, as the runtime saves (runtime/checkpointing.py: DCP's
    FileSystemWriter, one file per rank, fsynced): the copy off the device, serialisation
    and the write to that storage. Each save's folder is removed after it is timed. Under
    torchrun every rank saves at once, as in training, and each row is this rank's rate."""
    import shutil
    import tempfile
    import warnings

    torch = _torch()
    import torch.distributed.checkpoint as dcp
    tensors = 8
    state = {f"w{i}": torch.ones(size_bytes // (4 * tensors), device=device) for i in range(tensors)}
    total = sum(t.numel() * t.element_size() for t in state.values())
    import torch.distributed as dist
    group = dist.is_available() and dist.is_initialized()
    rows = []
    for _ in range(repeats):
        # one checkpoint for all ranks, as in training: rank 0 names the folder
        named = [tempfile.mkdtemp(prefix=".meshplan-save-", dir=directory) if rank() == 0 else None]
        if group:
            dist.broadcast_object_list(named, src=0)
        folder = named[0]
        try:
            _sync_fn(device)()
            start = time.perf_counter()
            with warnings.catch_warnings():     # one process: DCP warns that it saves without a group
                warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
                dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, sync_files=True))
            rows.append(dict(bytes=total, seconds=time.perf_counter() - start))
        finally:
            if group:
                dist.barrier()
            if rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
    return rows


def measure_grouped_gemms(device: str, precision: str, cases, min_time_s: float) -> list:
    """Routed experts' forward GEMMs as planner.arch.moe.Experts runs them: the rows sorted by
    expert, split, and one torch.mm per expert against its slice of the stacked weight.
    `cases`: (experts, rows per expert, hidden, ffn)."""
    torch = _torch()
    dtype = getattr(torch, TORCH_DTYPE_NAMES[precision])
    rows_out = []
    for experts, rows, k, n in cases:
        x = torch.randn(experts * rows, k, device=device, dtype=dtype)
        w = torch.randn(experts, k, n, device=device, dtype=dtype)

        def run(x=x, w=w, rows=rows):
            return [torch.mm(part, w[e]) for e, part in enumerate(x.split(rows))]
        seconds = seconds_per_call(run, _sync_fn(device), min_time_s)
        rows_out.append(dict(experts=experts, m=rows, k=k, n=n, precision=precision, seconds=seconds))
    return rows_out


def measure_host_adamw(param_count: int, tensors: int, min_time_s: float) -> list:
    """torch.optim.AdamW steps on CPU tensors, as FSDP2's CPUOffloadPolicy runs them: fp32
    parameters and gradients in host memory, the optimizer's default CPU implementation.
    Run under torchrun with one rank per GPU, every rank steps at once, so the rate is one
    GPU's share of the host (memory bandwidth and cores are shared, as in training)."""
    torch = _torch()
    size = param_count // tensors
    params = [torch.zeros(size, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(size)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    seconds = seconds_per_call(optimizer.step, lambda: None, min_time_s, repeats=3)
    return [dict(params=size * tensors, tensors=tensors, seconds=seconds)]


def measure_attention(device: str, precision: str, cases, min_time_s: float) -> list:
    """SDPA (causal) forward, and backward as (forward + backward) - forward.

    Gradients come from torch.autograd.grad, so no .grad accumulation kernels are timed.
    """
    torch = _torch()
    import torch.nn.functional as F
    sync, dtype, rows = _sync_fn(device), getattr(torch, TORCH_DTYPE_NAMES[precision]), []
    for batch, heads, seq, head_dim in cases:
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        fwd_s = seconds_per_call(forward, sync, min_time_s)
        both_s = seconds_per_call(lambda: torch.autograd.grad(forward(), (q, k, v), grad_out), sync, min_time_s)
        rows.append(dict(precision=precision, batch=batch, heads=heads, seq_q=seq, seq_kv=seq,
                         head_dim=head_dim, causal=True, fwd_s=fwd_s, bwd_s=max(both_s - fwd_s, 0.01 * both_s)))
    return rows


def measure_score_kernels(device: str, precision: str, cases, min_time_s: float) -> list:
    """Softmax and dropout over an unfused attention's (batch x heads, seq, seq) scores: each
    timed forward + backward together (`seconds`, the gradient from torch.autograd.grad) with
    the bytes that pair moves as the cost model counts them (score_bytes); the forward alone
    is kept as `fwd_s`."""
    torch = _torch()
    import torch.nn.functional as F
    sync, dtype, rows = _sync_fn(device), getattr(torch, TORCH_DTYPE_NAMES[precision]), []
    for batch_heads, seq in cases:
        scores = torch.randn(batch_heads, seq, seq, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch_heads, seq, seq, device=device, dtype=dtype)
        kernels = {"softmax": lambda: torch.softmax(scores, dim=-1),
                   "dropout": lambda: F.dropout(scores, SCORE_DROPOUT, training=True)}
        for name, forward in kernels.items():
            fwd_s = seconds_per_call(forward, sync, min_time_s)
            both_s = seconds_per_call(lambda: torch.autograd.grad(forward(), scores, grad), sync, min_time_s)
            rows.append(dict(kernel=name, precision=precision, batch_heads=batch_heads, seq=seq,
                             element_bytes=scores.element_size(), seconds=both_s,
                             bytes=score_bytes(name, batch_heads * seq * seq, scores.element_size()),
                             fwd_s=fwd_s))
    return rows


def score_bytes(kernel: str, elements: int, element_bytes: int) -> int:
    """Bytes a score kernel's forward + backward move: softmax reads x and writes y, then
    reads y and dy and writes dx; dropout writes a one-byte mask with its output and reads
    it back with dy."""
    if kernel == "softmax":
        return elements * element_bytes * (2 + 3)
    if kernel == "dropout":
        return elements * (2 * element_bytes + 1) * 2
    raise MeshplanError(f"unknown score kernel {kernel!r}; use softmax or dropout")



def measure_collectives(device: str, sizes_bytes, min_time_s: float) -> list:
    """all_reduce / all_gather / reduce_scatter over the initialised default group.

    Every rank runs the same number of calls (agreed by a MAX all-reduce, or the ranks
    would deadlock), and the time kept is the slowest rank's, as a training step waits
    for it. An operation the backend lacks (older gloo builds have no reduce_scatter) is skipped.
    """
    torch = _torch()
    import torch.distributed as dist
    n, rows = dist.get_world_size(), []
    # torch >= 2.10 names them *_single; older releases *_into_tensor / *_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ops = {"all_reduce": lambda full, part: dist.all_reduce(full),
           "all_gather": lambda full, part: gather(full, part),
           "reduce_scatter": lambda full, part: scatter(part, full)}
    for size in sizes_bytes:
        elems = max(n, size // 4 // n * n)
        full = torch.ones(elems, dtype=torch.float32, device=device)
        part = torch.ones(elems // n, dtype=torch.float32, device=device)
        for op, call in ops.items():
            try:
                seconds = _collective_seconds(lambda: call(full, part), device, min_time_s)
            except (RuntimeError, NotImplementedError, ValueError):
                continue
            rows.append(dict(op=op, bytes=elems * 4, seconds=_max_over_ranks(seconds, device), world_size=n))
    return rows


def _collective_seconds(call, device: str, min_time_s: float, repeats: int = 5, max_iters: int = 200) -> float:
    """Like `seconds_per_call`, with the iteration count agreed across ranks."""
    sync = _sync_fn(device)
    call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    one_s = _max_over_ranks(max(time.perf_counter() - start, 1e-7), device)
    iters = max(1, min(max_iters, int(min_time_s / one_s)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        sync()
        samples.append((time.perf_counter() - start) / iters)
    return min(samples)


def _max_over_ranks(value: float, device: str) -> float:
    torch = _torch()
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _single_host() -> bool:
    import torch.distributed as dist
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names)) == 1


def _check_device(device: str) -> str:
    torch = _torch()
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MeshplanError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if ":" not in device:
            return f"cuda:{torch.cuda.current_device()}"
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise MeshplanError(f"--device {device}: this machine has cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    raise MeshplanError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def _device_name(device: str) -> str:
    torch = _torch()
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{socket.gethostname()} CPU ({torch.get_num_threads()} threads)"


def _distributed_world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def measure_device(device: str, gpu: GPUSpec, quick: bool = False, save_dir=".") -> tuple[dict, tuple]:
    """Every measurement `profile_device` makes, as raw rows, plus the fitted comm constants."""
    cpu = device == "cpu"
    min_time_s = 0.01 if quick else 0.1
    gemm_shapes = (CPU_QUICK_GEMM_SHAPES if quick else CPU_GEMM_SHAPES) if cpu else \
        (QUICK_GEMM_SHAPES if quick else FULL_GEMM_SHAPES)
    attention = (CPU_QUICK_ATTENTION if quick else CPU_ATTENTION) if cpu else \
        (QUICK_ATTENTION if quick else FULL_ATTENTION)
    copy_bytes = (64 if cpu else 256 if quick else 1024) * 2 ** 20
    attention_precision = "fp32" if cpu or "bf16" not in gpu.peak_flops else "bf16"
    scores = (CPU_QUICK_SCORES if quick else CPU_SCORES) if cpu else (QUICK_SCORES if quick else FULL_SCORES)
    measurements = {
        "matmul": measure_gemms(device, profile_precisions(device, gpu), gemm_shapes, min_time_s)
        + measure_fp8_gemms(device, gpu, gemm_shapes, min_time_s),
        "copy": measure_copy(device, copy_bytes, min_time_s),
        "attention": measure_attention(device, attention_precision, attention, min_time_s),
        "score_kernels": measure_score_kernels(device, attention_precision, scores, min_time_s),
        "host_adamw": measure_host_adamw(*(QUICK_HOST_ADAMW if quick else HOST_ADAMW), min_time_s),
        "grouped_gemm": measure_grouped_gemms(device, attention_precision, (CPU_QUICK_GROUPED if quick else CPU_GROUPED)
                                              if cpu else (QUICK_GROUPED if quick else FULL_GROUPED), min_time_s),
        "checkpoint_save": measure_checkpoint_save(device, (16 if quick else 256 if cpu else 1024) * 2 ** 20,
                                                   save_dir),
    }
    comm = ({}, {})
    if _distributed_world() > 1:
        sizes = QUICK_COLLECTIVE_SIZES_BYTES if quick else COLLECTIVE_SIZES_BYTES
        measurements["collectives"] = measure_collectives(device, sizes, min_time_s)
        comm = fit_comm(measurements["collectives"], gpu, _single_host())
    return measurements, comm


def profile_device(device: str, out_path, quick: bool = False, gpu: str | None = None,
                   force: bool = False, save_dir=None) -> Calibration:
    """Measure this machine, fit a calibration for catalogue GPU `gpu`, write it to `out_path`.

    Measures GEMMs over a shape grid, causal SDPA forward/backward, softmax and dropout over
    unfused attention scores (score_bandwidth_fraction, kept as measured), a device copy and, when
    torch.distributed is initialised with more than one rank, collectives. `quick` uses a
    small grid and short timings (seconds on a CPU). With several ranks only rank 0 writes.
    A checkpoint save is timed into `save_dir` (default: the folder of `out_path`, the
    user's storage rather than a RAM-backed /tmp).
    """
    device = _check_device(device)
    if gpu is None and device != "cpu":
        raise MeshplanError(f"give --gpu NAME: the catalogue name of this {_device_name(device)} "
                            f"(see `meshplan gpus`)")
    spec = get_gpu(gpu or "cpu")
    out_path = check_output_path(out_path, overwrite=force, force_hint=True)   # before minutes of measuring
    save_dir = out_path.parent if save_dir is None else Path(save_dir)
    if not save_dir.is_dir():
        raise MeshplanError(f"--save-dir {str(save_dir)!r} is not a directory")
    measurements, comm = measure_device(device, spec, quick, save_dir)
    torch = _torch()
    source = (f"meshplan profile{' --quick' if quick else ''} on {_device_name(device)}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    calibration = build_calibration(spec, measurements, source, _device_name(device), comm)
    if device != "cpu":
        calibration = training_constants_like(calibration, default_calibration(spec))
    if rank() == 0:
        calibration.save(out_path, force=force)
    return calibration


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def summary_lines(calibration: Calibration) -> list:
    """A few lines that say what was measured and how well the fit reproduces it."""
    lines = [f"calibration for {calibration.gpu} ({calibration.device_name or 'no device'})",
             f"  kernel overhead {calibration.kernel_overhead_s * 1e6:.1f} us, "
             f"copy {calibration.copy_bytes_per_s / GB:.1f} GB/s (read+write)"]
    for precision, fit in calibration.gemm.items():
        lines.append(f"  GEMM {precision}: {fit.peak_fraction:.3f} of "
                     f"{calibration.peak_flops[precision] / 1e12:.3g} TFLOP/s, traffic weight {fit.traffic_weight:.2f}"
                     + (f", x{fit.sustained:.3f} sustained in training" if fit.sustained != 1.0 else ""))
    for name, fit in (("fwd", calibration.attention_fwd), ("bwd", calibration.attention_bwd)):
        lines.append(f"  attention {name}: {fit.peak_fraction:.3f} of peak + {fit.fixed_s * 1e6:.1f} us per call")
    if calibration.host_s_per_op:
        lines.append(f"  host {calibration.host_s_per_op * 1e6:.1f} us per eager op, host/device overlap exponent "
                     f"{calibration.host_overlap_exponent:g} (fitted on training steps)")
    if calibration.host_adamw_bytes_per_s:
        lines.append(f"  host AdamW (optimizer offload): {calibration.host_adamw_bytes_per_s / GB:.1f} GB/s "
                     f"of its traffic per GPU")
    if calibration.grouped_gemm_factor:
        lines.append(f"  grouped GEMMs (routed experts, one launch per expert): {calibration.grouped_gemm_factor:.2f} x "
                     f"the dense GEMM fit's time")
    if calibration.checkpoint_write_bytes_per_s:
        rate = calibration.checkpoint_write_bytes_per_s / 1e9
        lines.append(f"  checkpoint save (torch.distributed.checkpoint): {rate:.2f} GB/s per rank; a cluster file "
                     f"takes it as `reliability: {{checkpoint_write_GBps_per_gpu: {rate:.3g}}}`")
    for kind, eff in calibration.comm_bw_efficiency.items():
        lines.append(f"  {kind}: {eff:.2f} of link peak, {calibration.comm_latency_s.get(kind, 0) * 1e6:.1f} us per step")
    lines += [f"  fit {k}: {v:.1f}" for k, v in calibration.fit_quality.items()]
    return lines

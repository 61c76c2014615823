"""Per-step numbers: the progress line, JSONL records, TensorBoard scalars, MFU.

Model FLOPs per token (the PaLM convention, Chowdhery et al. 2022, appendix B):
    6 * N  +  12 * layers * hidden * seq
where N counts the parameters that do matrix work - every parameter except the
position table and, for untied models, the token-embedding table (a lookup, no
multiply-add); a tied embedding counts once, as the output head's matmul. Of a
Mixture-of-Experts layer's routed experts only the top_k a token is sent to count (the
active parameters). The second
term is attention's QK^T and AV (forward + backward), without a causal discount.
Recomputation is not counted (model FLOPs, not hardware FLOPs).
MFU = FLOPs per token x tokens per second / (peak FLOP/s per device x devices), with the
peak from the GPU catalogue for the plan's precision.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from cost_models.errors import MeshplanError
from cost_models.hardware import get_gpu
from planner.arch import get_arch
from planner.models import ModelConfig

# torch.cuda.get_device_name fragments -> catalogue names, most specific first.
_CUDA_NAMES = [
    ("H200", "h200-141gb"), ("H100", "h100-sxm-80gb"), ("B200", "b200"),
    ("A100-SXM4-40GB", "a100-sxm-40gb"), ("A100 80GB PCIE", "a100-pcie-80gb"), ("A100-PCIE-80GB", "a100-pcie-80gb"),
    ("A100", "a100-sxm-80gb"), ("L40S", "l40s"), ("A10", "a10"),
    ("V100-SXM2-16GB", "v100-16gb"), ("V100", "v100-32gb"), ("MI300X", "mi300x"),
]


def gpu_for_device(device: torch.device) -> str | None:
    """Catalogue name of this process's device, or None if it is not in the catalogue."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    for fragment, gpu in _CUDA_NAMES:
        if fragment in name:
            return gpu
    return None


def peak_flops(gpu: str | None, precision: str, strict: bool = True) -> float | None:
    """Peak FLOP/s per device; None (no MFU) for an unknown device or, unless strict, an unsupported precision."""
    if gpu is None:
        return None
    spec = get_gpu(gpu)
    if not strict and precision not in spec.peak_flops:
        return None
    return spec.peak_flops_for(precision)


def flops_per_token(cfg: ModelConfig, params: int, seq: int) -> float:
    matmul_params = params - (cfg.max_seq * cfg.hidden if get_arch(cfg.arch).learned_positions else 0)
    if not cfg.tie_embeddings:
        matmul_params -= cfg.vocab * cfg.hidden
    if cfg.is_moe:   # a token runs top_k of the routed experts: planner.models.active_parameters
        from planner.models import Decoder, active_parameters, count_parameters
        model = Decoder(cfg, device="meta")
        matmul_params -= count_parameters(model) - active_parameters(model)
    # PaLM's 6N + 12 L H Q T (Chowdhery et al. 2022, App. B): H heads of size Q, which need not
    # make up hidden (Gemma, Qwen3)
    return 6.0 * matmul_params + 12.0 * cfg.layers * cfg.heads * cfg.head_dim * seq


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def progress_line(rec: dict, steps: int) -> str:
    parts = [f"step {rec['step']}/{steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad_norm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s"]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    parts.append(f"mem {rec['peak_mem_bytes'] / 2**30:.2f} GiB")
    if rec.get("skipped"):
        parts.append("skipped (fp16 overflow)")
    return " | ".join(parts)


class MetricsSink:
    """Rank 0 writes the progress line, the JSONL file, TensorBoard and W&B (`wandb`: a
    runtime.wandb_log.WandbLogger); other ranks write nothing."""

    def __init__(self, rank: int, steps: int, log_json: str | None, tensorboard: str | None, resume: bool,
                 quiet: bool = False, replace: bool = False, wandb=None):
        self.active = rank == 0
        self.mode = "w" if replace else "a"   # --force: an existing --log-json file is replaced
        self.records = 0
        self.steps, self.quiet = steps, quiet
        self.wandb = wandb if self.active else None
        self.jsonl = self.writer = self.jsonl_path = None
        # The paths were checked before any work (runtime.train._check_outputs, runtime.outputs).
        if log_json and self.active:
            self.jsonl_path = Path(log_json)   # opened at the first record, so a failed start leaves no file
        if tensorboard and self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=tensorboard)
            except ImportError:
                raise MeshplanError("--tensorboard needs the tensorboard package: pip install 'meshplan[tensorboard]'")
            except OSError as exc:
                raise MeshplanError(f"--tensorboard {tensorboard!r} cannot be written: {exc.strerror or exc}")

    def log(self, rec: dict):
        if not self.active:
            return
        if not self.quiet:
            print(progress_line(rec, self.steps), flush=True)
        if self.jsonl_path and self.jsonl is None:
            self.jsonl = open(self.jsonl_path, self.mode, buffering=1)
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.records += 1
        if self.writer:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes", "step_time_s"):
                if rec.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", rec[key], rec["step"])
        if self.wandb:
            self.wandb.log(rec)

    def drop_after(self, step: int):
        """A resumed run redoes the steps after its checkpoint's: drop their records from the
        --log-json file (those of the run that was stopped), so each step has one line. The
        file is rewritten beside itself and renamed over, so a crash leaves one or the other;
        a line that is not a JSON record (a write cut short by SIGKILL) goes too."""
        if not (self.active and self.jsonl_path and self.jsonl_path.exists()):
            return
        kept, dropped = [], 0
        for line in self.jsonl_path.read_text().splitlines():
            try:
                rec = json.loads(line)
                keep = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
            except ValueError:
                keep = False
            if keep:
                kept.append(line)
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.jsonl_path.with_name(f".{self.jsonl_path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.jsonl_path)
            self.note(f"{self.jsonl_path}: dropped {dropped} record(s) after step {step}, which this run redoes")

    def note(self, text: str):
        if self.active and not self.quiet:
            print(text, file=sys.stdout, flush=True)

    def close(self):
        """Close every output, and say what was written (one "wrote" line each, as the
        planner's commands do: planner.cli.outputs.wrote)."""
        if self.jsonl:
            self.jsonl.close()
            self.note(f"wrote {self.jsonl_path} ({self.records} step record{'s' * (self.records != 1)})")
        if self.writer:
            self.writer.close()
            self.note(f"wrote {self.writer.log_dir} (TensorBoard scalars)")
        if self.wandb:
            self.wandb.finish()

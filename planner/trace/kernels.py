"""The kernels a traced step dispatches to: where CPU dispatch saves other tensors than a
CUDA step, the CUDA choice is substituted (kernel_choices)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from planner.torch_compat import cpu_sdpa_fuses_gqa

aten = torch.ops.aten


class _CudaKernels(TorchFunctionMode):
    """Pick the kernels a CUDA training step picks where the CPU picks others.

    We measure on fake CPU tensors but the numbers stand for a GPU step. Three CPU
    dispatch choices save different tensors than CUDA's: (1) SDPA with dropout has no CPU
    fused kernel, and the math path saves the T x T probabilities; CUDA flash attention
    supports dropout, so we run the flash kernel; the same for grouped-query attention
    where the installed torch decomposes it on CPU. (2) CPU dropout saves a mask in the
    input's dtype; CUDA's fused `native_dropout` saves a bool mask. (3) `F.rms_norm` is
    composite on CPU and saves the normalised activations; CUDA (torch >= 2.8) runs
    `_fused_rms_norm`, which saves only the input and rstd (as `meshplan::fused_rms_norm` does).
    Everything else passes through unchanged. One known difference is left, as too small to
    matter: CUDA's `native_layer_norm` keeps a 16-bit input's mean and rstd in fp32, the CPU
    and meta kernels in the input's dtype - 4 bytes a token per LayerNorm under-counted
    (GPT, h 4096: 8 of the 100-140 KB a block saves per token, under 0.01 %)."""

    @property
    def choices(self) -> dict:
        return _CUDA_CHOICES

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = self.choices.get(func)
        if replacement is not None:
            out = replacement(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """The flash kernel where CPU dispatch would decompose SDPA: with dropout, and with
    grouped k/v on a torch whose CPU SDPA does not fuse GQA (see cpu_sdpa_fuses_gqa)."""
    if not (dropout_p or _gqa_decomposed(enable_gqa)):
        return None
    if attn_mask is not None or query.dim() != 4 or query.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if key.shape[1] != query.shape[1] and not cpu_sdpa_fuses_gqa():
        return GroupedFlash.apply(query, key, value, dropout_p, is_causal, scale)
    return aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


def _gqa_decomposed(enable_gqa):
    return enable_gqa and not cpu_sdpa_fuses_gqa()


cpu_sdpa_fuses_gqa()   # probe (cached) at import, outside the fake and dispatch modes traces run under


class GroupedFlash(torch.autograd.Function):
    """Flash attention over grouped k/v for a torch whose CPU flash kernel does not take
    them (2.7 accepts the shapes but computes wrong outputs and gradient shapes). The
    kernel runs on k/v repeated to the query heads - two extra copies in the traced
    forward - but what it keeps for backward is what a GQA-fusing kernel keeps (q, the
    grouped k and v, output, logsumexp), so activation memory is what 2.13 counts."""

    @staticmethod
    def forward(ctx, query, key, value, dropout_p, is_causal, scale):
        groups = query.shape[1] // key.shape[1]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), dropout_p, is_causal,
            scale=scale)[:2]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.args = groups, dropout_p, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        groups, dropout_p, is_causal, scale = ctx.args
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), out, lse,
            dropout_p, is_causal, scale=scale)
        fold = lambda g: g.unflatten(1, (key.shape[1], groups)).sum(2)  # noqa: E731
        return dq, fold(dk), fold(dv), None, None, None


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    if not training or not p or inplace or not input.dtype.is_floating_point:
        return None
    return aten.native_dropout(input, p, True)[0]


@torch.library.custom_op("meshplan::fused_rms_norm", mutates_args=())
def _fused_rms_norm_op(x: torch.Tensor, weight: torch.Tensor | None, dims: list[int],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as CUDA's `_fused_rms_norm` runs it: statistics in (at least) fp32, and -
    see its autograd below - only the input, rstd and weight saved for backward. An op of
    its own, so that it stays one node (with this autograd) in traced aten graphs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    rstd = torch.rsqrt(x.to(acc).pow(2).mean(dims, keepdim=True) + eps)
    y = (x.to(acc) * rstd).to(x.dtype)
    return (y * weight if weight is not None else y), rstd


@_fused_rms_norm_op.register_fake
def _fused_rms_norm_fake(x, weight, dims, eps):
    stats = [1 if i - x.dim() in dims else s for i, s in enumerate(x.shape)]
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(stats, dtype=torch.promote_types(x.dtype, torch.float32))


def _fused_rms_norm_setup(ctx, inputs, output):
    x, weight, dims, _ = inputs
    ctx.save_for_backward(x, output[1], weight)
    ctx.dims = dims


def _fused_rms_norm_backward(ctx, grad, _grad_rstd):
    x, rstd, weight = ctx.saved_tensors
    xhat = x.to(rstd.dtype) * rstd
    grad_weight = None
    if weight is not None and ctx.needs_input_grad[1]:
        batch_dims = tuple(range(grad.dim() - len(ctx.dims)))
        grad_weight = (grad.to(rstd.dtype) * xhat).sum(batch_dims).to(weight.dtype)
    g = (grad * weight if weight is not None else grad).to(rstd.dtype)
    grad_x = rstd * (g - xhat * (g * xhat).mean(ctx.dims, keepdim=True))
    return grad_x.to(x.dtype), grad_weight, None, None


_fused_rms_norm_op.register_autograd(_fused_rms_norm_backward, setup_context=_fused_rms_norm_setup)


def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):
    if not input.dtype.is_floating_point:
        return None
    dims = list(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return _fused_rms_norm_op(input, weight, dims, eps)[0]


_CUDA_CHOICES = {F.scaled_dot_product_attention: _flash_attention, F.dropout: _fused_dropout,
                 F.rms_norm: _fused_rms_norm}
KERNELS = ("cuda", "cpu")


class _FusedCpuGqa(_CudaKernels):
    """Plain CPU dispatch, but grouped-query SDPA runs the fused CPU kernel on every
    supported torch (2.13 dispatches it there itself), so a trace does not depend on the
    release."""

    @property
    def choices(self) -> dict:
        return {F.scaled_dot_product_attention: _flash_for_gqa}


def _flash_for_gqa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        return None     # CPU's own choice: the math path
    return _flash_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def kernel_choices(kernels: str = "cuda"):
    """Context in which ops dispatch as on `kernels`: "cuda" (what a GPU step runs, see
    `_CudaKernels`) or "cpu" (plain CPU dispatch, grouped-query attention fused)."""
    if kernels == "cuda":
        return _CudaKernels()
    return contextlib.nullcontext() if cpu_sdpa_fuses_gqa() else _FusedCpuGqa()

"""Published FLOP conventions, to turn a source's "model TFLOP/s per GPU" back into the
tokens/s per GPU it was computed from (tokens/s = TFLOP/s / model FLOPs per token).

A source that prints only TFLOP/s counts FLOPs its own way; these are the two the rows of
benchmarks/data/long_context_fp8_runs.json name ("flops_formula"), each cited:

- "nemo-llama-full-attention", "nemo-llama-causal": NeMo's llama2/llama3 formula
  (NVIDIA/NeMo nemo/utils/flops_formulas.py, `llama2`/`llama3`), per token
  L h^2 (12 + 12 kv/heads + 18 ffn/h + 12 s/h [x 0.5 causal] + 6 V/(L h)). NeMo counted
  full attention until 2025-08-09 (commit 6251117f4c halved the 12 s/h term); NeMo 24.07's
  table (LLAMA2-7B 16934 tokens/s -> 780 TFLOP/s) is the full form, Megatron-Bridge's tables
  from 25.11 on (LLAMA3_8B 14451 -> 744) the causal one.
- "torchtitan-full-attention": torchtitan's `get_dense_model_nparams_and_flops`
  (torchtitan/models/utils.py): 6 (parameters - input embedding) + 12 L heads head_dim s,
  "do not account for sparsity in causal attention".
"""
from __future__ import annotations


def _layer_params(cfg: dict) -> int:
    """Weights of one Llama block: q, k, v, o projections, the SwiGLU MLP, two RMSNorms."""
    h, head_dim = cfg["hidden"], cfg.get("head_dim") or cfg["hidden"] // cfg["heads"]
    kv = cfg.get("kv_heads") or cfg["heads"]
    attention = h * cfg["heads"] * head_dim * 2 + h * kv * head_dim * 2
    return attention + 3 * h * cfg["ffn"] + 2 * h


def llama_params(cfg: dict) -> int:
    """All parameters of a Llama model config (untied input and output embeddings)."""
    return cfg["layers"] * _layer_params(cfg) + 2 * cfg["vocab"] * cfg["hidden"] + cfg["hidden"]


def nemo_llama_flops_per_token(cfg: dict, seq: int, causal: bool) -> float:
    L, h = cfg["layers"], cfg["hidden"]
    kv = cfg.get("kv_heads") or cfg["heads"]
    attention = 12 * seq / h * (0.5 if causal else 1.0)
    return L * h * h * (12 + 12 * kv / cfg["heads"] + 18 * cfg["ffn"] / h + attention + 6 * cfg["vocab"] / (L * h))


def torchtitan_flops_per_token(cfg: dict, seq: int) -> float:
    head_dim = cfg.get("head_dim") or cfg["hidden"] // cfg["heads"]
    matmul_params = llama_params(cfg) - cfg["vocab"] * cfg["hidden"]
    return 6 * matmul_params + 12 * cfg["layers"] * cfg["heads"] * head_dim * seq


FORMULAS = {
    "nemo-llama-full-attention": lambda cfg, seq: nemo_llama_flops_per_token(cfg, seq, causal=False),
    "nemo-llama-causal": lambda cfg, seq: nemo_llama_flops_per_token(cfg, seq, causal=True),
    "torchtitan-full-attention": torchtitan_flops_per_token,
}


def tokens_per_s_per_gpu(tflops_per_gpu: float, formula: str, cfg: dict, seq: int) -> float:
    """The tokens/s per GPU behind a published model TFLOP/s per GPU, under its convention."""
    return tflops_per_gpu * 1e12 / FORMULAS[formula](cfg, seq)

"""Export a plan to Megatron-LM: its arguments (megatron_args.txt) and a torchrun launch
script (launch.sh) running pretrain_gpt.py with them on the plan's nodes. Every option
written is one of Megatron-LM's own parser (tests/interop check them against
planner/interop/data/megatron_lm_options.json); reading the files back with
`--from megatron-lm` gives the same plan."""
from __future__ import annotations

from math import gcd

from cost_models.errors import MeshplanError
from planner.interop.base import ExportFolder, SplitError, stage_prefix_counts, uniform_mode
from planner.interop.megatron_lm import GPT2_VOCAB, OLD
from planner.plan import even_stages

FILES = ("megatron_args.txt", "launch.sh")
DESCRIBES = {"megatron-lm": "NVIDIA/Megatron-LM d98e8a6 (Megatron-Core)",
             OLD: "NVIDIA/Megatron-LM 2021 (de7dc40, the SC21 scripts' code)"}


def arguments(plan, config) -> list:
    """[(option, value or None)] running `plan` on `config` with Megatron-LM."""
    old = plan.engine == OLD
    if old and config.arch != "gpt":
        raise MeshplanError("the 2021 Megatron-LM code trains GPT models only: export a gpt model or use "
                            "--engine megatron-lm")
    args = [("--num-layers", config.layers), ("--hidden-size", config.hidden),
            ("--num-attention-heads", config.heads), ("--ffn-hidden-size", config.ffn),
            ("--seq-length", plan.seq), ("--max-position-embeddings", config.max_seq),
            ("--micro-batch-size", plan.micro_batch), ("--global-batch-size", plan.global_batch),
            ("--tensor-model-parallel-size", plan.tp), ("--pipeline-model-parallel-size", plan.pp)]
    if plan.cp > 1:   # refused by the 2021 engine before an export (planner.engines.megatron_lm)
        args.append(("--context-parallel-size", plan.cp))
    args += _pipeline(plan, config.layers)
    args += _model(config, plan, old)
    if plan.sequence_parallel:
        args.append(("--sequence-parallel", None))
    if plan.precision == "fp8":   # Transformer Engine's FP8 GEMMs in bf16 training, per-tensor scales
        args += [("--bf16", None), ("--fp8-format", "hybrid"), ("--fp8-recipe", "tensorwise")]
    elif plan.precision != "fp32":
        args.append((f"--{plan.precision}", None))
    args += _recompute(plan, config.layers, old)
    if plan.zero == 1:
        args.append(("--use-distributed-optimizer", None))
    # Megatron-Core's orders "tp-cp-ep-dp-pp" and, with --use-tp-pp-dp-mapping, "tp-cp-ep-pp-dp"
    # (megatron/core/parallel_state.py): cp just outside tp in both
    if plan.rank_order == ["dp", "pp", "cp", "tp"]:
        args.append(("--use-tp-pp-dp-mapping", None))
    elif plan.rank_order != ["pp", "dp", "cp", "tp"]:
        raise MeshplanError(f"Megatron-LM orders ranks tp-cp-dp-pp or tp-cp-pp-dp, not the plan's {plan.rank_order}")
    args += _engine_options(plan, old)
    # what makes the script run as it stands: synthetic data and a short schedule (edit these)
    if old:
        args += [("--data-path", "${DATA_PATH}"), ("--vocab-file", "${VOCAB_FILE}"), ("--merge-file", "${MERGE_FILE}")]
    else:
        args.append(("--mock-data", None))
    args += [("--train-iters", 100), ("--lr", "1.0e-4"), ("--log-interval", 1), ("--eval-iters", 0)]
    return args


def _pipeline(plan, layers: int) -> list:
    even = even_stages(layers, plan.virtual_stages)
    stages = plan.stages or even
    out = []
    if plan.interleave > 1:
        out.append(("--num-layers-per-virtual-pipeline-stage", layers // plan.virtual_stages))
    if layers % plan.virtual_stages == 0 and stages == even:
        return out
    sizes = [e - s for s, e in stages]
    middle = set(sizes[1:-1])
    if plan.interleave == 1 and plan.engine != OLD and len(middle) <= 1:
        first, last = sizes[0], sizes[-1]
        m = middle.pop() if middle else None
        out += [("--decoder-first-pipeline-num-layers", first)] if first != m else []
        out += [("--decoder-last-pipeline-num-layers", last)] if last != m or m is None else []
        return out
    raise SplitError(f"Megatron-LM splits the {layers} layers evenly over the pipeline stages (or sets the first "
                     f"and last stage's); the plan's stages {sizes} are neither")


def _model(config, plan, old: bool) -> list:
    out = []
    if config.arch == "llama":
        out += [("--position-embedding-type", "rope"), ("--swiglu", None), ("--normalization", "RMSNorm"),
                ("--disable-bias-linear", None)]
        if config.rope_theta != int(config.rope_theta):
            raise MeshplanError(f"Megatron-LM's --rotary-base is a whole number, not {config.rope_theta}")
        out.append(("--rotary-base", int(config.rope_theta)))
        if config.kv_heads != config.heads:
            out += [("--group-query-attention", None), ("--num-query-groups", config.kv_heads)]
    elif config.arch != "gpt":
        raise MeshplanError(f"Megatron-LM's GPT model has no {config.arch} family: export a gpt or llama model")
    if not config.tie_embeddings:
        if old:
            raise MeshplanError("the 2021 Megatron-LM code ties the output layer to the embedding: tie them")
        out.append(("--untie-embeddings-and-output-weights", None))
    if config.norm_eps != 1e-5:
        out.append(("--layernorm-epsilon" if old else "--norm-epsilon", _num(config.norm_eps)))
    # Megatron-LM's dropouts default to 0.1: always say them
    out += [("--hidden-dropout", _num(config.dropout)), ("--attention-dropout", _num(config.dropout))]
    return out + _vocab(config.vocab, plan.tp, old)


def _vocab(vocab: int, tp: int, old: bool) -> list:
    """A tokenizer and --make-vocab-size-divisible-by D whose padding gives exactly `vocab`
    (Megatron-LM pads to a multiple of D x tp)."""
    if vocab % tp:
        raise MeshplanError(f"Megatron-LM pads the vocabulary to a multiple of tp; the model's {vocab} is not a "
                            f"multiple of tp {tp}: use a vocab divisible by {tp}")
    if not old:
        return [("--tokenizer-type", "NullTokenizer"), ("--vocab-size", vocab),
                ("--make-vocab-size-divisible-by", gcd(vocab // tp, 128))]
    for divisor in range(1, vocab // tp + 1):
        multiple = divisor * tp
        if vocab % multiple == 0 and -(-GPT2_VOCAB // multiple) * multiple == vocab:
            return [("--make-vocab-size-divisible-by", divisor)]
    raise MeshplanError(f"the 2021 Megatron-LM code reads the GPT-2 vocabulary ({GPT2_VOCAB}) padded to a "
                        f"multiple of D x tp; no D gives the model's {vocab}")


def _recompute(plan, layers: int, old: bool) -> list:
    mode = uniform_mode([plan.checkpoint_for(i) for i in range(layers)])
    if mode == "none":
        return []
    if mode == "attention" and not old:
        return [("--recompute-granularity", "selective")]
    if mode == "full":
        if old:
            return [("--checkpoint-activations", None)]
        return [("--recompute-granularity", "full"), ("--recompute-method", "uniform"), ("--recompute-num-layers", 1)]
    counts = stage_prefix_counts(plan, layers)
    if counts and len(set(counts)) == 1 and not old:
        return [("--recompute-granularity", "full"), ("--recompute-method", "block"),
                ("--recompute-num-layers", counts[0])]
    raise MeshplanError("Megatron-LM recomputes every layer, or the first N of each pipeline stage; the plan's "
                        "per-layer recompute is neither: pin --checkpoint full or none")


def _engine_options(plan, old: bool) -> list:
    from planner.engines import get_engine
    options = {**{k: o.default for k, o in get_engine(plan.engine).options.items()}, **plan.engine_options}
    if old:
        return [("--DDP-impl", options["ddp_impl"])]
    out = [("--overlap-grad-reduce", None)] if options["overlap_grad_reduce"] else []
    backend = options["attention_backend"]
    if backend == "local":
        out.append(("--transformer-impl", "local"))   # LocalSpecProvider: DotProductAttention
    elif backend != "auto":
        out.append(("--attention-backend", backend))
    return out


def _num(value) -> str:
    return repr(float(value))


def _line(option, value) -> str:
    return option if value is None else f"{option} {value}"


def write(plan, spec, cluster, out: ExportFolder) -> None:
    if spec.config is None:
        raise MeshplanError(f"Megatron-LM builds its own GPT model; {spec.name} is a factory: export a preset or "
                            f"a JSON model")
    args = arguments(plan, spec.config)
    out.add("megatron_args.txt", "\n".join(_line(o, v) for o, v in args) + "\n")
    gpus = cluster.gpus_per_node
    nodes = plan.world_size // gpus if plan.world_size % gpus == 0 else None
    launcher = (f"--nnodes {nodes} --nproc-per-node {gpus}" if nodes else f"--nnodes 1 --nproc-per-node {plan.world_size}")
    body = " \\\n    ".join(_line(o, v) for o, v in args)
    out.add("launch.sh", f"""#!/bin/bash
# Megatron-LM ({DESCRIBES[plan.engine]}) running the plan meshplan chose:
# dp {plan.dp} x tp {plan.tp} x pp {plan.pp} on {cluster.name}, written by `meshplan plan --export megatron-lm`.
# Run it from a Megatron-LM checkout on each node (NODE_RANK 0..; MASTER_ADDR = node 0).
# The data and schedule flags at the end run synthetic data for 100 steps: replace them with yours.
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun {launcher} --node-rank ${{NODE_RANK:-0}} \\
    --master-addr ${{MASTER_ADDR:-localhost}} --master-port ${{MASTER_PORT:-6000}} \\
    pretrain_gpt.py \\
    {body}
""", executable=True)

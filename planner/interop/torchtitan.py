"""Import and export a torchtitan job (pytorch/torchtitan b5bcd76).

At that commit a run is configured by a Python function returning `Trainer.Config`
(torchtitan/config/README.md); TOML job files are no longer read. What a run can write
out is that config as JSON (`debug.save_config_file` or `print_config`:
`Trainer.Config.to_dict()`, torchtitan/trainer.py), and that is what `--from torchtitan`
reads: the sections training, parallelism, activation_checkpoint, compile and model_spec,
a key left out taking the dataclass default of torchtitan/config/configs.py. The export
writes the Python config module (run with `--module ... --config ...`), the same JSON, and a
torchrun launch script.

Mapping (sources in torchtitan/): batch from training.num_tokens_per_microbatch_per_dp_rank,
num_tokens_per_train_step and max_context_length (trainer.py); data_parallel_shard_degree
> 1 is FSDP2, ZeRO-3 unless `fsdp_reshard_after_forward` is "never" or "default" with
pipeline parallelism (distributed/fsdp.py get_fsdp_reshard_after_forward_policy), ZeRO-2
then; data_parallel_replicate_degree alone is DDP (ZeRO 0); pipeline stages as
distributed/pipeline_parallel.py _generate_llm_fqn_per_model_part splits them;
activation_checkpoint null / FullAC / SelectiveAC (distributed/activation_checkpoint.py);
model_spec.flavor of llama3 (models/llama3/__init__.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

from cost_models.errors import MeshplanError
from cost_models.inputs import parse_json, shown
from planner.interop.base import ExportFolder, Imported, SplitError, source_text, uniform_mode, whole

OPEN = ()   # the config fixes every plan flag
FILES = ("job_config.json", "meshplan_torchtitan.py", "launch.sh")
TRAINING = {"num_tokens_per_microbatch_per_dp_rank": 16384, "num_tokens_per_train_step": -1,
            "max_context_length": 2048, "max_norm": 1.0, "steps": 10000, "enable_cpu_offload": False,
            "disable_cuda_graphs": False, "dtype": "float32", "mixed_precision_param": "bfloat16",
            "mixed_precision_reduce": "float32", "gc_freq": 50, "gc_debug": False}
PARALLELISM = {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
               "fsdp_reshard_after_forward": "default", "enable_fsdp_symm_mem": False, "tensor_parallel_degree": 1,
               "enable_sequence_parallel": True, "spmd_backend": "spmd_types", "pipeline_parallel_degree": 1,
               "module_fqns_per_model_part": None, "pipeline_parallel_first_stage_less_layers": 1,
               "pipeline_parallel_last_stage_less_layers": 1, "pipeline_parallel_layers_per_stage": None,
               "pipeline_parallel_schedule": "1F1B", "pipeline_parallel_schedule_csv": "",
               "num_pp_microbatches": 1, "context_parallel_degree": 1, "context_parallel_load_balancer": "headtail",
               "context_parallel_ptrr_mask_key": None, "expert_parallel_degree": 1}
# Settings meshplan does not model: accepted at these values only.
AT_DEFAULT = {"training": ("dtype", "mixed_precision_reduce"),
              "parallelism": ("enable_fsdp_symm_mem", "module_fqns_per_model_part", "pipeline_parallel_schedule_csv",
                              "context_parallel_degree", "expert_parallel_degree")}
AC_BASE = {"preserve_rng_state", "determinism_check", "debug"}
SECTIONS = {"model_spec", "hf_assets_path", "dump_folder", "profiler", "metrics", "tokenizer", "dataloader",
            "optimizer", "lr_scheduler", "training", "parallelism", "checkpoint", "activation_checkpoint", "compile",
            "comm", "validator", "debug", "override", "loss"}
SCHEDULES = {"1F1B": "1f1b", "GPipe": "gpipe", "Interleaved1F1B": "interleaved"}
# llama3 flavors (torchtitan/models/llama3/__init__.py): layers, dim, heads, kv heads, vocab,
# (multiple_of, ffn_dim_multiplier) of compute_ffn_hidden_dim, and meshplan's preset if any.
FLAVORS = {"debugmodel": (6, 256, 16, 16, 2048, (256, None), None), "1B": (16, 2048, 32, 8, 128256, (1024, 1.5), None),
           "3B": (28, 3072, 24, 8, 128256, (1024, 1.0), None), "8B": (32, 4096, 32, 8, 128256, (1024, 1.3), "llama3-8b"),
           "70B": (80, 8192, 64, 8, 128256, (4096, 1.3), "llama3-70b"),
           "405B": (126, 16384, 128, 8, 128256, (4096, 1.2), "llama3-405b")}
RECIPES = {"debugmodel": "llama3_debugmodel", "70B": "llama3_70b", "405B": "llama3_405b"}   # else llama3_8b


def ffn_dim(dim: int, multiple_of: int, multiplier) -> int:
    """torchtitan/models/common/feed_forward.py compute_ffn_hidden_dim."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def flavor_config(flavor: str, seq: int):
    """meshplan's ModelConfig of a llama3 flavor (its preset where there is one)."""
    from planner.models import ModelConfig
    from planner.zoo import PRESETS
    layers, dim, heads, kv, vocab, (multiple, mult), preset = FLAVORS[flavor]
    if preset:
        config = PRESETS[preset]
    else:
        config = ModelConfig("llama", layers, dim, heads, vocab, kv_heads=kv, ffn=ffn_dim(dim, multiple, mult),
                             max_seq=8192, tie_embeddings=False, rope_theta=500000.0, name=f"torchtitan-llama3-{flavor}")
    return replace(config, max_seq=max(config.max_seq, seq))   # its RoPE runs to 131072 tokens


def _flavor_of(config) -> str | None:
    for name, (layers, dim, heads, kv, vocab, (multiple, mult), _) in FLAVORS.items():
        if (config.arch, config.layers, config.hidden, config.heads, config.kv_heads, config.vocab, config.ffn,
                config.tie_embeddings) == ("llama", layers, dim, heads, kv, vocab, ffn_dim(dim, multiple, mult), False):
            return name
    return None


def _section(config: dict, name: str, defaults: dict | None, where: str) -> dict:
    value = config.get(name, {})
    if value is None and defaults is None:
        return None
    if not isinstance(value, dict):
        raise MeshplanError(f"{where}: {name} must be a JSON object, got {shown(value)}")
    if defaults is not None:
        unknown = sorted(map(str, set(value) - set(defaults)))
        if unknown:
            raise MeshplanError(f"{where}: unknown key(s) {unknown} in {name} (not torchtitan's at b5bcd76)")
        value = {**defaults, **value}
        for key in AT_DEFAULT.get(name, ()):
            if value[key] != defaults[key]:
                raise MeshplanError(f"{where}: {name}.{key} {json.dumps(value[key])} is not modelled by meshplan: "
                                    f"use {json.dumps(defaults[key])}")
    return value


def read(source: str, world: int, model=None, flags: dict | None = None) -> Imported:
    """The job a torchtitan config JSON describes, on `world` GPUs."""
    text, where = source_text(source, "torchtitan config")
    config = parse_json(text, where)
    if not isinstance(config, dict):
        raise MeshplanError(f"{where} must be a JSON object (Trainer.Config.to_dict())")
    unknown = sorted(map(str, set(config) - SECTIONS))
    if unknown:
        raise MeshplanError(f"{where}: unknown section(s) {unknown}; torchtitan's: {', '.join(sorted(SECTIONS))}")
    training = _section(config, "training", TRAINING, where)
    par = _section(config, "parallelism", PARALLELISM, where)
    if (config.get("compile") or {}).get("enable"):
        raise MeshplanError(f"{where}: compile.enable (torch.compile) is not modelled by meshplan: set it false")
    seq = whole(training["max_context_length"], f"{where}: training.max_context_length")
    spec = _model(config, model, seq, where)
    tp, pp = (whole(par[k], f"{where}: parallelism.{k}") for k in ("tensor_parallel_degree", "pipeline_parallel_degree"))
    replicate = whole(par["data_parallel_replicate_degree"], f"{where}: parallelism.data_parallel_replicate_degree")
    shard = par["data_parallel_shard_degree"]
    if shard == -1:                      # "leftover ranks" (configs.py)
        if world % (replicate * tp * pp):
            raise MeshplanError(f"{where}: replicate x tp x pp = {replicate * tp * pp} does not divide {world} GPUs")
        shard = world // (replicate * tp * pp)
    shard = whole(shard, f"{where}: parallelism.data_parallel_shard_degree")
    if replicate * shard * tp * pp != world:
        raise MeshplanError(f"{where}: replicate x shard x tp x pp = {replicate * shard * tp * pp} but the cluster "
                            f"has {world} GPUs: make them agree")
    if replicate > 1 and shard > 1:
        raise MeshplanError(f"{where}: HSDP (data_parallel_replicate_degree and _shard_degree both > 1) is not "
                            f"modelled by meshplan: use one")
    dp = replicate * shard
    policy = par["fsdp_reshard_after_forward"]
    if policy not in ("default", "always", "never"):
        raise MeshplanError(f"{where}: parallelism.fsdp_reshard_after_forward takes default, always or never")
    zero = 0 if shard == 1 else 2 if policy == "never" or (policy == "default" and pp > 1) else 3
    precision = {"bfloat16": "bf16", "float32": "fp32"}.get(training["mixed_precision_param"])
    if precision is None:
        raise MeshplanError(f"{where}: training.mixed_precision_param takes bfloat16 or float32")
    fields = dict(dp=dp, tp=tp, pp=pp, zero=zero, precision=precision, seq=seq,
                  sequence_parallel=tp > 1 and bool(par["enable_sequence_parallel"]),
                  offload_optimizer=bool(training["enable_cpu_offload"]))
    fields.update(_batch(training, par, dp, pp, seq, where))
    layers = spec.config.layers
    fields.update(_pipeline(par, layers, pp, where))
    fields["checkpoint"] = [_recompute(config, where)] * layers
    if fields["checkpoint"][0] == "none":
        fields["checkpoint"] = []
    pinned = ("tp", "pp", "zero", "micro_batch", "checkpoint", "schedule", "interleave", "sequence_parallel",
              "offload_optimizer", "precision")
    return Imported("torchtitan", {}, fields, spec, [], pinned)


def _model(config: dict, model, seq: int, where: str):
    from planner.zoo import ModelSpec
    spec = config.get("model_spec")
    if spec is None:
        if model is None:
            raise MeshplanError(f"{where} has no model_spec: give --model")
        if model.config is None:
            raise MeshplanError("torchtitan trains its own model definitions: give a preset or JSON model")
        return model
    if not isinstance(spec, dict) or spec.get("name") != "llama3" or spec.get("flavor") not in FLAVORS:
        name = spec.get("name") if isinstance(spec, dict) else spec
        flavor = spec.get("flavor") if isinstance(spec, dict) else None
        raise MeshplanError(f"{where}: model_spec {name} {flavor} is not one meshplan knows: it reads llama3 "
                            f"flavors ({', '.join(FLAVORS)}); drop model_spec and give --model")
    if model is not None:
        raise MeshplanError(f"{where} names the model (llama3 {spec['flavor']}): drop --model")
    quantized = [k for k in ("float8", "mxfp8", "nvfp4") if k in json.dumps(spec.get("model", {})).lower()]
    if quantized:
        raise MeshplanError(f"{where}: the model's {quantized[0]} linears are not modelled by meshplan")
    config = flavor_config(spec["flavor"], seq)
    return ModelSpec(config.name, config)


def _batch(training: dict, par: dict, dp: int, pp: int, seq: int, where: str) -> dict:
    tokens = whole(training["num_tokens_per_microbatch_per_dp_rank"],
                   f"{where}: training.num_tokens_per_microbatch_per_dp_rank")
    if tokens % seq:
        raise MeshplanError(f"{where}: num_tokens_per_microbatch_per_dp_rank {tokens} is not a whole number of "
                            f"max_context_length {seq} sequences; meshplan prices whole sequences")
    pp_micro = whole(par["num_pp_microbatches"], f"{where}: parallelism.num_pp_microbatches") if pp > 1 else 1
    per_step = training["num_tokens_per_train_step"]
    per_accum = tokens * pp_micro * dp
    per_step = per_accum if per_step == -1 else whole(per_step, f"{where}: training.num_tokens_per_train_step")
    if per_step % per_accum:
        raise MeshplanError(f"{where}: num_tokens_per_train_step {per_step} is not a multiple of the {per_accum} "
                            f"tokens of one accumulation step (torchtitan/trainer.py refuses it too)")
    if pp > 1 and per_step != per_accum:
        raise MeshplanError(f"{where}: with pipeline parallelism torchtitan runs {per_step // per_accum} schedules of "
                            f"{pp_micro} micro-batches a step; meshplan simulates one: set num_pp_microbatches to "
                            f"{per_step // (tokens * dp)}")
    return dict(micro_batch=tokens // seq, global_batch=per_step // seq)


def _pipeline(par: dict, layers: int, pp: int, where: str) -> dict:
    if pp == 1:
        return dict(schedule="1f1b", interleave=1)
    name = par["pipeline_parallel_schedule"]
    if name not in SCHEDULES:
        raise MeshplanError(f"{where}: pipeline schedule {name} is not modelled by meshplan: use "
                            f"{', '.join(SCHEDULES)}")
    looped = name == "Interleaved1F1B"
    first, last = (whole(par[k], f"{where}: parallelism.{k}", low=0)
                   for k in ("pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers"))
    per_stage = par["pipeline_parallel_layers_per_stage"]
    if per_stage is not None:
        stages = math.ceil((layers + first + last) / whole(per_stage, f"{where}: pipeline_parallel_layers_per_stage"))
        if stages % pp or (stages // pp != 1) == (not looped):
            raise MeshplanError(f"{where}: {stages} virtual stages do not fit schedule {name} on {pp} ranks "
                                f"(torchtitan refuses it too)")
    else:
        stages = pp * (2 if looped else 1)
    return dict(schedule=SCHEDULES[name], interleave=stages // pp, stages=split_stages(stages, layers, first, last))


def split_stages(stages: int, layers: int, first: int, last: int) -> list:
    """[start, end) layers per stage as _generate_llm_fqn_per_model_part assigns them."""
    effective = layers + first + last
    per, extra = divmod(effective, stages)
    if per == 0 or first > per or last > per:
        raise MeshplanError(f"torchtitan cannot split {layers} layers into {stages} stages "
                            f"(first/last stage less layers {first}/{last})")
    out, current = [], 0
    for k in range(stages):
        n = per + (1 if k < extra else 0) - (first if k == 0 else last if k == stages - 1 else 0)
        end = min(layers, current + n)
        out.append([current, end])
        current = end
    return out


def _recompute(config: dict, where: str) -> str:
    if "activation_checkpoint" not in config:
        return "selective"                   # Trainer.Config's default: SelectiveAC.Config
    ac = config["activation_checkpoint"]
    if ac is None:
        return "none"
    if not isinstance(ac, dict):
        raise MeshplanError(f"{where}: activation_checkpoint must be null or a JSON object")
    if "memory_budget" in ac or "visualize_memory_budget_pareto" in ac:
        raise MeshplanError(f"{where}: MemoryBudgetAC (the compiler's recompute) is not modelled by meshplan")
    unknown = sorted(set(ac) - AC_BASE - {"force_recompute_mm_shapes_by_fqns"})
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown} in activation_checkpoint")
    return "selective" if "force_recompute_mm_shapes_by_fqns" in ac else "full"


def job_config(plan, flavor: str) -> dict:
    """The plan as Trainer.Config.to_dict() writes these sections."""
    mode = uniform_mode(plan.checkpoint)
    if mode not in ("none", "full", "selective"):
        raise MeshplanError("torchtitan recomputes every block the same way (none, full or selective); the plan's "
                            "per-layer recompute is not: pin --checkpoint")
    shard, replicate = (plan.dp, 1) if plan.zero else (1, plan.dp)
    par = dict(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard,
               fsdp_reshard_after_forward="never" if plan.zero == 2 else "always",
               tensor_parallel_degree=plan.tp, enable_sequence_parallel=plan.sequence_parallel or plan.tp == 1,
               pipeline_parallel_degree=plan.pp)
    if plan.pp > 1:
        layers = FLAVORS[flavor][0]
        inverse = {v: k for k, v in SCHEDULES.items()}
        par.update(pipeline_parallel_schedule=inverse[plan.schedule], num_pp_microbatches=plan.grad_accum)
        if (plan.interleave > 1) != (plan.schedule == "interleaved"):
            raise MeshplanError("torchtitan runs interleave > 1 with Interleaved1F1B only")
        found = _stage_weights(plan, layers)
        if found is None:
            raise SplitError("torchtitan splits the blocks by its first/last-stage weights; the plan's stages are "
                             "no such split")
        par.update(found)
    ac = None if mode == "none" else dict(preserve_rng_state=True, determinism_check="default", debug=False)
    if mode == "selective":
        ac["force_recompute_mm_shapes_by_fqns"] = ["moe.router.gate"]
    training = dict(num_tokens_per_microbatch_per_dp_rank=plan.micro_batch * plan.seq,
                    num_tokens_per_train_step=plan.global_batch * plan.seq, max_context_length=plan.seq,
                    mixed_precision_param="bfloat16" if plan.precision == "bf16" else "float32",
                    enable_cpu_offload=plan.offload_optimizer)
    return {"model_spec": {"name": "llama3", "flavor": flavor}, "training": training, "parallelism": par,
            "activation_checkpoint": ac, "compile": {"enable": False}}


def _stage_weights(plan, layers: int) -> dict | None:
    """torchtitan first/last-stage weights (and layers per stage) that give the plan's stages."""
    from planner.plan import even_stages
    stages = plan.stages or even_stages(layers, plan.virtual_stages)
    for first in range(0, 4):
        for last in range(0, 4):
            try:
                split = split_stages(plan.virtual_stages, layers, first, last)
            except MeshplanError:
                continue
            if split == stages:
                out = dict(pipeline_parallel_first_stage_less_layers=first,
                           pipeline_parallel_last_stage_less_layers=last)
                if plan.interleave > 2:
                    per = math.ceil((layers + first + last) / plan.virtual_stages)
                    if math.ceil((layers + first + last) / per) != plan.virtual_stages:
                        continue
                    out["pipeline_parallel_layers_per_stage"] = per
                return out
    return None


def write(plan, spec, cluster, out: ExportFolder) -> None:
    flavor = _flavor_of(spec.config) if spec.config is not None else None
    if flavor is None:
        raise MeshplanError(f"torchtitan builds its models from named flavors; {spec.name} matches none of "
                            f"llama3's ({', '.join(FLAVORS)})")
    job = job_config(plan, flavor)
    out.add("job_config.json", json.dumps(job, indent=2) + "\n")
    recipe = RECIPES.get(flavor, "llama3_8b")
    t, p, ac = job["training"], job["parallelism"], job["activation_checkpoint"]
    ac_line = ("None" if ac is None else "SelectiveAC.Config()" if "force_recompute_mm_shapes_by_fqns" in ac
               else "FullAC.Config()")
    kwargs = ",\n        ".join(f"{k}={v!r}" for k, v in p.items())
    out.add("meshplan_torchtitan.py", f'''"""torchtitan (pytorch/torchtitan b5bcd76) config for the plan meshplan chose:
dp {plan.dp} x tp {plan.tp} x pp {plan.pp} on {cluster.name}, llama3 {flavor}. Written by
`meshplan plan --export torchtitan`; run with launch.sh (job_config.json is the same plan as
Trainer.Config.to_dict() writes it, which `meshplan simulate --from torchtitan` reads)."""
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.config import ParallelismConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC  # noqa: F401
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import {recipe}
from torchtitan.trainer import Trainer


def meshplan_plan() -> Trainer.Config:
    config = {recipe}()
    model_spec = model_registry({flavor!r})
    config.model_spec = model_spec
    config.loss = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(model_spec)))
    config.training.num_tokens_per_microbatch_per_dp_rank = {t["num_tokens_per_microbatch_per_dp_rank"]}
    config.training.num_tokens_per_train_step = {t["num_tokens_per_train_step"]}
    config.training.max_context_length = {t["max_context_length"]}
    config.training.mixed_precision_param = {t["mixed_precision_param"]!r}
    config.training.enable_cpu_offload = {t["enable_cpu_offload"]}
    config.parallelism = ParallelismConfig(
        {kwargs},
    )
    config.activation_checkpoint = {ac_line}
    config.compile.enable = False
    return config
''')
    nodes = max(1, plan.world_size // cluster.gpus_per_node)
    out.add("launch.sh", f"""#!/bin/bash
# torchtitan (b5bcd76) running meshplan_torchtitan.py beside this script, on each of the {nodes} node(s)
# (NODE_RANK 0..; MASTER_ADDR = node 0), from a torchtitan checkout.
PYTHONPATH="$(dirname "$0"):$PYTHONPATH" torchrun --nnodes {nodes} --nproc-per-node {min(plan.world_size, cluster.gpus_per_node)} \\
    --node-rank ${{NODE_RANK:-0}} --master-addr ${{MASTER_ADDR:-localhost}} --master-port ${{MASTER_PORT:-29500}} \\
    -m torchtitan.train --module meshplan_torchtitan --config meshplan_plan
""", executable=True)

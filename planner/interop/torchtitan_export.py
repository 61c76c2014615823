"""Export a plan to torchtitan (pytorch/torchtitan b5bcd76): its Trainer config as JSON
(job_config.json, what Trainer.Config.to_dict() writes, which `--from torchtitan` reads back),
a Python config module building the same Trainer.Config (meshplan_torchtitan.py) and a
torchrun launch script (launch.sh). The reading side is planner.interop.torchtitan."""
from __future__ import annotations

import json
import math

from cost_models.errors import MeshplanError
from planner.interop.base import ExportFolder, SplitError, uniform_mode
from planner.interop.torchtitan import (FLAVORS, FLOAT8_CONVERTER, RECIPES, SCHEDULES, flavor_of,
                                        split_stages)

FILES = ("job_config.json", "meshplan_torchtitan.py", "launch.sh")


def job_config(plan, flavor: str) -> dict:
    """The plan as Trainer.Config.to_dict() writes these sections."""
    mode = uniform_mode(plan.checkpoint)
    if mode not in ("none", "full", "selective"):
        raise MeshplanError("torchtitan recomputes every block the same way (none, full or selective); the plan's "
                            "per-layer recompute is not: pin --checkpoint")
    if plan.cp > 1 and plan.zero == 0:
        raise MeshplanError("torchtitan shards with FSDP over dp_shard x cp whenever cp > 1 "
                            "(distributed/parallel_dims.py): plan ZeRO 2 or 3")
    shard, replicate = (plan.dp, 1) if plan.zero else (1, plan.dp)
    par = dict(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard,
               context_parallel_degree=plan.cp,
               fsdp_reshard_after_forward="never" if plan.zero == 2 else "always",
               tensor_parallel_degree=plan.tp, enable_sequence_parallel=plan.sequence_parallel or plan.tp == 1,
               pipeline_parallel_degree=plan.pp)
    if plan.pp > 1:
        layers = FLAVORS[flavor]["layers"]
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
                    mixed_precision_param="float32" if plan.precision == "fp32" else "bfloat16",
                    enable_cpu_offload=plan.offload_optimizer)
    spec = {"name": "llama3", "flavor": flavor, **({"converters": [FLOAT8_CONVERTER]} if plan.precision == "fp8" else {})}
    return {"model_spec": spec, "training": training, "parallelism": par,
            "activation_checkpoint": ac, "compile": {"enable": plan.compile, "components": ["model"]}}


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


def _converters_line(plan) -> str:
    """model_registry's converters for an fp8 plan: torchtitan's float8 linears, the head left bf16."""
    if plan.precision != "fp8":
        return ""
    return (f", converters=[{FLOAT8_CONVERTER}.Config(recipe_name={plan.fp8_recipe!r}, filter_fqns=['lm_head'], "
            f"model_compile_enabled={plan.compile})]")


def write(plan, spec, cluster, out: ExportFolder) -> None:
    flavor = flavor_of(spec.config) if spec.config is not None else None
    if flavor is None:
        raise MeshplanError(f"torchtitan builds its models from named flavors; {spec.name} matches none of "
                            f"llama3's ({', '.join(FLAVORS)})")
    if plan.precision == "fp8" and plan.fp8_recipe != "rowwise":
        raise MeshplanError(f"torchtitan b5bcd76's Float8LinearConverter takes recipe_name rowwise only, not "
                            f"{plan.fp8_recipe}: plan with --fp8-recipe rowwise to export to torchtitan")
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
from torchtitan.components.quantization import Float8LinearConverter  # noqa: F401
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import {recipe}
from torchtitan.trainer import Trainer


def meshplan_plan() -> Trainer.Config:
    config = {recipe}()
    model_spec = model_registry({flavor!r}{_converters_line(plan)})
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
    config.compile.enable = {plan.compile}
    config.compile.components = ["model"]
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

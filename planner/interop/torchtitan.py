"""Import and export a torchtitan job (pytorch/torchtitan b5bcd76).

At that commit a run is configured by a Python function returning `Trainer.Config`
(torchtitan/config/README.md); TOML job files are no longer read. `--from torchtitan` reads
either form a user has of a run:

- its launch line, `torchrun ... -m torchtitan.train --module M --config C [--a.b v ...]`
  (or `MODULE=M CONFIG=C ./run_train.sh ...`), quoted or in a file. `--module/--config` name
  a function of torchtitan/models/M/config_registry.py (config/manager.py
  ConfigManager._load_config); meshplan cannot run it, so it looks the recipe up in
  planner/interop/data/torchtitan_recipes.json, which tools/make_torchtitan_recipes.py reads
  from the source of llama3, qwen3, deepseek_v3 and gpt_oss (config_registry.py and the
  flavors of models/M/__init__.py) and of tests/unit_tests/test_no_new_cli_options.py (every
  command-line option). Each `--a.b v` is then applied as tyro applies it (manager.py
  parse_args) to the recipe's sections, and what results goes through the mapping below;
- the JSON of that config a run writes (`debug.save_config_file` or `print_config`:
  `Trainer.Config.to_dict()`, torchtitan/trainer.py): the sections training, parallelism,
  activation_checkpoint, compile and model_spec, a key left out taking the dataclass default
  of torchtitan/config/configs.py.

The export writes the Python config module (run with `--module ... --config ...`), the same
JSON, and a torchrun launch script.

Mapping (sources in torchtitan/): batch from training.num_tokens_per_microbatch_per_dp_rank,
num_tokens_per_train_step and max_context_length (trainer.py); data_parallel_shard_degree
> 1 is FSDP2, ZeRO-3 unless `fsdp_reshard_after_forward` is "never" or "default" with
pipeline parallelism (distributed/fsdp.py get_fsdp_reshard_after_forward_policy), ZeRO-2
then; data_parallel_replicate_degree alone is DDP (ZeRO 0); context_parallel_degree is the
plan's cp, and with cp > 1 FSDP shards over dp_shard x cp (distributed/parallel_dims.py:
"we always assume that when cp is used, FSDP is also applied"), with the "headtail" load
balancer only (configs.py; the one meshplan prices); expert_parallel_degree is the
plan's ep (distributed/parallel_dims.py borrows it from dp_shard x cp); pipeline stages as
distributed/pipeline_parallel.py _generate_llm_fqn_per_model_part splits them;
activation_checkpoint null / FullAC / SelectiveAC (distributed/activation_checkpoint.py);
model_spec.flavor of llama3, qwen3, deepseek_v3 and gpt_oss (models/*/__init__.py); a
recipe's lone Float8LinearConverter (components/quantization/float8.py, recipe_name "rowwise"
by default) is precision fp8 rowwise, and the export writes one for an fp8 plan.
compile.enable with "model" in compile.components is the plan's compile (each block compiled,
distributed/compile.py apply_compile); a compiled loss is priced eager. Refused in one line,
as meshplan does not price them yet: MXFP8 / NVFP4 converters, float8 with other converters
(grouped experts, LoRA), multi-token prediction (deepseek_v3/mtp.py),
component overrides (config/override.py).
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from dataclasses import replace

from cost_models.errors import MeshplanError
from cost_models.inputs import parse_json, shown
from planner.interop.base import Imported, number, source_text, whole

OPEN = ()   # the config fixes every plan flag
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
              "parallelism": ("enable_fsdp_symm_mem", "module_fqns_per_model_part", "pipeline_parallel_schedule_csv")}
AC_BASE = {"preserve_rng_state", "determinism_check", "debug"}
SECTIONS = {"model_spec", "hf_assets_path", "dump_folder", "profiler", "metrics", "tokenizer", "dataloader",
            "optimizer", "lr_scheduler", "training", "parallelism", "checkpoint", "activation_checkpoint", "compile",
            "comm", "validator", "debug", "override", "loss"}
FLOAT8_CONVERTER = "Float8LinearConverter"   # components/quantization/float8.py
SCHEDULES = {"1F1B": "1f1b", "GPipe": "gpipe", "Interleaved1F1B": "interleaved"}
# The recipes, model flavors and command-line options of torchtitan b5bcd76, read from its
# source by tools/make_torchtitan_recipes.py (never typed by hand).
TABLE = json.loads((Path(__file__).parent / "data" / "torchtitan_recipes.json").read_text())
MODELS = TABLE["models"]               # {module: {flavor: ModelConfig fields (+ "differs")}}
FLAVORS = MODELS["llama3"]             # what the export writes: llama3's flavors only
RECIPES = {"debugmodel": "llama3_debugmodel", "70B": "llama3_70b", "405B": "llama3_405b"}   # else llama3_8b
# meshplan's presets that are a torchtitan flavor: the import names the model as meshplan does.
PRESET_OF = {("llama3", "8B"): "llama3-8b", ("llama3", "70B"): "llama3-70b", ("llama3", "405B"): "llama3-405b"}


def flavor_config(flavor: str, seq: int, module: str = "llama3"):
    """meshplan's ModelConfig of a torchtitan flavor (its preset where there is one)."""
    from planner.models import ModelConfig
    from planner.zoo import PRESETS
    fields = {k: v for k, v in MODELS[module][flavor].items() if k != "differs"}
    preset = PRESET_OF.get((module, flavor))
    config = PRESETS[preset] if preset else ModelConfig(**fields, max_seq=8192, name=f"torchtitan-{module}-{flavor}")
    return replace(config, max_seq=max(config.max_seq, seq))   # its RoPE runs to 131072 tokens


def flavor_of(config) -> str | None:
    for name in FLAVORS:
        known = flavor_config(name, config.max_seq)
        if replace(known, name=config.name, max_seq=config.max_seq) == config:
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
    """The job a torchtitan config JSON or launch line describes, on `world` GPUs."""
    text, where = source_text(source, "torchtitan config")
    if text.lstrip().startswith("{"):
        config = parse_json(text, where)
        if not isinstance(config, dict):
            raise MeshplanError(f"{where} must be a JSON object (Trainer.Config.to_dict())")
        notes = []
    else:
        config, notes = launch_config(text, where.replace("torchtitan config", "torchtitan launch line"))
    return from_config(config, world, model, where, notes)


def from_config(config: dict, world: int, model, where: str, notes: list) -> Imported:
    """The mapping both forms share: Trainer.Config.to_dict()'s sections onto a Plan."""
    unknown = sorted(map(str, set(config) - SECTIONS))
    if unknown:
        raise MeshplanError(f"{where}: unknown section(s) {unknown}; torchtitan's: {', '.join(sorted(SECTIONS))}")
    training = _section(config, "training", TRAINING, where)
    par = _section(config, "parallelism", PARALLELISM, where)
    compiled = config.get("compile") or {}
    # CompileConfig.components defaults to ["model", "loss"] (config/configs.py): "model" compiles
    # each block (the plan's compile); the loss alone (deepseek_v3's recipes) leaves the blocks eager.
    compiled_blocks = bool(compiled.get("enable")) and "model" in compiled.get("components", ["model", "loss"])
    if (config.get("override") or {}).get("imports"):
        raise MeshplanError(f"{where}: override.imports swaps torchtitan components for other kernels, which "
                            f"meshplan does not model: drop them")
    seq = whole(training["max_context_length"], f"{where}: training.max_context_length")
    spec = _model(config, model, seq, where)
    named = config.get("model_spec")
    if isinstance(named, dict) and "differs" in MODELS[named["name"]][named["flavor"]]:
        notes.append(f"{named['name']} {named['flavor']}: {MODELS[named['name']][named['flavor']]['differs']}")
    tp, pp, ep, cp = (whole(par[k], f"{where}: parallelism.{k}") for k in (
        "tensor_parallel_degree", "pipeline_parallel_degree", "expert_parallel_degree", "context_parallel_degree"))
    if cp > 1 and par["context_parallel_load_balancer"] != "headtail":
        raise MeshplanError(f"{where}: parallelism.context_parallel_load_balancer "
                            f"{json.dumps(par['context_parallel_load_balancer'])} is not modelled by meshplan: "
                            f"use \"headtail\"")
    replicate = whole(par["data_parallel_replicate_degree"], f"{where}: parallelism.data_parallel_replicate_degree")
    shard = par["data_parallel_shard_degree"]
    if shard == -1:                      # "leftover ranks" (configs.py)
        if world % (replicate * cp * tp * pp):
            raise MeshplanError(f"{where}: replicate x cp x tp x pp = {replicate * cp * tp * pp} does not divide "
                                f"{world} GPUs")
        shard = world // (replicate * cp * tp * pp)
    shard = whole(shard, f"{where}: parallelism.data_parallel_shard_degree")
    if replicate * shard * cp * tp * pp != world:
        raise MeshplanError(f"{where}: replicate x shard x cp x tp x pp = {replicate * shard * cp * tp * pp} but the "
                            f"cluster has {world} GPUs: make them agree")
    if replicate > 1 and shard * cp > 1:
        raise MeshplanError(f"{where}: HSDP (data_parallel_replicate_degree > 1 with data_parallel_shard_degree or "
                            f"context_parallel_degree > 1: FSDP over dp_shard x cp) is not modelled by meshplan: use one")
    dp = replicate * shard
    policy = par["fsdp_reshard_after_forward"]
    if policy not in ("default", "always", "never"):
        raise MeshplanError(f"{where}: parallelism.fsdp_reshard_after_forward takes default, always or never")
    zero = 0 if shard * cp == 1 else 2 if policy == "never" or (policy == "default" and pp > 1) else 3
    precision = {"bfloat16": "bf16", "float32": "fp32"}.get(training["mixed_precision_param"])
    if precision is None:
        raise MeshplanError(f"{where}: training.mixed_precision_param takes bfloat16 or float32")
    converters = (config.get("model_spec") or {}).get("converters", []) if isinstance(config.get("model_spec"),
                                                                                      dict) else []
    if converters and converters != [FLOAT8_CONVERTER]:
        raise MeshplanError(f"{where}: model_spec converters {converters} are not modelled by meshplan (it reads "
                            f"a lone {FLOAT8_CONVERTER})")
    if converters and precision != "bf16":
        raise MeshplanError(f"{where}: {FLOAT8_CONVERTER} with mixed_precision_param float32: meshplan prices "
                            f"float8 inside bf16 training")
    float8 = dict(fp8_recipe="rowwise") if converters else {}
    precision = "fp8" if converters else precision
    if ep > 1 and not spec.config.is_moe:
        raise MeshplanError(f"{where}: parallelism.expert_parallel_degree {ep} needs a Mixture-of-Experts model; "
                            f"{spec.name} has no experts: set it to 1")
    # torchtitan borrows the expert-parallel ranks from data_parallel_shard x cp
    # (distributed/parallel_dims.py), as Plan.ep splits groups of ep data-parallel ranks.
    fields = dict(dp=dp, cp=cp, tp=tp, pp=pp, ep=ep, zero=zero, precision=precision, seq=seq,
                  sequence_parallel=tp > 1 and bool(par["enable_sequence_parallel"]),
                  offload_optimizer=bool(training["enable_cpu_offload"]), compile=compiled_blocks, **float8)
    fields.update(_batch(training, par, dp, pp, seq, where))
    layers = spec.config.layers
    fields.update(_pipeline(par, layers, pp, where))
    fields["checkpoint"] = [_recompute(config, where)] * layers
    if fields["checkpoint"][0] == "none":
        fields["checkpoint"] = []
    pinned = ("tp", "pp", "cp", "ep", "zero", "micro_batch", "checkpoint", "schedule", "interleave", "sequence_parallel",
              "offload_optimizer", "precision", "fp8_recipe")
    return Imported("torchtitan", {}, fields, spec, notes, pinned)


# Launch lines: `torchrun ... -m torchtitan.train --module M --config C [--section.key value ...]`
# (torchtitan/config/manager.py ConfigManager: --module/--config pick a config_registry
# function; every other flag is a tyro override of that Trainer.Config, `--a.b v`, `--a.b=v`,
# hyphens or underscores, a bool as `--a.b` / `--a.no-b`). run_train.sh takes MODULE= and
# CONFIG= from the environment instead.
LAUNCHERS = ("torchtitan.train", "run_train.sh", "./run_train.sh")
CLI_OPTIONS = frozenset(TABLE["cli_options"])
COMPILE = {"enable": False, "enable_async_tensor_parallel": False, "components": ["model", "loss"],
           "backend": "inductor"}                                  # CompileConfig (config/configs.py)
# Options a run takes that change nothing meshplan prices (data, logging, checkpoint files,
# optimizer hyper-parameters, timeouts, seeds): read and left out, as the JSON form's sections are.
NO_COST = ("checkpoint.", "comm.", "dataloader.", "debug.", "hf_assets_path", "dump_folder", "loss.",
           "lr_scheduler.", "metrics.", "optimizer.", "profiler.", "tokenizer.", "validator.",
           "activation_checkpoint.preserve_rng_state", "activation_checkpoint.determinism_check",
           "activation_checkpoint.debug")
# model_registry(...) options that change which kernels run where meshplan prices the standard ones.
KERNEL_NOTES = {"moe_comm_backend": "its MoE all-to-all backend {v!r} is priced as the standard all-to-all",
                "tp_gemm_backend": "its tensor-parallel GEMM backend {v!r} (async TP) is priced as plain TP"}


def launch_config(text: str, where: str) -> tuple[dict, list]:
    """(Trainer.Config.to_dict()'s sections, notes) of a torchtitan launch line."""
    try:
        tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise MeshplanError(f"{where}: cannot split the launch line ({exc}): check its quotes") from None
    env = {}
    start = None
    for i, token in enumerate(tokens):
        if start is None and "=" in token and not token.startswith("-") and token.split("=")[0].isidentifier():
            key, value = token.split("=", 1)
            env[key] = value                               # MODULE=llama3 CONFIG=... ./run_train.sh
        if token in LAUNCHERS or token.endswith("/run_train.sh"):
            start = i + 1
            break
    if start is None:
        first = [i for i, t in enumerate(tokens) if t.split("=")[0] in ("--module", "--config")]
        if not first:
            raise MeshplanError(f"{where}: no --module and --config (torchtitan's launch line: torchrun ... -m "
                                f"torchtitan.train --module llama3 --config llama3_8b)")
        start = first[0]
    module, name = env.get("MODULE"), env.get("CONFIG")
    overrides = []
    args = tokens[start:]
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise MeshplanError(f"{where}: {token!r} is no torchtitan option (each is --section.key value)")
        key, eq, value = token[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        elif not eq:
            value = None                                   # a bool flag
        i += 1
        if key in ("module", "config"):
            if not value:
                raise MeshplanError(f"{where}: --{key} needs a value")
            module, name = (value, name) if key == "module" else (module, value)
            continue
        overrides.append((key, value))
    if not module or not name:
        raise MeshplanError(f"{where}: give both --module and --config (e.g. --module llama3 --config llama3_8b)")
    config, notes = recipe_config(module, name, where)
    for key, value in overrides:
        _override(config, key, value, where)
    return config, notes


def recipe_config(module: str, name: str, where: str) -> tuple[dict, list]:
    """The sections a config_registry recipe sets, with Trainer.Config's defaults under them."""
    recipes = TABLE["recipes"]
    if module.startswith("torchtitan.models."):                # the fully qualified form
        module = module.removeprefix("torchtitan.models.").removesuffix(".config_registry")
    if module not in recipes:
        raise MeshplanError(f"{where}: --module {module} is not one meshplan reads; it reads "
                            f"{', '.join(recipes)} (torchtitan b5bcd76)")
    recipe = recipes[module].get(name)
    if recipe is None:
        raise MeshplanError(f"{where}: --config {name} is not a {module} recipe of torchtitan b5bcd76; known: "
                            f"{', '.join(recipes[module])}")
    if recipe["unreadable"]:
        raise MeshplanError(f"{where}: recipe {name} does what meshplan does not model ({recipe['unreadable'][0]})")
    model = recipe["model"]
    float8 = model["converters"] == [FLOAT8_CONVERTER]   # precision fp8 rowwise (from_config)
    quantized = [c for c in model["converters"] if c.startswith(("Float8", "MXFP8", "NVFP4"))]
    if quantized and not float8:
        raise MeshplanError(f"{where}: recipe {name} trains with {', '.join(model['converters'])}; meshplan prices "
                            f"a lone {FLOAT8_CONVERTER} (precision fp8) only: use a bf16 or float8 recipe")
    if model["converters"] and not float8:
        raise MeshplanError(f"{where}: recipe {name}'s {model['converters'][0]} is not modelled by meshplan")
    if model["options"].get("num_mtp_layers"):
        raise MeshplanError(f"{where}: recipe {name}'s multi-token-prediction layers are not modelled by meshplan")
    notes = [KERNEL_NOTES[k].format(v=v) for k, v in model["options"].items()
             if k in KERNEL_NOTES and v not in ("standard", "default")]
    notes += [f"{FLOAT8_CONVERTER}: recipe_name rowwise (its default) is assumed"] if float8 else []
    return _recipe_sections(module, recipe, model, model["converters"]), notes


def _recipe_sections(module: str, recipe: dict, model: dict, converters: list) -> dict:
    """The sections of a config_registry recipe, Trainer.Config's defaults under them."""
    ac = {None: None, "full": {}, "selective": {"force_recompute_mm_shapes_by_fqns": ["moe.router.gate"]}}
    spec = {"name": module, "flavor": model["flavor"], **({"converters": converters} if converters else {})}
    return {"model_spec": spec,
              "training": dict(recipe["training"]), "parallelism": dict(recipe["parallelism"]),
            "activation_checkpoint": ac[recipe["activation_checkpoint"]],
            "compile": {**COMPILE, **recipe["compile"]}}


def _override(config: dict, key: str, value, where: str) -> None:
    """One `--section.key value` applied as tyro would, or one line saying why not."""
    key = key.replace("-", "_")
    section, _, leaf = key.rpartition(".")
    negated = leaf.startswith("no_") and f"{section}.{leaf[3:]}" in CLI_OPTIONS and key not in CLI_OPTIONS
    if negated:
        key, leaf = f"{section}.{leaf[3:]}", leaf[3:]
    if key not in CLI_OPTIONS:
        raise MeshplanError(f"{where}: --{key} is not a torchtitan b5bcd76 command-line option")
    if key.startswith(NO_COST):
        return
    defaults = {"training": TRAINING, "parallelism": PARALLELISM, "compile": COMPILE}.get(section)
    if defaults is None or leaf not in defaults:
        raise MeshplanError(f"{where}: --{key} is not mapped by meshplan's import: set it in the recipe and "
                            f"import its JSON dump (debug.save_config_file) instead")
    default = defaults[leaf]
    flag = f"--{key}"
    if isinstance(default, bool):
        if value is None:
            parsed = not negated
        elif str(value).lower() in ("true", "false") and not negated:
            parsed = str(value).lower() == "true"
        else:
            raise MeshplanError(f"{where}: {flag} is a switch (--{key} or --{section}.no-{leaf}), got {value!r}")
    elif value is None:
        raise MeshplanError(f"{where}: {flag} needs a value")
    elif isinstance(default, list):
        parsed = [v for v in value.split(",") if v]
    elif isinstance(default, float):
        parsed = number(value, flag)
    elif isinstance(default, int) or leaf == "pipeline_parallel_layers_per_stage":
        parsed = whole(value, flag, low=-1)
    else:
        parsed = value
    target = config.setdefault(section, {})
    if target is None:
        target = config[section] = {}
    target[leaf] = parsed


def _model(config: dict, model, seq: int, where: str):
    from planner.zoo import ModelSpec
    spec = config.get("model_spec")
    if spec is None:
        if model is None:
            raise MeshplanError(f"{where} has no model_spec: give --model")
        if model.config is None:
            raise MeshplanError("torchtitan trains its own model definitions: give a preset or JSON model")
        return model
    name = spec.get("name") if isinstance(spec, dict) else spec
    flavor = spec.get("flavor") if isinstance(spec, dict) else None
    if name not in MODELS or flavor not in MODELS[name]:
        known = "; ".join(f"{m}: {', '.join(MODELS[m])}" for m in MODELS)
        raise MeshplanError(f"{where}: model_spec {name} {flavor} is not one meshplan knows ({known}); drop "
                            f"model_spec and give --model")
    if model is not None:
        raise MeshplanError(f"{where} names the model ({name} {flavor}): drop --model")
    quantized = [k for k in ("float8", "mxfp8", "nvfp4") if k in json.dumps(spec.get("model", {})).lower()]
    if quantized:
        raise MeshplanError(f"{where}: the model's {quantized[0]} linears are not modelled by meshplan")
    config = flavor_config(flavor, seq, name)
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

"""Import and export a DeepSpeed job's ds_config.json (deepspeedai/DeepSpeed edaa722):
the batch triple, ZeRO, optimizer offload, precision, the PipelineEngine's section and
AutoTP's tensor_parallel, read as deepspeed/runtime/config.py, zero/config.py,
zero/offload_config.py, precision_config.py and activation_checkpointing/config.py read
them. A ds_config holds no model (`--model` names it); the degrees it cannot hold come from
`--tp` / `--pp`, or from `pipeline.stages` and `tensor_parallel.autotp_size` when set.
A key DeepSpeed does not have, or one whose setting meshplan does not model, is named in
one line (DeepSpeed itself ignores unknown top-level keys: a typo there changes nothing).
"""
from __future__ import annotations

import json

from cost_models.errors import MeshplanError
from cost_models.inputs import parse_json, shown
from planner.interop.base import ExportFolder, Imported, SplitError, data_parallel, source_text, uniform_mode, whole

OPEN = ("tp", "pp", "checkpoint", "seq")   # plan flags that may stand beside --from deepspeed
FILES = ("ds_config.json", "README.txt")
DEFAULT_SEQ = 2048   # planner.cli.flags.DEFAULT_SEQ: a ds_config holds no sequence length
# Top-level keys that change nothing meshplan prices (deepspeed/runtime/constants.py and the
# monitor, profiler, comms and checkpoint configs).
NEUTRAL = {"optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown", "dump_state", "gradient_clipping",
           "prescale_gradients", "gradient_predivide_factor", "memory_breakdown", "tensorboard", "wandb",
           "csv_monitor", "comet", "flops_profiler", "checkpoint", "dataloader_drop_last", "log_level",
           "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "timers", "comms_logger", "aio",
           "nebula", "data_parallel_group", "global_rank", "seq_parallel_communication_data_type",
           "managed_gradient_accumulation", "gradient_allreduce_op", "use_data_before_expert_parallelism"}
# Top-level sections meshplan does not model: accepted only switched off (or absent).
OFF = {"amp", "torch_autocast", "eigenvalue", "progressive_layer_drop", "data_efficiency", "curriculum_learning",
       "hybrid_engine", "compression_training", "sparse_attention", "compile", "elasticity", "autotuning",
       "weight_quantization", "sparse_gradients", "disable_allgather", "communication_data_type", "data_types",
       "expert_parallel"}
MAPPED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization",
          "fp16", "bf16", "bfloat16", "pipeline", "activation_checkpointing", "tensor_parallel"}
# DeepSpeedZeroConfig's fields and aliases (deepspeed/runtime/zero/config.py), by what they do here.
ZERO_NEUTRAL = {"contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
                "allgather_partitions", "allgather_bucket_size", "load_from_fp32_weights", "elastic_checkpoint",
                "sub_group_size", "cpu_offload_use_pin_memory", "prefetch_bucket_size", "stage3_prefetch_bucket_size",
                "param_persistence_threshold", "stage3_param_persistence_threshold", "model_persistence_threshold",
                "stage3_model_persistence_threshold", "max_live_parameters", "stage3_max_live_parameters",
                "max_reuse_distance", "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save",
                "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
                "module_granularity_threshold", "stage3_module_granularity_threshold",
                "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params", "allgather_sequential",
                "stage3_allgather_sequential", "ignore_unused_parameters", "round_robin_gradients",
                "mics_hierarchical_params_gather", "memory_efficient_linear", "pipeline_loading_checkpoint",
                "override_module_apply", "log_trace_cache_warnings", "enable_sanity_checks",
                "save_muon_momentum_buffer_in_memory", "leaf_module"}
ZERO_AT_DEFAULT = {"legacy_stage1": False, "zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                   "zero_quantized_nontrainable_weights": False, "zero_quantized_gradients": False,
                   "zeropp_loco_param": None, "mics_shard_size": -1, "zenflow": None, "cpu_offload_param": None,
                   "offload_param": None}
ZERO_MAPPED = {"stage", "overlap_comm", "offload_optimizer", "cpu_offload"}
OFFLOAD_NEUTRAL = {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                   "fast_init", "cpuadam_cores_perc", "ratio", "super_offload", "pipeline"}
PRECISION_KEYS = {"fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                           "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
                  "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                           "bf16_optimizer_states", "check_overflow", "ddp_bf16"}}
PIPELINE_KEYS = {"stages", "partition", "seed_layers", "activation_checkpoint_interval", "pipe_partitioned",
                 "grad_partitioned", "use_reentrant"}
CHECKPOINTING_KEYS = {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                      "number_checkpoints", "synchronize_checkpoint_boundary", "profile"}


def _section(config: dict, key: str, where: str) -> dict:
    value = config.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MeshplanError(f"{where}: {key} must be a JSON object, got {shown(value)}")
    return value


def _unknown(section: dict, known: set, where: str, name: str) -> None:
    unknown = sorted(map(str, set(section) - known))
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown} in {name} (not DeepSpeed's); allowed: "
                            f"{', '.join(sorted(known))}")


def _switched_off(value) -> bool:
    if isinstance(value, dict):
        return not value.get("enabled", False) and not value.get("deepcompile", False) and (
            "enabled" in value or "deepcompile" in value or not value)
    return value in (None, False, {}, [])


def read(source: str, world: int, model=None, flags: dict | None = None) -> Imported:
    """The job a ds_config.json runs with `model` on `world` GPUs (`flags`: --tp, --pp, --checkpoint)."""
    text, where = source_text(source, "DeepSpeed config")
    config = parse_json(text, where)
    if not isinstance(config, dict):
        raise MeshplanError(f"{where} must be a JSON object")
    if model is None:
        raise MeshplanError("--from deepspeed needs --model: a ds_config.json holds no model")
    if model.config is None and flags and flags.get("checkpoint") not in (None, "none"):
        raise MeshplanError("--checkpoint needs a preset or JSON model (one entry per block)")
    flags = dict(flags or {})
    unknown = sorted(map(str, set(config) - MAPPED - NEUTRAL - OFF))
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown} (not DeepSpeed's, or not modelled by meshplan)")
    on = sorted(k for k in OFF & set(config) if not _switched_off(config[k]))
    if on:
        raise MeshplanError(f"{where}: {', '.join(on)} changes the job in a way meshplan does not model: "
                            f"switch it off (or drop it) to simulate without it")
    notes = []
    tp, pp = _degrees(config, flags, where)
    zero, overlap, offload = _zero(config, where)
    fields = dict(tp=tp, pp=pp, zero=zero, precision=_precision(config, where), offload_optimizer=offload,
                  schedule="1f1b", interleave=1, seq=flags.get("seq") or DEFAULT_SEQ)
    fields["dp"] = data_parallel(world, tp * pp, f"{where}: tp x pp")
    fields["micro_batch"], fields["global_batch"] = _batch(config, fields["dp"], where)
    layers = model.config.layers if model.config is not None else None
    fields["checkpoint"] = _recompute(config, flags, layers, pp, where, notes)
    options = {}
    if overlap is not None and overlap != (zero == 3):    # DeepSpeed's default: on for stage 3 only
        options["overlap_comm"] = overlap
    pinned = tuple(k for k in ("zero", "precision", "offload_optimizer", "micro_batch", "schedule", "interleave")) \
        + tuple(k for k in ("tp", "pp") if k in flags or _config_sets(config, k)) \
        + (("checkpoint",) if fields["checkpoint"] or "checkpoint" in flags else ())
    return Imported("deepspeed", options, fields, model, notes, pinned)


def _config_sets(config: dict, degree: str) -> bool:
    if degree == "tp":
        return "autotp_size" in (config.get("tensor_parallel") or {})
    return isinstance((config.get("pipeline") or {}).get("stages"), int)


def _degrees(config: dict, flags: dict, where: str) -> tuple:
    tp_section = _section(config, "tensor_parallel", where)
    _unknown(tp_section, {"autotp_size"}, where, "tensor_parallel (meshplan reads AutoTP's autotp_size)")
    pipe = _section(config, "pipeline", where)
    out = []
    for name, given in (("tp", tp_section.get("autotp_size")), ("pp", pipe.get("stages", "auto"))):
        flag = flags.get(name)
        if given in (None, "auto", 0):
            out.append(flag if flag is not None else 1)
            continue
        given = whole(given, f"{where}: {'tensor_parallel.autotp_size' if name == 'tp' else 'pipeline.stages'}")
        if flag is not None and flag != given:
            raise MeshplanError(f"--{name} {flag} contradicts the config's {given}: drop --{name}")
        out.append(given)
    return tuple(out)


def _zero(config: dict, where: str) -> tuple:
    zero = config.get("zero_optimization", {})
    if isinstance(zero, bool):       # the deprecated form (zero/config.py read_zero_config_deprecated)
        zero = {"stage": 1 if zero else 0}
    if not isinstance(zero, dict):
        raise MeshplanError(f"{where}: zero_optimization must be a JSON object, got {shown(zero)}")
    _unknown(zero, ZERO_NEUTRAL | set(ZERO_AT_DEFAULT) | ZERO_MAPPED, where, "zero_optimization")
    for key, default in ZERO_AT_DEFAULT.items():
        value = zero.get(key, default)
        if key in ("offload_param",) and isinstance(value, dict) and value.get("device", "none") == "none":
            continue
        if value != default:
            raise MeshplanError(f"{where}: zero_optimization.{key} {json.dumps(value)} is not modelled by meshplan: "
                                f"drop it")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise MeshplanError(f"{where}: zero_optimization.stage takes 0, 1, 2 or 3, got {shown(stage)}")
    overlap = zero.get("overlap_comm")
    if overlap is not None and not isinstance(overlap, bool):
        raise MeshplanError(f"{where}: zero_optimization.overlap_comm takes true or false, got {shown(overlap)}")
    offload = zero.get("offload_optimizer") or {}
    if zero.get("cpu_offload"):                 # deprecated: = offload_optimizer.device cpu
        offload = {"device": "cpu", **offload}
    if not isinstance(offload, dict):
        raise MeshplanError(f"{where}: zero_optimization.offload_optimizer must be a JSON object")
    _unknown(offload, OFFLOAD_NEUTRAL, where, "zero_optimization.offload_optimizer")
    device = offload.get("device", "none")
    if device not in ("none", "cpu", None):
        raise MeshplanError(f"{where}: offload_optimizer.device {shown(device)}: meshplan models cpu offload only")
    if device == "cpu" and (offload.get("ratio", 1.0) != 1.0 or offload.get("super_offload")):
        raise MeshplanError(f"{where}: a partial (ratio) or super offload is not modelled: offload the whole "
                            f"optimizer")
    if device == "cpu" and stage < 2:
        raise MeshplanError(f"{where}: meshplan models ZeRO-Offload with stage 2 or 3, not {stage}")
    return stage, overlap, device == "cpu"


def _precision(config: dict, where: str) -> str:
    enabled = []
    for key, name in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        section = _section(config, key, where)
        _unknown(section, PRECISION_KEYS[name], where, key)
        for switch in ("auto_cast", "fp16_master_weights_and_grads", "bf16_master_weights_and_grads",
                       "bf16_optimizer_states"):
            if section.get(switch):
                raise MeshplanError(f"{where}: {key}.{switch} is not modelled by meshplan: drop it")
        if section.get("enabled"):
            enabled.append(name)
    if len(enabled) > 1:
        raise MeshplanError(f"{where}: fp16 and bf16 are both enabled (DeepSpeed refuses that): enable one")
    return enabled[0] if enabled else "fp32"


def _batch(config: dict, dp: int, where: str) -> tuple:
    """(micro_batch, global_batch) as DeepSpeedConfig._set_batch_related_parameters derives them
    from train_batch_size = micro x accumulation x dp (deepspeed/runtime/config.py)."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    train, micro, accum = (None if config.get(k) in (None, "auto") else whole(config[k], f"{where}: {k}")
                           for k in names)
    if train is None and micro is None:
        raise MeshplanError(f"{where}: give train_batch_size or train_micro_batch_size_per_gpu (DeepSpeed needs one)")
    if train is not None and micro is not None and accum is None:
        accum = train // micro // dp
    elif train is not None and micro is None:
        accum = accum or 1
        micro = train // dp // accum
    elif train is None:
        accum = accum or 1
        train = micro * accum * dp
    if micro < 1 or accum < 1 or train != micro * accum * dp:
        raise MeshplanError(f"{where}: train_batch_size {train} is not train_micro_batch_size_per_gpu x "
                            f"gradient_accumulation_steps x data parallel = {micro} x {accum} x {dp}: fix the batch")
    return micro, train


def _recompute(config: dict, flags: dict, layers, pp: int, where: str, notes: list) -> list:
    pipe = _section(config, "pipeline", where)
    _unknown(pipe, PIPELINE_KEYS, where, "pipeline")
    for key in ("pipe_partitioned", "grad_partitioned", "use_reentrant"):
        if pipe.get(key, True) is not True:
            raise MeshplanError(f"{where}: pipeline.{key} false is not modelled by meshplan: drop it")
    if pipe.get("partition", "uniform") != "uniform" and pp > 1:
        notes.append(f"DeepSpeed's partition {pipe['partition']!r} is not modelled: meshplan splits the blocks "
                     f"evenly, as partition 'uniform' does")
    checkpointing = _section(config, "activation_checkpointing", where)
    _unknown(checkpointing, CHECKPOINTING_KEYS, where, "activation_checkpointing")
    for key in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization"):
        if checkpointing.get(key):
            raise MeshplanError(f"{where}: activation_checkpointing.{key} is not modelled by meshplan: drop it")
    interval = pipe.get("activation_checkpoint_interval", 0)
    interval = whole(interval, f"{where}: pipeline.activation_checkpoint_interval", low=0)
    if interval > 1:
        raise MeshplanError(f"{where}: pipeline.activation_checkpoint_interval {interval} keeps one input per "
                            f"{interval} layers; meshplan recomputes layer by layer: use 1")
    mode = flags.get("checkpoint")
    if interval == 1:
        if mode not in (None, "full"):
            raise MeshplanError(f"--checkpoint {mode} contradicts pipeline.activation_checkpoint_interval 1 "
                                f"(full recompute of every layer)")
        mode = "full"
    if mode in (None, "none"):
        return []
    if layers is None:
        raise MeshplanError("recompute needs a preset or JSON model (one entry per block)")
    return [mode] * layers


def write(plan, spec, cluster, out: ExportFolder) -> None:
    """ds_config.json for the plan, and a README line for what DeepSpeed takes from code."""
    mode = uniform_mode(plan.checkpoint)
    if mode not in ("none", "full"):
        raise MeshplanError("DeepSpeed recomputes every layer or none (activation_checkpoint_interval 1 or 0); the "
                            "plan's per-layer recompute is neither: pin --checkpoint full or none")
    config = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
              "gradient_accumulation_steps": plan.grad_accum}
    zero = {"stage": plan.zero}
    if "overlap_comm" in plan.engine_options:
        zero["overlap_comm"] = plan.engine_options["overlap_comm"]
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config["zero_optimization"] = zero
    if plan.precision != "fp32":
        config[plan.precision] = {"enabled": True}
    if plan.tp > 1:
        config["tensor_parallel"] = {"autotp_size": plan.tp}
    if plan.pp > 1 or mode == "full":
        layers = len(plan.checkpoint) if plan.checkpoint else None
        if plan.stages and layers and plan.stages != _uniform(layers, plan.pp):
            raise SplitError("DeepSpeed's partition 'uniform' splits the blocks evenly; the plan's stages do not")
        config["pipeline"] = {"stages": plan.pp, "partition": "uniform",
                              "activation_checkpoint_interval": 1 if mode == "full" else 0}
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    out.add("ds_config.json", json.dumps(config, indent=2) + "\n")
    nodes = max(1, plan.world_size // cluster.gpus_per_node)
    out.add("README.txt", f"""DeepSpeed (deepspeedai/DeepSpeed edaa722) running the plan meshplan chose:
dp {plan.dp} x tp {plan.tp} x pp {plan.pp} on {cluster.name} ({spec.name}), written by `meshplan plan --export deepspeed`.
ds_config.json holds the batch, ZeRO stage {plan.zero}, precision and, with pp > 1 or recompute, the pipeline section.
What DeepSpeed takes from the training script, not the config:
- pipeline parallelism: build the model as deepspeed.pipe.PipelineModule(layers, num_stages={plan.pp},
  partition_method="uniform"){' (pipeline.activation_checkpoint_interval 1 recomputes each layer)' if mode == 'full' else ''};
- tensor parallelism {plan.tp}: AutoTP reads tensor_parallel.autotp_size (or pass your Megatron mpu);
- launch: deepspeed --num_nodes {nodes} --num_gpus {min(plan.world_size, cluster.gpus_per_node)} train.py --deepspeed_config ds_config.json
""")


def _uniform(layers: int, pp: int) -> list:
    from planner.plan import even_stages
    return even_stages(layers, pp)

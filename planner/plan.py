"""The Plan: how one training step is spread over a cluster.

It is the contract between the planner (which writes it), the simulator (which
prices it) and the runtime (which executes it). All validation lives in
`Plan.__post_init__` (self-consistency) and `Plan.check_fits` (against a model and a
cluster); every message says what to change.

Rank layout: `rank_order` lists the mesh dimensions from outermost to innermost.
The default ("pp", "dp", "tp") puts tensor-parallel ranks on consecutive GPUs (inside
a node), data-parallel next, pipeline stages outermost - Megatron-LM's layout, which
both the simulator and the runtime's DeviceMesh follow.

This module is also the plan vocabulary every other module reads: PRECISIONS and their
torch dtypes, SCHEDULES, CHECKPOINT_MODES / RECOMPUTE_MODES, CASTS, FP8_RECIPES and the PINNABLE
fields.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from cost_models.errors import MeshplanError
from cost_models.hardware import TORCH_DTYPE_NAMES
from cost_models.inputs import (MAX_GLOBAL_BATCH, MAX_GPUS, MAX_LAYERS, MAX_MICRO_BATCHES, MAX_SEQ,
                                check_output_path, check_tokens_per_step, parse_json, read_text, shown,
                                whole_number)
from planner.engines import DEFAULT_ENGINE, get_engine

SCHEMA_VERSION = 1
# "fp8" is bf16 mixed precision whose linear layers' GEMMs run in float8 (torchao's float8
# training, as torchtitan and Megatron-LM's --fp8 run it): everything else computes in bf16.
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
# precision -> the torch dtype it trains in (one map, cost_models.hardware.TORCH_DTYPE_NAMES)
PRECISION_DTYPES = {p: getattr(torch, TORCH_DTYPE_NAMES["bf16" if p == "fp8" else p]) for p in PRECISIONS}
# How float8 GEMMs scale their inputs (torchao.float8.Float8LinearConfig.from_recipe_name):
# "tensorwise" one scale per tensor (FSDP2 can all-gather the weights in float8), "rowwise"
# one per row (more accurate, slower casts).
FP8_RECIPES = ("tensorwise", "rowwise")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
# Activation recomputation per block:
#   "attention"  Korthikanti et al. 2022's selective recomputation as Megatron-LM runs it:
#                only the attention core (QK^T, softmax, dropout, x V or the fused kernel)
#                reruns in backward; everything else is kept (planner.arch.layers.attention_core);
#   "selective"  op-level selective checkpointing as torchtitan's SelectiveAC runs it: the fused
#                attention kernels' outputs and every other linear layer's are kept, all else
#                reruns (planner.arch.layers.every_other_product_policy);
#   "full"       the block's forward reruns (only its input is kept).
CHECKPOINT_MODES = ("none", "attention", "selective", "full")
RECOMPUTE_MODES = tuple(m for m in CHECKPOINT_MODES if m != "none")
# How a low precision is applied: "autocast" keeps fp32 parameters and casts per op (each
# forward casts every weight); "params" holds the parameters themselves in the low precision
# (FSDP2's MixedPrecisionPolicy, Megatron-LM/DeepSpeed fp16 with fp32 master weights in the
# optimizer): no per-op casts, and norms and the residual stream run in the low precision.
CASTS = ("autocast", "params")
TP_STYLES = ("colwise", "rowwise", "replicate", "vocab", "sequence")
# cp sits just outside tp, as in torchtitan's mesh (pp, dp, cp, tp) and Megatron-LM's "tp-cp-ep-dp-pp"
MESH_DIMS = ("pp", "dp", "cp", "tp")
# The plan fields `planner.search.plan` (and `meshplan plan`'s flags) can fix; the search fills in the rest.
PINNABLE = ("dp", "tp", "pp", "cp", "ep", "zero", "micro_batch", "checkpoint", "schedule", "interleave",
            "sequence_parallel", "offload_optimizer", "precision", "fp8_recipe", "compile")


# The most each whole-number field may be (cost_models.inputs: what can exist).
_NUMBER_BOUNDS = {"dp": MAX_GPUS, "tp": MAX_GPUS, "pp": MAX_GPUS, "cp": MAX_GPUS, "ep": MAX_GPUS,
                  "micro_batch": MAX_GLOBAL_BATCH,
                  "global_batch": MAX_GLOBAL_BATCH, "seq": MAX_SEQ, "interleave": MAX_LAYERS}


def compute_precision(precision: str) -> str:
    """The precision everything but float8 GEMMs computes and stores in: bf16 for "fp8"."""
    return "bf16" if precision == "fp8" else precision


def low_precision_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit dtype a precision computes in (autocast's dtype), None for fp32."""
    return None if precision == "fp32" else PRECISION_DTYPES[precision]


@dataclass
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    global_batch: int = 1
    seq: int = 1024
    precision: str = "bf16"
    schedule: str = "1f1b"
    interleave: int = 1
    sequence_parallel: bool = False
    stages: list = field(default_factory=list)       # [[first_layer, end_layer), ...] per virtual stage
    checkpoint: list = field(default_factory=list)   # per block: one of CHECKPOINT_MODES; [] = none
    tp_layout: dict = field(default_factory=dict)    # module path -> colwise|rowwise|replicate|vocab|sequence
    offload_optimizer: bool = False
    rank_order: list = field(default_factory=lambda: list(MESH_DIMS))
    engine: str = DEFAULT_ENGINE      # the training engine that runs the plan (planner.engines)
    engine_options: dict = field(default_factory=dict)   # its options that change cost (non-defaults)
    ep: int = 1          # expert parallelism (MoE): each group of ep data-parallel ranks splits the experts
    cp: int = 1          # context parallelism: each sequence is split over cp ranks (load-balanced causal chunks)
    fp8_recipe: str = "tensorwise"   # with precision fp8: how its GEMM inputs are scaled (FP8_RECIPES)
    compile: bool = False            # torch.compile each block (as torchtitan compiles per block)
    model: str | None = None      # what the plan was made for (informational defaults for the CLI)
    cluster: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __new__(cls, *args, **kwargs):
        """Refuse unknown fields in one line (a dataclass raises a bare TypeError)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(kwargs) - set(names)))
        if unknown:
            raise MeshplanError(f"plan: unknown field(s) {unknown}; allowed: {sorted(names)}")
        if len(args) > len(names):
            raise MeshplanError(f"plan takes at most {len(names)} fields ({', '.join(names)}), got {len(args)}")
        return super().__new__(cls)

    def __post_init__(self):
        self.check()

    def check(self):
        """Every self-consistency rule; run again by simulate() and validate, since a Plan's
        fields can be changed after it was made."""
        self._check_numbers()
        self._check_choices()
        self._check_pipeline()
        self._check_tensor_parallel()
        self._check_memory_options()
        self._check_expert_parallel()
        self._check_context_parallel()

    # -- derived quantities -------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def local_seq(self) -> int:
        """Tokens of each sequence one context-parallel rank holds (seq / cp)."""
        return self.seq // self.cp

    @property
    def edp(self) -> int:
        """Data-parallel ranks holding the same experts (dp / ep): what ZeRO shards the routed
        experts' states over and their gradients are reduced across (1: none)."""
        return self.dp // self.ep

    @property
    def grad_accum(self) -> int:
        """Micro-batches per data-parallel rank per step (= pipeline micro-batches)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def cast(self) -> str:
        """How the runtime applies a low precision (CASTS): "params" under
        ZeRO 1-3, where FSDP2's MixedPrecisionPolicy gathers the parameters in it; else
        "autocast" (fp32 parameters, each op casts)."""
        return "params" if self.zero >= 1 and self.precision != "fp32" else "autocast"

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.interleave

    def checkpoint_for(self, layer: int) -> str:
        return self.checkpoint[layer] if self.checkpoint else "none"

    # -- self-consistency ---------------------------------------------------
    def _check_numbers(self):
        for name, high in _NUMBER_BOUNDS.items():
            whole_number(getattr(self, name), f"plan {name}", high=high)
        if isinstance(self.zero, bool) or not isinstance(self.zero, int) or self.zero not in (0, 1, 2, 3):
            raise MeshplanError(f"plan zero must be 0, 1, 2 or 3, got {shown(self.zero)}")
        check_tokens_per_step(self.global_batch, self.seq)
        if self.world_size > MAX_GPUS:
            raise MeshplanError(f"plan dp x cp x tp x pp = {self.world_size:,} GPUs; meshplan plans at most {MAX_GPUS:,}")
        for name in ("model", "cluster"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise MeshplanError(f"plan {name} must be text or null, got {shown(getattr(self, name))}")
        if self.global_batch % (self.micro_batch * self.dp):
            raise MeshplanError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch x dp = "
                f"{self.micro_batch} x {self.dp}: change global_batch, micro_batch or dp")
        if self.grad_accum > MAX_MICRO_BATCHES:
            raise MeshplanError(
                f"global_batch {self.global_batch} over micro_batch x dp = {self.micro_batch} x {self.dp} is "
                f"{self.grad_accum:,} micro-batches per step; meshplan runs at most {MAX_MICRO_BATCHES:,}: "
                f"raise micro_batch or dp")
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise MeshplanError(f"plan schema_version {shown(self.schema_version)} is not supported "
                                f"(this meshplan reads version {SCHEMA_VERSION}); re-create the plan")

    def _check_choices(self):
        for name, kind in (("stages", list), ("checkpoint", list), ("tp_layout", dict), ("rank_order", list)):
            if not isinstance(getattr(self, name), kind):
                raise MeshplanError(f"plan {name} must be a {'JSON object' if kind is dict else 'list'}, "
                                    f"got {shown(getattr(self, name))}")
        for name, allowed in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("fp8_recipe", FP8_RECIPES)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise MeshplanError(f"plan {name} {shown(getattr(self, name))} is unknown; "
                                    f"use one of {', '.join(allowed)}")
        bad = sorted({shown(c) for c in self.checkpoint if not isinstance(c, str) or c not in CHECKPOINT_MODES})
        if bad:
            raise MeshplanError(f"plan checkpoint has {', '.join(bad)}; each layer takes one of "
                               f"{', '.join(CHECKPOINT_MODES)}")
        if "cp" not in self.rank_order and sorted(map(str, self.rank_order)) == sorted(set(MESH_DIMS) - {"cp"}):
            # plans written before context parallelism: cp sits just outside tp
            at = self.rank_order.index("tp")
            self.rank_order = [*self.rank_order[:at], "cp", *self.rank_order[at:]]
        if sorted(map(str, self.rank_order)) != sorted(MESH_DIMS):
            raise MeshplanError(f"plan rank_order {self.rank_order!r} must order exactly {list(MESH_DIMS)}")
        for flag in ("sequence_parallel", "offload_optimizer", "compile"):
            if not isinstance(getattr(self, flag), bool):
                raise MeshplanError(f"plan {flag} must be true or false, got {shown(getattr(self, flag))}")
        if self.fp8_recipe != "tensorwise" and self.precision != "fp8":
            raise MeshplanError(f"fp8_recipe {self.fp8_recipe!r} applies to precision fp8 only: set precision "
                                f"fp8 or drop fp8_recipe")
        self.engine = get_engine(self.engine).name
        get_engine(self.engine).checked_options(self.engine_options)

    def _check_pipeline(self):
        if self.interleave > 1 and self.schedule != "interleaved":
            raise MeshplanError(f"interleave {self.interleave} needs schedule 'interleaved' (got {self.schedule!r})")
        if self.schedule == "interleaved":
            if self.pp < 2:
                raise MeshplanError("the interleaved schedule needs pp >= 2: use schedule 1f1b or raise pp")
            if self.interleave < 2:
                raise MeshplanError("the interleaved schedule needs interleave >= 2 model chunks per stage")
            if self.grad_accum % self.pp:
                raise MeshplanError(
                    f"the interleaved schedule needs the micro-batch count ({self.grad_accum}) to be a multiple "
                    f"of pp ({self.pp}): change global_batch or micro_batch")
        if not self.stages:
            return
        if len(self.stages) != self.virtual_stages:
            raise MeshplanError(f"plan stages lists {len(self.stages)} ranges but pp x interleave = "
                                f"{self.virtual_stages}: give one [first, end) layer range per stage")
        expected_start = self.stages[0][0] if self.stages and _is_range(self.stages[0]) else None
        if expected_start != 0:
            raise MeshplanError("plan stages must start at layer 0, as [[0, end0], [end0, end1], ...]")
        for i, rng in enumerate(self.stages):
            if not _is_range(rng) or rng[0] != expected_start or rng[1] < rng[0]:
                raise MeshplanError(f"plan stage {i} is {shown(rng) if not _is_range(rng) else rng}: stages must be "
                                f"contiguous [first, end) "
                                    f"ranges, stage {i} starting at layer {expected_start}")
            expected_start = rng[1]

    def _check_tensor_parallel(self):
        if self.sequence_parallel and self.tp < 2:
            raise MeshplanError("sequence_parallel needs tp >= 2: set tp or drop sequence_parallel")
        keys = sorted(shown(k) for k in self.tp_layout if not isinstance(k, str))
        if keys:
            raise MeshplanError(f"plan tp_layout keys must be module names, got {', '.join(keys)}")
        bad = sorted({shown(s) for s in self.tp_layout.values() if not isinstance(s, str) or s not in TP_STYLES})
        if bad:
            raise MeshplanError(f"plan tp_layout has style(s) {bad}; use one of {', '.join(TP_STYLES)}")
        if self.tp == 1 and any(s != "replicate" for s in self.tp_layout.values()):
            raise MeshplanError("tp_layout shards modules but tp is 1: set tp >= 2 or drop tp_layout")

    def _check_memory_options(self):
        if self.offload_optimizer and self.zero < 2:
            raise MeshplanError("offload_optimizer runs through FSDP2's CPUOffloadPolicy: set zero to 2 or 3")

    def _check_expert_parallel(self):
        """Expert parallelism folds into data parallelism, as Megatron-Core's parallel folding
        and torchtitan fold it (megatron/core/parallel_state.py expert groups; torchtitan
        distributed/parallel_dims.py, ep borrowed from dp_shard x cp): the experts are split
        over groups of ep consecutive data-parallel ranks, each group a full copy."""
        if self.dp % self.ep:
            raise MeshplanError(f"ep {self.ep} must divide dp {self.dp} (expert parallelism splits the "
                                f"data-parallel ranks): change ep or dp")
        if self.ep > 1 and self.tp > 1:
            raise MeshplanError("ep > 1 with tp > 1 is not supported yet (experts would need expert tensor "
                                "parallelism): use tp 1 or ep 1")

    def _check_context_parallel(self):
        """Each sequence splits into 2 x cp chunks, rank i taking chunks i and 2cp-1-i so every
        rank gets the same share of causal attention (torch's context_parallel load balancer,
        torch/distributed/tensor/experimental/_context_parallel; Megatron-LM's
        get_batch_on_this_cp_rank)."""
        if self.cp == 1:
            return
        if self.seq % (2 * self.cp):
            raise MeshplanError(f"cp {self.cp} needs seq divisible by 2 x cp = {2 * self.cp} (each sequence is "
                                f"cut into 2 x cp load-balanced chunks), got seq {self.seq}: change seq or cp")
        if self.ep > 1:
            raise MeshplanError("cp > 1 with ep > 1 is not supported yet: use cp 1 or ep 1")

    # -- against a model and a cluster -------------------------------------
    def check_fits(self, num_layers: int | None = None, world_size: int | None = None,
                   gpus_per_node: int | None = None):
        """Consistency with a model's block count and a cluster's size."""
        if world_size is not None and self.world_size != world_size:
            cp = f" x {self.cp}" if self.cp > 1 else ""
            raise MeshplanError(f"dp x {'cp x ' if cp else ''}tp x pp = {self.dp}{cp} x {self.tp} x {self.pp} = "
                                f"{self.world_size} but the cluster has {world_size} devices: make the product "
                                f"{world_size}")
        if gpus_per_node is not None and self.tp > gpus_per_node:
            raise MeshplanError(f"tp {self.tp} spans more than one node ({gpus_per_node} devices per node): "
                                f"use tp <= {gpus_per_node}")
        if num_layers is None:
            return
        if self.checkpoint and len(self.checkpoint) != num_layers:
            raise MeshplanError(f"plan checkpoint lists {len(self.checkpoint)} layers but the model has "
                                f"{num_layers}: give one entry per layer")
        if self.stages and self.stages[-1][1] != num_layers:
            raise MeshplanError(f"plan stages end at layer {self.stages[-1][1]} but the model has "
                                f"{num_layers} layers: the last stage must end at {num_layers}")
        if not self.stages and self.virtual_stages > num_layers:
            raise MeshplanError(f"pp x interleave = {self.virtual_stages} exceeds the model's {num_layers} layers")

    # -- JSON -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise MeshplanError(f"{where} must be a JSON object, not {type(data).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - allowed))
        if unknown:
            raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "schema_version" not in data:
            raise MeshplanError(f"{where} has no schema_version: it was not written by meshplan")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        return cls.from_dict(parse_json(text, where), where)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        return cls.from_json(read_text(path, "plan file"), where=f"plan file {str(path)!r}")

    def save(self, path: str | Path, overwrite: bool = False):
        """Write atomically; never replace an existing file unless asked to."""
        path = Path(path)
        check_output_path(path, overwrite, force_hint=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)


def degree_words(plan: Plan, eq: str = "=") -> str:
    """The plan's degrees as people read them: "dp=8 cp=16 tp=8 pp=16" (cp and ep only when
    above 1); `eq=""` writes "dp8 cp16 tp8 pp16"."""
    shown_dims = [("dp", plan.dp), ("cp", plan.cp if plan.cp > 1 else None), ("tp", plan.tp), ("pp", plan.pp),
                  ("ep", plan.ep if plan.ep > 1 else None)]
    return " ".join(f"{name}{eq}{value}" for name, value in shown_dims if value is not None)


def check_schedule(plan: Plan) -> None:
    """torch.distributed.pipelining's 1F1B needs a micro-batch per stage (GPipe does not)."""
    if plan.pp > 1 and plan.schedule == "1f1b" and plan.grad_accum < plan.pp:
        raise MeshplanError(f"the 1f1b schedule needs at least pp = {plan.pp} micro-batches per step but the plan "
                            f"has {plan.grad_accum}: raise global_batch, lower micro_batch, or use gpipe")


def _is_range(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def even_stages(num_layers: int, stages: int) -> list:
    """Split layers into `stages` contiguous ranges differing in size by at most one."""
    if stages > num_layers:
        raise MeshplanError(f"cannot split {num_layers} layers into {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for i in range(stages):
        end = start + base + (1 if i < extra else 0)
        bounds.append([start, end])
        start = end
    return bounds

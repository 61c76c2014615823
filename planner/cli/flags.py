"""What the subcommands share: the parser that fails in one line, and one flag per plan field.

`add_plan_flags` is the only place the plan fields become flags (`--dp`, `--micro-batch`,
`--checkpoint {none,...}`, ...): `simulate` takes them with a plan's defaults, `plan` and
`compare` as pins that default to None (= searched). The choice lists are planner.plan's.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import fields

from cost_models.errors import MeshplanError
from cost_models.inputs import check_output_path, finite_number
from cost_models.units import GB, GIB
from planner.plan import CHECKPOINT_MODES, FP8_RECIPES, PRECISIONS, SCHEDULES, Plan

MODEL_HELP = "preset name, config .json (also Hugging Face's), model directory, HF cache name, or file.py:factory"
CLUSTER_HELP = "GPU:NODESxGPUS, a named system, or a .yaml/.json file"
JSON_HELP = "print JSON on stdout instead of tables (messages go to stderr)"
CALIBRATION_HELP = "a calibration JSON from `meshplan profile` for the cluster's GPU"

# What each plan field is, for its flag's help (a command's own text is added after it).
FIELD_WORDS = {"dp": "data-parallel degree", "tp": "tensor-parallel degree", "pp": "pipeline-parallel stages",
               "cp": "context-parallel degree: each sequence split over cp ranks (seq divisible by 2 x cp)",
               "ep": "expert-parallel degree (MoE; splits each group of ep data-parallel ranks' experts)",
               "zero": "ZeRO stage: 0 replicated, 1 optimizer, 2 +gradients, 3 +parameters sharded",
               "micro_batch": "sequences per micro-batch", "checkpoint": "activation recomputation",
               "precision": "training precision (fp8: bf16 with the block linears' GEMMs in float8, torchao's "
                            "float8 training; GPUs with FP8 only)",
               "fp8_recipe": "float8 scaling with --precision fp8: tensorwise (one scale a tensor; FSDP "
                             "all-gathers the weights in float8) or rowwise (one a row)",
               "schedule": "pipeline schedule",
               "interleave": "model chunks per pipeline rank (interleaved schedule)",
               "sequence_parallel": "Megatron sequence parallelism over the tensor-parallel group",
               "offload_optimizer": "optimizer state and step on the CPU (ZeRO >= 1)",
               "compile": "torch.compile each block (fused elementwise kernels, fewer launches)"}
_CHOICES = {"checkpoint": CHECKPOINT_MODES, "schedule": SCHEDULES, "precision": PRECISIONS,
            "fp8_recipe": FP8_RECIPES}
_SWITCHES = ("sequence_parallel", "offload_optimizer", "compile")
# A flag's default where the plan is given, not searched: Plan's own, every layer un-checkpointed.
_PLAN_DEFAULTS = {**{f.name: f.default for f in fields(Plan)}, "checkpoint": "none"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit code 2), no usage dump."""

    def error(self, message):
        raise MeshplanError(f"{message} (see `{self.prog} --help`)")


# What `--timeline`, `--plot` and `--memory-plot` can write (matplotlib's Agg formats that need
# nothing else installed; tests/cli/test_bad_inputs.py checks matplotlib still writes each).
IMAGE_SUFFIXES = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")
DEFAULT_SEQ = 2048


MEMORY_UNITS = {"gib": GIB, "gb": GB}


def memory_bytes(text: str, what: str) -> float:
    """A memory size flag in bytes: a number of GiB ("3", "3GiB"), or of decimal GB with the
    unit written ("3.2GB"). GiB is meshplan's one memory unit (tables, messages, reports);
    GB is accepted spelled out, since datasheets and older versions' --reserve used it."""
    match = re.fullmatch(r"\s*([^a-zA-Z\s]+?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match[2].lower() if match else ""
    if not match or unit not in ("", *MEMORY_UNITS):
        raise MeshplanError(f"{what} {text!r}: give GiB as a number (3, 3GiB) or decimal GB with the unit (3.2GB)")
    try:
        number = float(match[1])
    except ValueError:
        number = math.nan
    return finite_number(number, f"{what} ({'GB' if unit == 'gb' else 'GiB'})", low=0) * MEMORY_UNITS[unit or "gib"]


def add_batch_flags(parser, required: bool, seq_default: int | None = DEFAULT_SEQ) -> None:
    """`--global-batch` (required, or else only with the plan flags) and `--seq`."""
    parser.add_argument("--global-batch", type=int, required=required, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=seq_default, help=f"tokens per sequence (default {DEFAULT_SEQ})")


def check_image_path(path: str, overwrite: bool = False) -> None:
    """An image output, before any work: new (unless `overwrite`), writable, of a type we draw."""
    check_output_path(path, overwrite=overwrite, suffixes=IMAGE_SUFFIXES, force_hint=True)


def check_distinct(args, names) -> None:
    """Two output flags naming one file would have the second overwrite the first."""
    seen = {}
    for name in names:
        value = getattr(args, name, None)
        if value:
            key = os.path.abspath(value)
            if key in seen:
                raise MeshplanError(f"{flag(seen[key])} and {flag(name)} name the same file {value!r}: give each its own")
            seen[key] = name


def add_plan_flags(parser, names, defaults: bool = False, help: dict | None = None) -> None:
    """One flag per plan field in `names` (e.g. "micro_batch" -> `--micro-batch`), in that order.

    Every flag defaults to None, so a command can tell a flag given from one left out.
    defaults=True: a left-out flag means the plan's value (`with_defaults` fills it in; the
    help names it; a switch is `--flag` alone); defaults=False: "not pinned: searched" (a
    switch gets `--no-flag` too, to pin it off). `help`: field -> help text.
    """
    help = help or {}
    for name in names:
        text = FIELD_WORDS[name] + (": " + help[name] if name in help else "")
        if defaults:
            text += "; default " + ("off" if name in _SWITCHES else str(_PLAN_DEFAULTS[name]))
        elif "default" not in text:
            text += "; default: searched"
        kw = dict(help=text, default=None)
        if name in _SWITCHES and defaults:
            kw.update(action="store_const", const=True)
        elif name in _SWITCHES:
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw.update({"choices": _CHOICES[name]} if name in _CHOICES else {"type": int})
        parser.add_argument(flag(name), **kw)


MOE_IMBALANCE_HELP = ("Mixture-of-Experts load imbalance: the busiest expert-parallel rank receives this many times "
                      "the average routed tokens (>= 1; default 1, balanced); its experts' GEMMs and all-to-all "
                      "volume scale by it")


def add_moe_flags(parser) -> None:
    """`--moe-imbalance F` (planner.simulate.experts)."""
    parser.add_argument("--moe-imbalance", type=float, default=None, metavar="F", help=MOE_IMBALANCE_HELP)


def moe_imbalance(args) -> float:
    """--moe-imbalance, checked (a finite number >= 1; 1 when not given)."""
    value = 1.0 if getattr(args, "moe_imbalance", None) is None else args.moe_imbalance
    return finite_number(value, "--moe-imbalance", low=1)


def add_engine_flags(parser) -> None:
    """`--engine NAME` and repeatable `--engine-option KEY=VALUE` (planner.engines)."""
    from planner.engines import DEFAULT_ENGINE, ENGINES
    parser.add_argument("--engine", type=str.lower, choices=list(ENGINES),
                        help=f"the training engine that runs the plan (default {DEFAULT_ENGINE}); "
                             "`meshplan engines` lists what each offers and its options")
    parser.add_argument("--engine-option", action="append", default=None, metavar="KEY=VALUE",
                        help="an option of the engine that changes cost (repeatable), e.g. overlap_grad_reduce=true")


def engine_args(args) -> dict:
    """{"engine": ..., "engine_options": {...}} from the flags; {} when neither is given."""
    from planner.engines import DEFAULT_ENGINE, get_engine
    if args.engine is None and not args.engine_option:
        return {}
    engine = get_engine(args.engine or DEFAULT_ENGINE)
    return {"engine": engine.name, "engine_options": engine.parse_options(args.engine_option or [])}


def pinned(args, names) -> dict:
    """The plan fields among `names` given on the command line (a None flag is searched)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def with_defaults(given: dict, names) -> dict:
    """`given` plan fields, the rest of `names` at the plan's defaults (add_plan_flags(defaults=True))."""
    return {k: given[k] if k in given else _PLAN_DEFAULTS[k] for k in names}


def flag(name: str) -> str:
    """A plan field's flag: "micro_batch" -> "--micro-batch"."""
    return "--" + name.replace("_", "-")

"""What the subcommands share: the parser that fails in one line, and one flag per plan field.

`add_plan_flags` is the only place the plan fields become flags (`--dp`, `--micro-batch`,
`--checkpoint {none,...}`, ...): `simulate` takes them with a plan's defaults, `plan` and
`compare` as pins that default to None (= searched). The choice lists are planner.plan's.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from cost_models.errors import MeshplanError
from planner.plan import CHECKPOINT_MODES, PRECISIONS, SCHEDULES, Plan

MODEL_HELP = "preset name, config .json, or file.py:factory"
CLUSTER_HELP = "GPU:NODESxGPUS, a named system, or a .yaml/.json file"
CALIBRATION_HELP = "a calibration JSON from `meshplan profile` for the cluster's GPU"

_CHOICES = {"checkpoint": CHECKPOINT_MODES, "schedule": SCHEDULES, "precision": PRECISIONS}
_SWITCHES = ("sequence_parallel", "offload_optimizer")
# A flag's default where the plan is given, not searched: Plan's own, every layer un-checkpointed.
_PLAN_DEFAULTS = {**{f.name: f.default for f in fields(Plan)}, "checkpoint": "none"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit code 2), no usage dump."""

    def error(self, message):
        raise MeshplanError(f"{message} (see `{self.prog} --help`)")


def add_batch_flags(parser, required: bool) -> None:
    """`--global-batch` (required, or else only with the plan flags) and `--seq`."""
    parser.add_argument("--global-batch", type=int, required=required, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=2048)


def add_plan_flags(parser, names, defaults: bool = False, help: dict | None = None) -> None:
    """One flag per plan field in `names` (e.g. "micro_batch" -> `--micro-batch`), in that order.

    defaults=True: each flag defaults to the plan's value (a switch is `--flag` alone);
    defaults=False: each defaults to None, "not pinned: searched" (a switch gets `--no-flag`
    too, to pin it off). `help`: field -> help text.
    """
    help = help or {}
    for name in names:
        kw = dict(help=help.get(name))
        if name in _SWITCHES and defaults:
            kw.update(action="store_true")
        elif name in _SWITCHES:
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kw.update({"choices": _CHOICES[name]} if name in _CHOICES else {"type": int})
            if defaults:
                kw.update(default=_PLAN_DEFAULTS[name])
        parser.add_argument("--" + name.replace("_", "-"), **kw)


def pinned(args, names) -> dict:
    """The plan fields among `names` given on the command line (a None flag is searched)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}

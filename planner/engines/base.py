"""The engine registry: how each training engine runs a plan, and which plans it can run.

An engine is one registration (planner/engines/<engine>.py, citing the engine's source):
- its Execution: the knobs the simulator reads (planner.engines.execution), set from the
  engine's code;
- its options: the engine's own settings that change cost (Megatron-LM's
  `--overlap-grad-reduce`, DeepSpeed's `overlap_comm`), each mapped onto one knob;
- what it offers: ZeRO stages, pipeline schedules, recompute modes, precisions, sequence
  parallelism, optimizer offload, and whether it takes a searched tensor-parallel layout.
`Plan.engine` names one (default "meshplan", this project's runtime) and `Plan.engine_options`
holds its options; the search proposes only plans the engine can run, and simulate refuses
one it cannot, in one line. Names carry the version a profile describes where the engine's
behaviour changed (`megatron-lm@2021` beside `megatron-lm`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from cost_models.errors import MeshplanError
from cost_models.inputs import shown
from planner.engines.execution import Execution

DEFAULT_ENGINE = "meshplan"


@dataclass(frozen=True)
class EngineOption:
    """One engine setting that changes cost, and the Execution knob it sets."""

    knob: str
    """The Execution field this option sets."""
    values: dict
    """{the option's value: the knob's value} (an option takes only these values)."""
    default: object
    """The engine's own default (the profile's Execution already holds its knob value)."""
    help: str
    """What the option is in the engine (its flag or config key) and what it changes."""


@dataclass(frozen=True)
class Engine:
    """One training engine (at one version) as the simulator prices it."""

    name: str
    """As named on the CLI and in plan.json (`--engine NAME`)."""
    describes: str
    """The version and sources the profile is written from."""
    execution: Execution
    """How it runs a plan with every option at its default."""
    options: dict = field(default_factory=dict)
    """{option name: EngineOption}."""
    zero_defaults: dict = field(default_factory=dict)
    """{ZeRO stage: {option: value}}: defaults the engine itself changes with the stage."""
    zero: tuple = (0, 1, 2, 3)
    """The ZeRO stages it offers (planner.plan: 1 = sharded optimizer, 2 = + gradients, 3 = + parameters)."""
    pipeline_zero: tuple = (0, 1, 2, 3)
    """The ZeRO stages it offers together with pipeline parallelism (pp > 1)."""
    schedules: tuple = ("gpipe", "1f1b", "interleaved")
    """Pipeline schedules (planner.plan.SCHEDULES) it runs with pp > 1."""
    recompute: tuple = ("attention", "selective", "full")
    """Activation-recompute modes (planner.plan.RECOMPUTE_MODES) it offers; "full" at least
    (the search's memory floor recomputes every block in full)."""
    precisions: tuple = ("fp32", "bf16", "fp16")
    fp8_recipes: tuple = ()
    """The float8 scalings (planner.plan.FP8_RECIPES) it runs with precision fp8."""
    sequence_parallel: bool = True
    """Megatron-style sequence parallelism with tp (norms and dropouts on seq / tp tokens)."""
    offload_optimizer: bool = True
    """The optimizer step on the host (planner.plan.Plan.offload_optimizer)."""
    searched_tp_layout: bool = True
    """Applies any tensor-parallel layout the TP-layout ILP picks; else Megatron's fixed layout only."""
    expert_zero: tuple = (0, 1, 2, 3)
    """The ZeRO stages it runs expert parallelism (ep > 1) with; () = no expert parallelism
    that meshplan models (planner.simulate.experts)."""
    expert_refusal: str = ""
    """Why it gets no expert parallelism, when `expert_zero` is empty (its source says)."""
    context_zero: tuple = (0, 1, 2, 3)
    """The ZeRO stages it runs context parallelism (cp > 1) with."""
    context_refusal: str = ""
    """Why it gets no context parallelism (cp > 1) that meshplan models; "" = it has it
    (planner.simulate.context)."""
    compile_refusal: str = ""
    """Why it does not run a plan's `compile` (torch.compile per block); "" = it does."""
    limits: Callable | None = None
    """plan -> why its runtime cannot run that combination of choices (None: it can); the
    search keeps to what it allows (`recompute_for`), simulate refuses the rest."""
    micro_batch_per_stage: bool = True
    """Its 1F1B needs at least pp micro-batches per step (torch.distributed.pipelining's does;
    Megatron-LM's warm-up takes min(pp - rank - 1, micro-batches) and runs with fewer)."""

    def execution_for(self, options: dict | None = None, zero: int = 0) -> Execution:
        """The Execution with `options` (validated) applied over the defaults at ZeRO stage `zero`."""
        chosen = {**self.zero_defaults.get(zero, {}), **self.checked_options(options)}
        knobs = {self.options[k].knob: self.options[k].values[v] for k, v in chosen.items()}
        return replace(self.execution, **knobs)

    def checked_options(self, options: dict | None) -> dict:
        """`options` validated: known names, allowed values (one line naming what to change)."""
        options = options or {}
        if not isinstance(options, dict):
            raise MeshplanError(f"engine_options must be a JSON object of option: value, got {shown(options)}")
        for name, value in options.items():
            if name not in self.options:
                known = ", ".join(self.options) or "none"
                raise MeshplanError(f"engine {self.name} has no option {shown(name)}; its options: {known}")
            allowed = self.options[name].values
            if not any(type(v) is type(value) and v == value for v in allowed):
                raise MeshplanError(f"engine {self.name} option {name} takes {', '.join(map(option_text, allowed))}, "
                                    f"got {shown(value)}")
        return dict(options)

    def parse_options(self, items: list) -> dict:
        """`["overlap_grad_reduce=true", ...]` (the CLI's --engine-option) -> checked options."""
        options = {}
        for item in items:
            name, sep, text = str(item).partition("=")
            name = name.strip()
            option = self.options.get(name)
            if not sep or option is None:
                known = ", ".join(self.options) or "none"
                raise MeshplanError(f"--engine-option {item!r}: write KEY=VALUE with a key of {self.name}'s "
                                    f"options ({known})")
            matches = [v for v in option.values if option_text(v) == text.strip().lower()]
            if not matches:
                raise MeshplanError(f"--engine-option {name}: {self.name} takes "
                                    f"{', '.join(map(option_text, option.values))}, got {text!r}")
            options[name] = matches[0]
        return self.checked_options(options)

    def refusal(self, plan) -> str | None:
        """Why this engine cannot run `plan` (a planner.plan.Plan), or None."""
        zero = self.pipeline_zero if plan.pp > 1 else self.zero
        if plan.zero not in zero:
            where = " with pipeline parallelism" if plan.pp > 1 and plan.zero in self.zero else ""
            return f"{self.name} offers ZeRO {_stages(zero)}{where}, not {plan.zero}"
        if plan.pp > 1 and plan.schedule not in self.schedules:
            return f"{self.name} runs the pipeline schedules {', '.join(self.schedules)}, not {plan.schedule}"
        modes = sorted({m for m in plan.checkpoint if m != "none"} - set(self.recompute))
        if modes:
            offered = ", ".join(self.recompute) or "no recomputation"
            return f"{self.name} offers recompute {offered}, not {', '.join(modes)}"
        if plan.precision not in self.precisions:
            return f"{self.name} trains in {', '.join(self.precisions)}, not {plan.precision}"
        if plan.precision == "fp8" and plan.fp8_recipe not in self.fp8_recipes:
            return f"{self.name} runs fp8 with the {', '.join(self.fp8_recipes)} recipe, not {plan.fp8_recipe}"
        if plan.sequence_parallel and not self.sequence_parallel:
            return f"{self.name} has no sequence parallelism"
        if plan.offload_optimizer and not self.offload_optimizer:
            return f"{self.name} does not offload the optimizer in meshplan's sense (FSDP2's CPUOffloadPolicy)"
        if plan.ep > 1 and plan.zero not in self.expert_zero:
            if not self.expert_zero:
                return f"{self.name} has no expert parallelism meshplan models ({self.expert_refusal}): use ep 1"
            return f"{self.name} runs expert parallelism with ZeRO {_stages(self.expert_zero)}, not {plan.zero}"
        if plan.cp > 1 and self.context_refusal:
            return f"{self.name} has no context parallelism meshplan models ({self.context_refusal}): use cp 1"
        if plan.cp > 1 and plan.zero not in self.context_zero:
            return f"{self.name} runs context parallelism with ZeRO {_stages(self.context_zero)}, not {plan.zero}"
        if plan.compile and self.compile_refusal:
            return f"{self.name} does not compile each block ({self.compile_refusal}): drop compile"
        if plan.tp_layout and not self.searched_tp_layout:
            return f"{self.name} applies Megatron-LM's tensor-parallel layout only: drop the plan's tp_layout"
        return self.limits(plan) if self.limits else None

    def recompute_for(self, plan) -> tuple:
        """The recompute modes it offers that it can run with `plan`'s other choices."""
        if self.limits is None:
            return self.recompute
        return tuple(m for m in self.recompute if self.limits(replace(plan, checkpoint=[m])) is None)

    def check(self, plan) -> None:
        """Raise MeshplanError when this engine cannot run `plan`."""
        reason = self.refusal(plan)
        if reason:
            raise MeshplanError(f"{reason}: change the plan or the engine (--engine; {', '.join(ENGINES)})")


def option_text(value) -> str:
    """An option value as the CLI and messages write it (booleans lower-case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _stages(stages: tuple) -> str:
    return ", ".join(map(str, stages[:-1])) + (" or " if len(stages) > 1 else "") + str(stages[-1])


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    if engine.name in ENGINES:
        raise ValueError(f"engine {engine.name!r} is registered twice")
    if "full" not in engine.recompute or "1f1b" not in engine.schedules or 0 not in engine.zero:
        raise ValueError(f"engine {engine.name!r} must offer full recompute, the 1f1b schedule and ZeRO 0")
    unknown = [o.knob for o in engine.options.values() if not hasattr(engine.execution, o.knob)]
    if unknown:
        raise ValueError(f"engine {engine.name!r}: options set unknown Execution fields {unknown}")
    ENGINES[engine.name] = engine
    return engine


def get_engine(name) -> Engine:
    """The registered engine `name` (one line listing the engines when there is none)."""
    if not isinstance(name, str) or name.strip().lower() not in ENGINES:
        raise MeshplanError(f"unknown engine {shown(name)}; use one of {', '.join(ENGINES)}")
    return ENGINES[name.strip().lower()]

"""A plan's tensor-parallel layout against a model: Megatron-LM's default, every key and
style validated (`resolve_layout`), and whether meshplan's runtime can run a plan on a
model at all (`check_runnable`). The runtime shards with these rules (runtime.parallelize);
the simulator and `meshplan validate` refuse, with them, plans the runtime could not run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cost_models.errors import MeshplanError
from planner.arch.base import ALLOWED_STYLES, get_arch
from planner.plan import Plan, check_schedule

if TYPE_CHECKING:
    from planner.models import ModelConfig

_ROLE_WORDS = {"in": "an input projection", "out": "an output projection", "norm": "a norm",
               "embed": "an embedding", "head": "the output head"}


def megatron_layout(cfg: ModelConfig, plan: Plan) -> dict:
    """The default when a plan with tp > 1 has no tp_layout: Megatron-LM's (Architecture.default_layout)."""
    return get_arch(cfg.arch).default_layout(plan.tp, cfg.vocab, plan.sequence_parallel)


def resolve_layout(cfg: ModelConfig, plan: Plan) -> dict:
    """Plan layout -> {module name: style} for every block and top-level module, validated.

    Keys may be block-relative ("qkv"), top-level ("head") or one layer's ("blocks.3.fc1",
    which overrides "fc1" for block 3). An empty layout means Megatron's; in a non-empty
    one, modules it does not name stay replicated (norms: sequence-parallel under SP).
    """
    family = get_arch(cfg.arch)
    roles, top = family.block_roles, family.top_roles
    default = megatron_layout(cfg, plan) if not plan.tp_layout else {
        **{n: "sequence" if (r == "norm" and plan.sequence_parallel) else "replicate" for n, r in roles.items()},
        **{n: "sequence" if (r == "norm" and plan.sequence_parallel) else "replicate" for n, r in top.items()}}
    per_layer = {}
    for key, style in plan.tp_layout.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isascii() and parts[1].isdigit() \
                and len(parts[1]) < 9 and parts[2] in roles:
            if int(parts[1]) >= cfg.layers:
                raise MeshplanError(f"tp_layout key {key!r}: the model has {cfg.layers} blocks")
            per_layer[(int(parts[1]), parts[2])] = style
        elif key not in roles and key not in top:
            raise MeshplanError(f"tp_layout key {key!r} names no module of a {cfg.arch} model; use one of "
                                f"{', '.join([*roles, *top])} (or blocks.N.<name>)")
    base = {**default, **{k: v for k, v in plan.tp_layout.items() if k in roles or k in top}}
    layout = {}
    for name, role in top.items():
        layout[name] = _check_style(name, role, base[name], cfg, plan)
    for i in range(cfg.layers):
        for name, role in roles.items():
            style = per_layer.get((i, name), base[name])
            layout[f"blocks.{i}.{name}"] = _check_style(f"blocks.{i}.{name}", role, style, cfg, plan)
        for region, ins, out in family.regions:
            in_styles = {layout[f"blocks.{i}.{n}"] for n in ins}
            out_style = layout[f"blocks.{i}.{out}"]
            sharded_in = in_styles == {"colwise"}
            if "colwise" in in_styles and not sharded_in:
                raise MeshplanError(f"tp_layout block {i} {region}: {', '.join(ins)} must all be colwise or none of "
                                    f"them (got {sorted(in_styles)})")
            if sharded_in != (out_style == "rowwise"):
                raise MeshplanError(
                    f"tp_layout block {i} {region}: colwise {'/'.join(ins)} must be followed by a rowwise {out} "
                    f"and a rowwise {out} needs colwise {'/'.join(ins)} (got {sorted(in_styles)} then {out_style!r})")
    if cfg.tie_embeddings and vocab_dim(layout["tok"], "embed") != vocab_dim(layout["head"], "head"):
        raise MeshplanError(f"the model ties tok and head weights, so they must be split the same way: "
                            f"tok {layout['tok']!r} and head {layout['head']!r} differ (use vocab for both, "
                            f"colwise tok with rowwise head, or replicate both)")
    return layout


def vocab_dim(style: str, role: str):
    """Which dimension of the (vocab, hidden) tied weight a style shards (None: replicated)."""
    if style == "replicate":
        return None
    if role == "embed":
        return 1 if style == "colwise" else 0
    return 1 if style == "rowwise" else 0


def _check_style(name: str, role: str, style: str, cfg: ModelConfig, plan: Plan) -> str:
    if style not in ALLOWED_STYLES[role]:
        raise MeshplanError(f"tp_layout {name!r} is {style!r}, which its module ({_ROLE_WORDS[role]}) cannot "
                            f"take; use one of {', '.join(ALLOWED_STYLES[role])}")
    tp, short = plan.tp, name.split(".")[-1]
    if role == "norm" and (style == "sequence") != plan.sequence_parallel:
        raise MeshplanError(f"tp_layout {name!r} is {style!r} but sequence_parallel is {plan.sequence_parallel}: "
                            f"with sequence parallelism every norm is 'sequence', without it none is")
    if style == "colwise" and role == "in":
        if short in ("qkv", "q") and cfg.heads % tp:
            raise MeshplanError(f"tp_layout {name!r} colwise splits {cfg.heads} heads over tp {tp}: make tp divide heads")
        if short in ("k", "v") and cfg.kv_heads % tp:
            raise MeshplanError(f"tp_layout {name!r} colwise splits {cfg.kv_heads} kv heads over tp {tp}: "
                                f"make tp divide kv_heads or replicate the attention")
        if short in ("fc1", "gate", "up") and cfg.ffn % tp:
            raise MeshplanError(f"tp_layout {name!r} colwise splits ffn {cfg.ffn} over tp {tp}: make tp divide ffn")
    if style in ("rowwise",) and role == "in" and cfg.hidden % tp:
        raise MeshplanError(f"tp_layout {name!r} rowwise splits hidden {cfg.hidden} over tp {tp}: make tp divide it")
    if role in ("embed", "head") and style != "replicate":
        dim = vocab_dim(style, role)
        size = cfg.vocab if dim == 0 else cfg.hidden
        if short == "pos" and dim == 0:
            size = cfg.max_seq
        if size % tp:
            raise MeshplanError(f"tp_layout {name!r} {style} splits a dimension of {size} over tp {tp}: "
                                f"use replicate, or a model whose size divides by tp")
    return style


def check_runnable(plan: Plan, cfg, micro_batch_per_stage: bool = True) -> None:
    """Refuse, in one line, a plan that meshplan's runtime could not run on a model of `cfg`
    (a planner.models.ModelConfig): seq above max_seq, 1F1B with fewer micro-batches than
    stages, sequence parallelism over a sequence tp does not divide, a tp that does not divide
    what its layout splits (heads, kv heads, ffn, hidden, vocabulary), an unknown tp_layout key
    or style, and a stage split or checkpoint list of another layer count."""
    if plan.seq > cfg.max_seq:
        raise MeshplanError(f"seq {plan.seq} exceeds the model's max_seq {cfg.max_seq}")
    plan.check_fits(cfg.layers)
    if micro_batch_per_stage:   # torch.distributed.pipelining's 1F1B (planner.engines.Engine)
        check_schedule(plan)
    if plan.sequence_parallel and plan.seq % plan.tp:
        raise MeshplanError(f"sequence parallelism splits seq {plan.seq} over tp {plan.tp}: "
                            f"make tp divide seq or drop sequence_parallel")
    if plan.tp_layout:
        resolve_layout(cfg, plan)
    elif plan.tp > 1:   # Megatron's layout (the search's families obey the same rule)
        for what in ("heads", "kv_heads", "ffn", "hidden"):
            if getattr(cfg, what) % plan.tp:
                raise MeshplanError(f"tp {plan.tp} does not divide the model's {what} ({getattr(cfg, what)}), "
                                    f"which Megatron's layout splits over tp: choose a tp that divides heads, "
                                    f"kv_heads, ffn and hidden")

"""The architecture registry: every fact about a model family, declared once.

The tracer, the cost model (`planner.simulate.costing`) and the runtime
(`runtime.parallelize`) all read a family from here: its block class, the role each
block module plays in the residual stream (what tensor parallelism may do to it), the
regions a column-then-row split spans, and Megatron-LM's default layout. A new family
is one module that calls `register(Architecture(...))` (see `planner/arch/gpt.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cost_models.errors import MeshplanError

# Roles of a module in the residual stream: "in" reads the normalised residual, "out"
# writes back into it, "norm" normalises it; top-level modules embed, normalise the last
# block's output, or project onto the vocabulary.
BLOCK_ROLE_NAMES = ("in", "out", "norm")
# The Decoder's modules outside its blocks (planner.models.Decoder), the same in every
# family; `pos` exists only in families with learned positions.
TOP_ROLES = {"tok": "embed", "pos": "embed", "norm": "norm", "head": "head"}
# The tensor-parallel styles each role may take (runtime.parallelize applies them).
ALLOWED_STYLES = {
    "in": ("colwise", "rowwise", "replicate"),
    "out": ("rowwise", "colwise", "replicate"),
    "norm": ("sequence", "replicate"),
    "embed": ("vocab", "rowwise", "colwise", "replicate"),
    "head": ("vocab", "colwise", "rowwise", "replicate"),
}


@dataclass(frozen=True)
class Architecture:
    """One decoder family."""

    name: str
    block: type
    """The block's nn.Module class, built as `block(config, device)`."""
    final_norm: type
    """The norm applied to the last block's output (nn.LayerNorm, nn.RMSNorm)."""
    block_roles: dict
    """{block module name: "in" | "out" | "norm"}, in the block's order."""
    regions: tuple
    """((region, input projections, output projection), ...): a region's input projections
    all shard their outputs (colwise) exactly when its output projection takes sharded
    inputs (rowwise)."""
    region_norms: dict
    """{region: the norm whose output every input projection of the region reads}."""
    default_ffn: Callable[[int], int]
    """MLP width from the hidden size when a config does not give one."""
    learned_positions: bool
    """A `pos` embedding added to the token embedding (else positions are rotary, in the block)."""
    ties_embeddings: bool
    """The default of ModelConfig.tie_embeddings: the head reuses the token embedding."""
    grouped_query: bool
    """kv_heads may be fewer than heads."""
    even_head_dim: bool
    """Rotary embeddings rotate pairs, so head_dim must be even."""
    hf_names: dict = field(default_factory=dict)
    """{Hugging Face module name: ours} for linear layers and embeddings, so an HF model of
    this family is priced with the same roles (its modules are matched by name)."""
    activation: str = "gelu"
    """The default of ModelConfig.activation (planner.arch.layers.ACTIVATIONS): the MLP's,
    or its gate's in a gated MLP."""
    biases: bool = False
    """The default of ModelConfig.qkv_bias, out_bias and mlp_bias."""
    scales_embedding: bool = False
    """The token embedding is multiplied by sqrt(hidden) before the first block (Gemma)."""
    layered: bool = False
    """Blocks differ by depth: the Decoder builds each as `block(config, device, layer=i)`
    (the MoE family's leading dense blocks, planner/arch/moe.py)."""
    head_norms: dict = field(default_factory=dict)
    """{block norm: the input projection whose heads it normalises} (Qwen3's q_norm and
    k_norm): a norm over head_dim inside a region, which tensor parallelism runs on the
    projection's local heads with its weight replicated and its gradient summed over the
    TP group (runtime.parallelize; planner.simulate.communication.norm_grad_bytes)."""

    def __post_init__(self):
        bad = {n: r for n, r in self.block_roles.items() if r not in BLOCK_ROLE_NAMES}
        if bad:
            raise MeshplanError(f"architecture {self.name}: unknown block role(s) {bad}")
        for region, ins, out in self.regions:
            named = (*ins, out, self.region_norms[region])
            if any(name not in self.block_roles for name in named):
                raise MeshplanError(f"architecture {self.name}: region {region} names a module outside the block")
        for norm, projection in self.head_norms.items():
            if self.block_roles.get(norm) != "norm" or self.block_roles.get(projection) != "in":
                raise MeshplanError(f"architecture {self.name}: head norm {norm} must be a norm of an input projection")

    @property
    def top_roles(self) -> dict:
        return {k: v for k, v in TOP_ROLES.items() if k != "pos" or self.learned_positions}

    def default_layout(self, tp: int, vocab: int, sequence_parallel: bool) -> dict:
        """Megatron-LM's layout, the default of a plan with tp > 1 and no tp_layout: input
        projections colwise, output projections rowwise, norms sequence-parallel under SP,
        embedding and head vocabulary-parallel - or replicated when tp does not divide the
        vocabulary (Megatron pads it; meshplan does not change the model)."""
        norm = "sequence" if sequence_parallel else "replicate"
        layout = {name: {"in": "colwise", "out": "rowwise"}.get(role, norm) for name, role in self.block_roles.items()}
        vocab_style = "vocab" if vocab % tp == 0 else "replicate"
        layout.update(tok=vocab_style, head=vocab_style, norm=norm)
        if self.learned_positions:
            layout["pos"] = "replicate"
        return layout

    def top_level_layout(self, tp: int, vocab: int, sequence_parallel: bool) -> dict:
        """The default layout of the modules outside the blocks (which the block ILP does not decide)."""
        layout = self.default_layout(tp, vocab, sequence_parallel)
        return {name: layout[name] for name in self.top_roles}


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise MeshplanError(f"architecture {arch.name!r} is registered twice")
    # the cost model finds a shared-input output projection by its name alone (shared_input_outputs)
    outs = {out for _, _, out in arch.regions}
    for other in _REGISTRY.values():
        other_outs = {out for _, _, out in other.regions}
        clash = (outs & other_outs) & (set(_shared_outs(arch)) ^ set(_shared_outs(other)))
        if clash:
            raise MeshplanError(f"architecture {arch.name}: output projection(s) {sorted(clash)} share their "
                                f"input in one of {arch.name}, {other.name} but not the other; rename them")
    _REGISTRY[arch.name] = arch
    return arch


def get_arch(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MeshplanError(f"model arch {name!r} is unknown; use one of {', '.join(_REGISTRY)}") from None


def arch_names() -> tuple:
    return tuple(_REGISTRY)


def module_roles() -> dict:
    """{module name: role} over every registered family, Hugging Face names included: how
    the cost model recognises a linear layer or embedding of a traced model by its name."""
    roles = {}
    for arch in _REGISTRY.values():
        ours = {**arch.block_roles, **arch.top_roles}
        roles.update(ours)
        roles.update({hf: ours[name] for hf, name in arch.hf_names.items()})
    return roles


def head_norm_names() -> set:
    """The block modules of every family that normalise attention heads (Architecture.head_norms)."""
    return {name for arch in _REGISTRY.values() for name in arch.head_norms}


def shared_input_outputs() -> dict:
    """{output projection: the output projection of an earlier region reading the same norm},
    over every family: a block whose attention and MLP read one norm (Phi's parallel block)
    reduces that shared input's gradient once for both regions under tensor parallelism."""
    return {out: first for arch in _REGISTRY.values() for out, first in _shared_outs(arch).items()}


def _shared_outs(arch: Architecture) -> dict:
    shared, first = {}, {}
    for region, _, out in arch.regions:
        norm = arch.region_norms[region]
        if norm in first:
            shared[out] = first[norm]
        else:
            first[norm] = out
    return shared


def names_for(top_name: str) -> set:
    """A top-level module's name in every family, ours and Hugging Face's ("tok" -> tok, wte, ...)."""
    names = {top_name}
    for arch in _REGISTRY.values():
        names.update(hf for hf, name in arch.hf_names.items() if name == top_name)
    return names

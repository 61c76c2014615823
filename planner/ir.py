"""The traced-model IR: ops grouped into layers, each carrying what every cost model needs.

Produced by `planner.trace.trace_model`; consumed by the compute, memory and
communication models and by the planner's ILPs. Everything here is plain data (no
tensors, no modules), so a `TracedModel` is cheap to keep, compare and serialise.

Conventions (the tracer fills the numbers; they are defined here, once):

- Ops are aten ops as they run after autocast (so dtype casts are ops too), one per
  node of the layer's `make_fx` graph; multi-output ops count once (their `getitem`
  nodes are folded in) and view ops with no users are dropped.
- FLOPs count multiply-adds as 2 and only the matrix-unit work that
  `torch.utils.flop_counter.FlopCounterMode` counts: matmuls (`mm`, `addmm`, `bmm`,
  `baddbmm`), convolutions and attention. Elementwise, norm and reduction ops have 0 FLOPs;
  their cost is their bytes.
- Backward FLOPs: a matmul or convolution costs its forward once per input that requires
  grad (grad-input and grad-weight), so 2x forward in a transformer block. Attention
  backward is 2.5x forward: flash-style kernels recompute QK^T in backward (5 GEMMs
  against 2). FlopCounterMode's own formula has no recompute (2x);
  `TracedModel.flop_counter_flops()` gives totals in that convention, to compare like
  with like.
- Attention forward FLOPs are the full Tq x Tkv (4*B*H*Tq*Tkv*D, what FlopCounterMode on
  meta tensors counts and what MFU is conventionally quoted against). A causal kernel
  skips the upper triangle; `causal_fwd_flops` is that work (Tq*Tkv - Tq*(Tq-1)/2 of the
  pairs), for a cost model that times kernels rather than quoting MFU.
- Bytes read/written are the forward op's logical tensor bytes (broadcast dimensions
  counted once); view ops read and write nothing.
- Saved bytes: see `LayerCost`.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
import networkx as nx

OP_KINDS = ("linear", "matmul", "attention", "conv", "norm", "elementwise", "embedding", "loss",
            "reduction", "view", "other")
LAYER_KINDS = ("embedding", "block", "head", "other")
# Attention backward in a flash-style kernel (recomputes S = QK^T) vs. without recompute.
ATTENTION_BWD_FACTOR = 2.5
FLOP_COUNTER_ATTENTION_BWD_FACTOR = 2.0


@dataclass
class OpInfo:
    """One aten op of a layer's forward pass.

    `gemm` is (M, K, N) for `mm`/`addmm` and (batch, M, K, N) for `bmm`/`baddbmm`.
    `attention` is (batch, heads, seq_q, seq_kv, head_dim, causal).
    `shardable` names the weight dimensions tensor parallelism may split: for a linear,
    {"colwise": 0, "rowwise": 1} (nn.Linear's weight is (out, in): colwise splits the
    output features, rowwise the input features); for an embedding {"vocab": 0, "hidden": 1}.
    `params` are the parameter names (model paths) this op consumes; the parameter counts
    are charged to the first compute op that consumes each parameter (casts and views of a
    weight are transparent), so they sum to the layer's count.
    `attention_core`: the op ran inside the model's attention core (labelled by
    planner.arch.layers.causal_attention): what attention-core recomputation reruns.
    """

    name: str
    kind: str
    target: str
    module_path: str
    input_shapes: list
    output_shape: tuple
    dtype: str
    fwd_flops: int = 0
    bwd_flops: float = 0
    causal_fwd_flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    param_count: int = 0
    param_bytes: int = 0
    params: tuple = ()
    requires_grad: bool = False
    gemm: tuple | None = None
    attention: tuple | None = None
    shardable: dict = field(default_factory=dict)
    attention_core: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_shapes"] = [list(s) for s in self.input_shapes]
        data["output_shape"] = list(self.output_shape)
        data["params"] = list(self.params)
        for key in ("gemm", "attention"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


def selective_reruns(ops) -> list[bool]:
    """Per op of a layer (in forward order), whether selective checkpointing reruns it in
    backward: all but the fused attention kernels and every other weight product (the
    linear layers), as planner.arch.layers.every_other_product_policy keeps them."""
    reruns, products = [], 0
    for op in ops:
        weight_product = bool(op.kind in ("linear", "conv") and op.params)
        products += weight_product
        reruns.append(not (weight_product and products % 2 or op.kind == "attention"))
    return reruns


@dataclass
class LayerCost:
    """Totals for one layer signature (every layer sharing it costs the same).

    Activation memory held for backward, measured by running the layer's forward and
    backward on fake tensors (shapes, dtypes and storages but no data) under the
    precision's autocast:

    - `saved_bytes`: no recomputation. The unique storages autograd saved for backward,
      seen by `torch.autograd.graph.saved_tensors_hooks`: a tensor saved twice, or several
      views of one storage, count the storage's size once. Parameters are not counted (they
      are resident anyway), nor are the low-precision copies of parameters autocast makes
      (`saved_param_copy_bytes`, kept apart: under FSDP mixed precision they are the
      gathered low-precision parameters instead). The layer's input is counted when an op
      of the layer saves it (a block's first norm saves its input).
    - `saved_bytes_full_ckpt`: the layer wrapped in `torch.utils.checkpoint.checkpoint(
      use_reentrant=False)`: the storages still alive after the forward (other than
      parameters and the layer's own outputs, which are the next layer's input) - in
      practice the layer's inputs, which the checkpoint keeps to replay the forward.
    - `saved_bytes_selective`: selective recomputation in Korthikanti et al.'s sense, as a
      checkpoint with a `create_selective_checkpoint_contexts` policy: the outputs of the
      fused attention kernels and of every other matmul/convolution that consumes a weight
      (a parameter or autocast's copy of one: the linear layers) are saved; everything
      else - the other linear layers, an unfused attention core (QK^T/softmax/PV), norms,
      activations, casts - is recomputed in backward. Counted like the full checkpoint
      (alive storages). `recompute_fwd_flops_selective` is what that recomputation costs in
      FLOPs (selective_reruns). Op-level selective checkpointing as torchtitan's
      SelectiveAC runs it (all compute ops saved except every second mm).
    - `saved_bytes_attention`: attention-core recomputation, Korthikanti et al.'s selective
      recomputation as Megatron-LM runs it (`--recompute-granularity selective`: its
      `core_attention` module checkpointed): the block runs with `recompute_attention` set,
      so only the attention core (the ops labelled `OpInfo.attention_core`: the fused SDPA
      kernel, or QK^T, mask, softmax, dropout and the product with V) reruns in backward
      and everything else is kept as without recomputation. Counted like the full
      checkpoint (alive storages: the core's checkpoint keeps q, k and v by reference), less
      autocast's parameter copies (still in `saved_param_copy_bytes`). Korthikanti et al.
      2022, Sec. 4.1: 34sbh + 5as^2b bytes per layer without recomputation, 34sbh with it.
      `recompute_fwd_flops_attention` is the core's forward FLOPs, rerun in backward.
      A block without the flag (a model not from planner.models) keeps `saved_bytes`.

    The kernels are those of the trace's `kernels` choice ("cuda" by default: what a GPU
    step saves; see `planner.trace`). Buffers are excluded like parameters.

    `input_bytes`/`output_bytes` are the layer's boundary tensors (inputs other than
    parameters and buffers; outputs handed to later layers or returned), e.g. what a
    pipeline stage boundary sends.
    """

    signature: str
    fwd_flops: int
    bwd_flops: float
    param_count: int
    param_bytes: int
    bytes_read: int
    bytes_written: int
    saved_bytes: int
    saved_bytes_full_ckpt: int
    saved_bytes_selective: int
    saved_bytes_attention: int
    saved_param_copy_bytes: int
    input_bytes: int
    output_bytes: int
    attn_fwd_flops: int = 0
    attn_causal_fwd_flops: int = 0
    recompute_fwd_flops_selective: int = 0
    recompute_fwd_flops_attention: int = 0
    ops: list = field(default_factory=list)
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)

    @property
    def flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    def recompute_fwd_flops(self, mode: str) -> int:
        """Forward FLOPs rerun in backward under checkpoint mode `mode` (planner.plan.CHECKPOINT_MODES)."""
        return {"none": 0, "attention": self.recompute_fwd_flops_attention,
                "selective": self.recompute_fwd_flops_selective, "full": self.fwd_flops}[mode]

    def op(self, name: str) -> OpInfo:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def ops_of_kind(self, *kinds: str) -> list[OpInfo]:
        return [op for op in self.ops if op.kind in kinds]

    def compute_graph(self, kinds=("linear", "matmul", "attention", "conv", "embedding", "norm",
                                   "loss")) -> nx.DiGraph:
        """The dependency graph restricted to ops of `kinds`: u -> v when v consumes, through
        any chain of other ops, a value u produced. What a strategy ILP needs: a few
        decision ops per block instead of every cast and view. A norm written as several
        ops in one module (HF's Python RMSNorm) becomes one node, named after its first op."""
        rep = {}
        first_of_norm = {}
        for op in self.ops:
            if op.kind not in kinds:
                continue
            if op.kind == "norm" and op.module_path:
                rep[op.name] = first_of_norm.setdefault(op.module_path, op.name)
            else:
                rep[op.name] = op.name
        out = nx.DiGraph()
        out.add_nodes_from((n, self.graph.nodes[n]) for n in set(rep.values()))
        for src in rep:
            frontier, seen = list(self.graph.successors(src)), set()
            while frontier:
                node = frontier.pop()
                if node in seen:
                    continue
                seen.add(node)
                if node in rep:
                    if rep[node] != rep[src]:
                        out.add_edge(rep[src], rep[node])
                    else:
                        frontier.extend(self.graph.successors(node))
                else:
                    frontier.extend(self.graph.successors(node))
        return out

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k not in ("ops", "graph")}
        data["ops"] = [op.to_dict() for op in self.ops]
        data["edges"] = [list(e) for e in self.graph.edges]
        return data


@dataclass
class Layer:
    """One layer in execution order: a repeated block, or a non-repeated piece (the
    embeddings before the first block, the head and loss after the last).

    `name` is the module path for a block ("blocks.3"); a piece of top-level code is
    named "embed", "head", "between.K" (code between blocks K-1 and K) or "model" (a
    model without repeated blocks, traced whole). `modules` lists the module paths whose
    ops it contains. Layers with equal `signature` are structurally identical (module
    type, parameter and buffer shapes and dtypes, plain attributes, input shapes) and share
    one `LayerCost`.
    """

    name: str
    kind: str
    signature: str
    index: int
    modules: tuple = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modules"] = list(self.modules)
        return data


@dataclass
class TracedModel:
    """A model traced for one micro-batch size, sequence length and precision."""

    name: str
    micro_batch: int
    seq: int
    precision: str
    route: str
    layers: list
    costs: dict
    param_count: int
    param_bytes: int
    trace_seconds: float = 0.0
    cast: str = "autocast"      # how the low precision was applied (planner.plan.CASTS)

    def cost_of(self, layer: Layer | int) -> LayerCost:
        if isinstance(layer, int):
            layer = self.layers[layer]
        return self.costs[layer.signature]

    @functools.cached_property
    def blocks(self) -> list[int]:
        """Indices (into `layers`) of the repeated blocks (layers are fixed once traced)."""
        return [layer.index for layer in self.layers if layer.kind == "block"]

    @functools.cached_property
    def block_number(self) -> dict[int, int]:
        """Layer index -> its position among the blocks (what a plan's checkpoint list is keyed by)."""
        return {index: number for number, index in enumerate(self.blocks)}

    def layers_with(self, signature: str) -> list[int]:
        """Indices of the layers sharing `signature`."""
        return [layer.index for layer in self.layers if layer.signature == signature]

    def _total(self, attr: str):
        return sum(getattr(self.cost_of(layer), attr) for layer in self.layers)

    @property
    def fwd_flops(self) -> int:
        return self._total("fwd_flops")

    @property
    def bwd_flops(self) -> float:
        return self._total("bwd_flops")

    @property
    def attn_fwd_flops(self) -> int:
        return self._total("attn_fwd_flops")

    def flop_counter_flops(self) -> tuple[int, float]:
        """(forward, backward) FLOPs in FlopCounterMode's convention, where attention
        backward is 2x forward (no recompute) instead of our flash-style 2.5x."""
        extra = (ATTENTION_BWD_FACTOR - FLOP_COUNTER_ATTENTION_BWD_FACTOR) * self.attn_fwd_flops
        return self.fwd_flops, self.bwd_flops - extra

    def to_dict(self) -> dict:
        return {
            "name": self.name, "micro_batch": self.micro_batch, "seq": self.seq,
            "precision": self.precision, "route": self.route,
            "param_count": self.param_count, "param_bytes": self.param_bytes,
            "fwd_flops": self.fwd_flops, "bwd_flops": self.bwd_flops,
            "trace_seconds": self.trace_seconds,
            "layers": [layer.to_dict() for layer in self.layers],
            "costs": {sig: cost.to_dict() for sig, cost in self.costs.items()},
        }


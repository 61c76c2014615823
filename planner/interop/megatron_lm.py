"""Import a Megatron-LM job: its launch line or arguments file, read as Megatron-LM's own
parser reads it (data/megatron_lm_options.json lists every option of that parser, generated
from NVIDIA/Megatron-LM d98e8a6 megatron/training/arguments.py, and of the 2021 code,
megatron/arguments.py at de7dc40 and be13620), mapped onto a meshplan plan and model.

Every option is one of: mapped below (it changes cost, and meshplan prices it); accepted
because it changes nothing meshplan prices (logging, data paths, learning-rate schedule,
checkpoint paths, seeds: NEUTRAL_GROUPS and NEUTRAL); or refused in one line naming it.
A line that uses an option of the 2021 code only (`--DDP-impl`, `--checkpoint-num-layers`)
is read as that code and runs on the `megatron-lm@2021` engine profile.
"""
from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path

from cost_models.errors import MeshplanError
from planner.interop.base import Imported, data_parallel, layer_modes, number, source_text, whole
from planner.models import ModelConfig

CURRENT, OLD = "megatron-lm", "megatron-lm@2021"
OPEN = ()   # plan flags that may stand beside --from megatron-lm: none, the line fixes them all
# The GPT-2 BPE vocabulary (vocab.json of the GPT-2 release) that pretrain_gpt.py's default
# tokenizer, GPT2BPETokenizer, reads (pretrain_gpt.py: args_defaults={'tokenizer_type':
# 'GPT2BPETokenizer'}, at d98e8a6 and in 2021).
GPT2_VOCAB = 50257
# Argument groups of Megatron-LM's parser whose options change nothing meshplan prices.
NEUTRAL_GROUPS = {
    "checkpointing", "logging", "validation", "learning rate and weight decay", "learning rate", "regularization",
    "RNG and initialization", "initialization", "profiling", "rerun engine", "straggler", "one logger",
    "ft_package", "In-process restart", "workload inspector", "msc", "opentelemetry", "autoresume",
    "fault injector", "data and dataloader", "tokenizer", "inference"}
# Options of other groups that change nothing meshplan prices.
NEUTRAL = {
    "--train-iters", "--train-samples", "--exit-duration-in-mins", "--exit-interval", "--exit-signal",
    "--exit-signal-handler", "--exit-signal-handler-for-dataloader", "--exit-signal-handler-for-training",
    "--manual-gc", "--manual-gc-interval", "--no-manual-gc-eval", "--disable-manual-gc-eval",
    "--check-for-large-grads", "--check-weight-hash-across-dp-replicas-interval",
    "--no-check-for-nan-in-loss-and-grad", "--dataloader-type", "--gpu-sniff-test-interval", "--iterations-to-skip",
    "--result-rejected-tracker-filename", "--dump-param-to-param-group-map", "--train-sync-interval",
    "--use-mcore-models", "--log-interval", "--tensorboard-dir", "--distributed-backend",
    "--distributed-timeout-minutes", "--distributed-timeout-seconds-after-init", "--local-rank", "--local_rank",
    "--lazy-mpu-init", "--use-cpu-initialization", "--nccl-communicator-config-path", "--disable-gloo-process-groups",
    "--ddp-bucket-size", "--ddp-num-buckets", "--ddp-average-in-collective", "--ddp-pad-buckets-for-high-nccl-busbw",
    "--loss-scale", "--initial-loss-scale", "--min-loss-scale", "--loss-scale-window", "--hysteresis",
    "--attention-softmax-in-fp32", "--init-method-std", "--embedding-init-method-std", "--init-method-xavier-uniform",
    "--apply-query-key-layer-scaling", "--no-query-key-layer-scaling", "--init-model-with-meta-device",
    "--config-logger-dir", "--calculate-per-token-loss", "--onnx-safe", "--bert-no-binary-head", "--seed",
    # allocator housekeeping and LayerNorm's zero-centred weight: the same kernels, the same bytes
    "--empty-unused-memory-level", "--apply-layernorm-1p",
    # the engine profile already prices pipeline sends as blocking (planner/engines/megatron_lm.py)
    "--no-overlap-p2p-communication"}
# Options of data and tokenizer groups that are not neutral: mapped, or refused below.
NOT_NEUTRAL = {"--encoder-seq-length", "--decoder-seq-length", "--dataloader-inter-document-masking",
               "--retriever-seq-length", "--vocab-extra-ids"}
# Options accepted at their default value only: {option: default}.
AT_DEFAULT = {"--expert-model-parallel-size": 1, "--rotary-percent": 1.0,
              "--checkpoint-num-layers": 1, "--activations-checkpoint-num-layers": 1, "--optimizer": "adam"}


@lru_cache(maxsize=None)
def options(dialect: str) -> dict:
    """{option: [argument group, nargs]} of Megatron-LM's parser for `dialect` (CURRENT or OLD)."""
    data = json.loads((Path(__file__).parent / "data" / "megatron_lm_options.json").read_text())
    return data[dialect]["options"]


def tokens_of(source: str) -> tuple[list, str]:
    """Shell words of the launch line or arguments file (comments and continuations dropped)."""
    text, where = source_text(source, "Megatron-LM arguments")
    text = text.replace("\\\r\n", " ").replace("\\\n", " ")
    try:
        return shlex.split(text, comments=True), where
    except ValueError as exc:
        raise MeshplanError(f"{where} do not parse as shell words ({exc}): close the quote") from None


def split_launch(tokens: list, where: str) -> tuple[list, list]:
    """(launcher words, Megatron-LM arguments): the words before and after the training script."""
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
    if not scripts:
        return [], tokens
    script = Path(tokens[scripts[0]]).name
    if script != "pretrain_gpt.py":
        raise MeshplanError(f"{where} run {script}; meshplan reads GPT pre-training jobs (pretrain_gpt.py)")
    return tokens[:scripts[0]], tokens[scripts[0] + 1:]


def launcher_world(words: list, where: str) -> int | None:
    """torchrun's --nnodes x --nproc-per-node, when the line starts torchrun (else None)."""
    values, i = {}, 0
    while i < len(words):
        word = words[i]
        name, sep, value = word.partition("=")
        key = name.replace("_", "-")
        if key in ("--nnodes", "--nproc-per-node"):
            if not sep:
                value = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            if key == "--nnodes" and ":" in value:
                raise MeshplanError(f"{where}: torchrun --nnodes {value} is elastic; give one node count")
            values[key] = whole(value, f"torchrun {key}") if value not in ("gpu", "auto", "cpu") else None
        i += 1
    nodes, per_node = values.get("--nnodes", 1), values.get("--nproc-per-node")
    return None if per_node is None or nodes is None else nodes * per_node


def parse(words: list, where: str, dialect: str | None) -> tuple[dict, str]:
    """({option: value, switch: True}, dialect) as Megatron-LM's argparse reads `words`."""
    cur, old = options(CURRENT), options(OLD)
    given, i = {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-"):
            raise MeshplanError(f"{where}: unexpected word {word!r} (each Megatron-LM argument is --name [value])")
        name, sep, inline = word.partition("=")
        spec = cur.get(name) or old.get(name)
        if spec is None:
            raise MeshplanError(f"{where}: {name} is not a Megatron-LM option (not in megatron/training/"
                                f"arguments.py at d98e8a6 nor in the 2021 code)")
        nargs = spec[1]
        if nargs == 0:
            if sep:
                raise MeshplanError(f"{where}: {name} is a switch and takes no value, got {word!r}")
            given[name] = True
            i += 1
            continue
        values = [inline] if sep else []
        j = i + 1
        want = nargs if isinstance(nargs, int) else None
        while not sep and j < len(words) and not words[j].startswith("--") and (want is None or len(values) < want):
            values.append(words[j])
            j += 1
        if (want is not None and len(values) != want) or (nargs == "+" and not values):
            raise MeshplanError(f"{where}: {name} needs {want or 'a'} value{'s' if (want or 1) > 1 else ''}")
        given[name] = values[0] if want == 1 else values
        i = j
    chosen = dialect or (OLD if any(k not in cur for k in given) else CURRENT)
    if chosen == CURRENT:
        wrong = [k for k in given if k not in cur]
    else:
        wrong = [k for k in given if k not in old]
    if wrong:
        other = "the 2021 code" if chosen == CURRENT else "Megatron-Core's current arguments"
        raise MeshplanError(f"{where}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} an option of {other} "
                            f"only; the line is read as {chosen} (drop {'it' if len(wrong) == 1 else 'them'})")
    return given, chosen


def read(source: str, world: int, model=None, flags: dict | None = None, dialect: str | None = None) -> Imported:
    """The job `source` describes, on `world` GPUs (the cluster's); `model` must be None: the
    launch line holds the model's shape."""
    words, where = tokens_of(source)
    launcher, args = split_launch(words, where)
    launched = launcher_world(launcher, where)
    if launched is not None and launched != world:
        raise MeshplanError(f"{where} launch {launched} processes (torchrun --nnodes x --nproc-per-node) but the "
                            f"cluster has {world} GPUs: make them agree")
    given, dialect = parse(args, where, dialect)
    return _Reader(given, dialect, where, world).imported(model, flags or {})


class _Reader:
    """One parsed line mapped onto meshplan: each mapped option read once, the rest checked."""

    def __init__(self, given: dict, dialect: str, where: str, world: int):
        self.given, self.dialect, self.where, self.world = given, dialect, where, world
        self.used: set = set()
        self.notes: list = []

    def get(self, name, default=None):
        self.used.add(name)
        return self.given.get(name, default)

    def has(self, name) -> bool:
        self.used.add(name)
        return bool(self.given.get(name))

    def whole(self, name, default=None, low=1):
        value = self.get(name)
        return default if value is None else whole(value, f"{self.where}: {name}", low)

    def fail(self, text):
        raise MeshplanError(f"{self.where}: {text}")

    def imported(self, model, flags: dict) -> Imported:
        """`flags`: the CLI's plan flags; a Megatron-LM line fixes every one (OPEN is empty)."""
        if model is not None:
            self.fail("the arguments give the model's shape: drop --model")
        tp = self.whole("--tensor-model-parallel-size", 1)
        pp = self.whole("--pipeline-model-parallel-size", 1)
        config = self.model(tp)
        # --context-parallel-size: Megatron-Core's data-parallel size is world / (tp x pp x cp)
        # (megatron/core/parallel_state.py); TE's p2p ring is the only exchange meshplan prices
        cp = self.whole("--context-parallel-size", 1)
        comm_type = self.get("--cp-comm-type", ["p2p"])
        if cp > 1 and comm_type != ["p2p"]:
            self.fail(f"--cp-comm-type {' '.join(comm_type)} is not modelled by meshplan (its K/V exchange is TE's "
                      f"p2p ring): drop it or use p2p")
        dp = data_parallel(self.world, tp * pp * cp, f"{self.where}: tensor x pipeline x context parallel size")
        micro = self.whole("--micro-batch-size")
        if micro is None:
            self.fail("give --micro-batch-size (Megatron-LM requires it)")
        fields = dict(dp=dp, cp=cp, tp=tp, pp=pp, micro_batch=micro,
                      global_batch=self.whole("--global-batch-size", micro * dp),   # Megatron's default
                      seq=self.whole("--seq-length"), precision=self.precision())
        if fields["seq"] is None:
            self.fail("give --seq-length")
        fields.update(self.pipeline(config.layers, pp))
        fields["sequence_parallel"] = self.has("--sequence-parallel") and tp > 1   # Megatron drops it at tp 1
        if self.has("--use-tp-pp-dp-mapping"):
            fields["rank_order"] = ["dp", "pp", "tp"]    # megatron/core/parallel_state.py order "tp-pp-dp"
        fields["zero"] = 1 if self.has("--use-distributed-optimizer") else 0
        fields["checkpoint"] = self.recompute(config.layers, fields)
        engine_options = self.engine_options()
        self.check_rest()
        from planner.zoo import ModelSpec
        pinned = ("tp", "pp", "cp", "zero", "micro_batch", "checkpoint", "schedule", "interleave", "sequence_parallel",
                  "offload_optimizer", "precision")
        return Imported(self.dialect, engine_options, fields, ModelSpec(config.name, config), self.notes, pinned)

    # -- the model ---------------------------------------------------------------------
    def model(self, tp: int) -> ModelConfig:
        layers, hidden = self.whole("--num-layers"), self.whole("--hidden-size")
        heads = self.whole("--num-attention-heads")
        if None in (layers, hidden, heads):
            self.fail("give --num-layers, --hidden-size and --num-attention-heads (Megatron-LM requires them)")
        max_seq = self.whole("--max-position-embeddings")
        if max_seq is None:
            self.fail("give --max-position-embeddings (Megatron-LM requires it)")
        kv = self.whole("--kv-channels")
        if kv is not None and kv * heads != hidden:
            self.fail(f"--kv-channels {kv} x {heads} heads is not --hidden-size {hidden}: meshplan's heads are "
                      f"hidden / heads wide")
        kv_heads = heads
        if self.has("--group-query-attention"):
            kv_heads = self.whole("--num-query-groups", 1)
        else:
            self.get("--num-query-groups")   # Megatron reads it only with --group-query-attention
        arch = self.arch()
        gated = arch == "llama"
        # megatron/training/arguments.py validate_args: 4h, or int(4h x 2/3 / 64) x 64 with --swiglu
        ffn = self.whole("--ffn-hidden-size", int(4 * hidden * 2 / 3 / 64) * 64 if gated else 4 * hidden)
        dropout = self.dropout()
        eps = number(self.get("--norm-epsilon", self.get("--layernorm-epsilon", 1e-5)), "--norm-epsilon")
        config = dict(arch=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn,
                      vocab=self.vocab(tp), max_seq=max_seq, norm_eps=eps, dropout=dropout,
                      tie_embeddings=not self.has("--untie-embeddings-and-output-weights"),
                      name=f"megatron-{layers}x{hidden}")
        if gated:
            config["rope_theta"] = number(self.get("--rotary-base", 10000), "--rotary-base")
        else:
            self.get("--rotary-base")
        return ModelConfig(**config)

    def arch(self) -> str:
        rope = self.get("--position-embedding-type", "learned_absolute") == "rope" or \
            self.has("--use-rotary-position-embeddings")
        traits = {"rope": rope, "swiglu": self.has("--swiglu"),
                  "RMSNorm": self.get("--normalization", "LayerNorm") == "RMSNorm",
                  "no bias": self.has("--disable-bias-linear")}
        if all(traits.values()):
            return "llama"
        if not any(traits.values()) and self.get("--position-embedding-type", "learned_absolute") == "learned_absolute":
            return "gpt"
        have = ", ".join(k for k, v in traits.items() if v) or "none"
        self.fail(f"meshplan's model families are gpt (learned positions, LayerNorm, GELU, biases) and llama "
                  f"(--position-embedding-type rope, --swiglu, --normalization RMSNorm, --disable-bias-linear); "
                  f"these arguments set {have} of the llama traits: set all or none")

    def dropout(self) -> float:
        hidden = number(self.get("--hidden-dropout", 0.1), "--hidden-dropout")      # Megatron's default 0.1
        attention = number(self.get("--attention-dropout", 0.1), "--attention-dropout")
        if (hidden > 0) != (attention > 0):
            self.fail(f"--hidden-dropout {hidden} and --attention-dropout {attention}: meshplan models Megatron's "
                      f"dropouts together; make both 0 or both above 0")
        return max(hidden, attention)

    def vocab(self, tp: int) -> int:
        """Megatron-LM's padded vocabulary: the tokenizer's, rounded up to a multiple of
        --make-vocab-size-divisible-by x tp (megatron/core/tokenizers/utils/build_tokenizer.py
        vocab_size_with_padding; megatron/tokenizer/tokenizer.py in 2021)."""
        padded = self.whole("--padded-vocab-size")
        size = self.whole("--vocab-size")
        kind = self.get("--tokenizer-type", "GPT2BPETokenizer")
        divisor = self.whole("--make-vocab-size-divisible-by", 128)
        if padded is not None:
            return padded
        if size is None:
            if kind != "GPT2BPETokenizer":
                self.fail(f"the vocabulary of tokenizer {kind} is not in the arguments: add --vocab-size N "
                          f"(the tokenizer's size)")
            size = GPT2_VOCAB
        if self.has("--no-pad-vocab-size") or self.has("--disable-pad-vocab-size"):
            return size
        multiple = divisor * tp
        return -(-size // multiple) * multiple

    # -- the plan ----------------------------------------------------------------------
    def precision(self) -> str:
        if self.has("--bf16") and self.has("--fp16"):
            self.fail("--bf16 and --fp16 together: Megatron-LM takes one")
        if self.given.get("--bf16") and self.dialect == CURRENT:
            # what Megatron-Core does with bf16 anyway (arguments.py validate_args: "bfloat16
            # requires gradient accumulation and all-reduce to be done in fp32"): no change
            self.used.add("--accumulate-allreduce-grads-in-fp32")
        low = "bf16" if self.has("--bf16") else "fp16" if self.has("--fp16") else "fp32"
        return self.fp8(low) if self.dialect == CURRENT and self.get("--fp8-format") is not None else low

    def fp8(self, low: str) -> str:
        """`--fp8-format e4m3|hybrid` (TransformerConfig.fp8): Transformer Engine's FP8 GEMMs
        inside bf16 training, with `--fp8-recipe` tensorwise or its default delayed (both
        one scale a tensor: meshplan's tensorwise; planner/engines/megatron_lm.py)."""
        fmt = self.get("--fp8-format")
        if fmt not in ("e4m3", "hybrid"):
            self.fail(f"--fp8-format takes e4m3 or hybrid, got {fmt!r}")
        if low != "bf16":
            self.fail(f"--fp8-format with {low} training: meshplan prices FP8 inside bf16 training; add --bf16")
        recipe = self.get("--fp8-recipe", "delayed")
        if recipe not in ("tensorwise", "delayed"):
            self.fail(f"--fp8-recipe {recipe}: meshplan prices per-tensor FP8 scaling (tensorwise, delayed) only")
        if recipe == "delayed":
            self.notes.append("--fp8-recipe delayed (per-tensor scales from an amax history) is priced as "
                              "tensorwise scaling")
        if self.has("--fp8-param-gather"):
            self.fail("--fp8-param-gather (FP8 parameter all-gathers) is not modelled by meshplan: drop it")
        for numerics in ("--fp8-margin", "--fp8-interval", "--fp8-amax-history-len", "--fp8-amax-compute-algo"):
            self.get(numerics)   # scaling numerics: the same kernels, the same bytes
        return "fp8"

    def pipeline(self, layers: int, pp: int) -> dict:
        """schedule, interleave and the stages (Megatron-Core splits layers evenly, or with
        --decoder-first/last-pipeline-num-layers: megatron/core/transformer/transformer_block.py)."""
        per_chunk = self.whole("--num-layers-per-virtual-pipeline-stage")
        chunks = self.whole("--num-virtual-stages-per-pipeline-rank")
        first = self.whole("--decoder-first-pipeline-num-layers", low=0)
        last = self.whole("--decoder-last-pipeline-num-layers", low=0)
        if per_chunk is not None and chunks is not None:
            self.fail("give --num-layers-per-virtual-pipeline-stage or --num-virtual-stages-per-pipeline-rank, "
                      "not both")
        if self.dialect == OLD and per_chunk is not None and pp <= 2:
            self.fail("the 2021 code's interleaved schedule needs --pipeline-model-parallel-size > 2")
        if per_chunk is not None:
            if layers % pp or (layers // pp) % per_chunk:
                self.fail(f"{layers} layers over pp {pp} are not a whole number of "
                          f"--num-layers-per-virtual-pipeline-stage {per_chunk} chunks")
            chunks = layers // pp // per_chunk
        interleave = chunks or 1
        if pp == 1 or interleave == 1:
            out = dict(schedule="1f1b", interleave=1)
        else:
            out = dict(schedule="interleaved", interleave=interleave)
        if first is None and last is None:
            if layers % (pp * interleave):
                self.fail(f"Megatron-LM needs --num-layers {layers} divisible by the {pp * interleave} pipeline "
                          f"stages (or --decoder-first/last-pipeline-num-layers)")
            return out
        if interleave > 1:
            self.fail("--decoder-first/last-pipeline-num-layers with virtual pipeline stages is not modelled")
        ends = [n for n in (first, last) if n is not None]
        middle = pp - len(ends)
        rest = layers - sum(ends)
        if rest < 0 or (middle and rest % middle) or (not middle and rest):
            self.fail(f"--decoder-first/last-pipeline-num-layers leave {rest} layers for {middle} middle stages")
        sizes = [rest // middle if middle else 0] * pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        stages, start = [], 0
        for size in sizes:
            stages.append([start, start + size])
            start += size
        out["stages"] = stages
        return out

    def recompute(self, layers: int, fields: dict) -> list:
        """One mode per layer (megatron/core/recompute.py: uniform chunks or the first N
        layers of each stage's chunk; selective = the core attention, meshplan's "attention")."""
        from planner.plan import even_stages
        if self.dialect == OLD:
            method = self.get("--activations-checkpoint-method")
            if self.has("--checkpoint-activations"):     # 2021: = method uniform (megatron/arguments.py)
                method = method or "uniform"
            granularity = "full" if method else None
            count = self.whole("--activations-checkpoint-num-layers", self.whole("--checkpoint-num-layers", 1))
        else:
            if self.has("--checkpoint-activations"):
                self.fail("--checkpoint-activations is no longer valid in Megatron-Core (it exits): use "
                          "--recompute-activations, or --from megatron-lm@2021 for the 2021 code")
            granularity = "selective" if self.has("--recompute-activations") else \
                self.get("--recompute-granularity")
            method, count = self.get("--recompute-method"), self.whole("--recompute-num-layers")
            modules = self.get("--recompute-modules")
            if granularity == "selective":
                if method is not None or count is not None:
                    self.fail("selective recompute takes no --recompute-method or --recompute-num-layers "
                              "(megatron/core/transformer/transformer_config.py)")
                if modules not in (None, ["core_attn"]):
                    self.fail(f"--recompute-modules {' '.join(modules)}: meshplan models the core attention's "
                              f"(core_attn) selective recompute only")
                return ["attention"] * layers
            if modules is not None:
                self.fail("--recompute-modules needs --recompute-granularity selective")
            if granularity == "full" and (method is None or count is None):
                self.fail("--recompute-granularity full needs --recompute-method and --recompute-num-layers "
                          "(megatron/core/transformer/transformer_config.py)")
        if granularity is None:
            if method is not None:
                self.fail("--recompute-method needs --recompute-granularity full")
            return []
        stages = fields.get("stages") or even_stages(layers, fields["pp"] * fields["interleave"])
        if method == "uniform":
            if count != 1:
                self.fail(f"uniform recompute of {count} layers a unit keeps one input per {count} layers; meshplan "
                          f"recomputes layer by layer: use {1} layer a unit")
            return ["full"] * layers
        return layer_modes(layers, stages, lambda k, n: ["full"] * min(count, n) + ["none"] * max(n - count, 0))

    def engine_options(self) -> dict:
        if self.dialect == OLD:
            ddp = self.get("--DDP-impl", "local")
            if ddp not in ("local", "torch"):
                self.fail(f"--DDP-impl takes local or torch, got {ddp!r}")
            return {"ddp_impl": ddp} if ddp != "local" else {}
        options = {}
        if self.has("--overlap-grad-reduce"):
            options["overlap_grad_reduce"] = True
        backend = self.get("--attention-backend")
        if self.get("--transformer-impl", "transformer_engine") == "local":
            # LocalSpecProvider.core_attention is DotProductAttention (megatron/core/models/backends.py)
            if backend not in (None, "local", "unfused"):
                self.fail(f"--transformer-impl local runs Megatron's own core attention, not --attention-backend "
                          f"{backend}")
            backend = backend or "local"
        elif self.get("--transformer-impl", "transformer_engine") != "transformer_engine":
            self.fail(f"--transformer-impl {self.given['--transformer-impl']}: meshplan models transformer_engine "
                      f"and local")
        if self.has("--use-flash-attn") and backend is None:
            backend = "flash"
        spec = self.get("--spec")
        if spec is not None and list(spec) != ["local"]:
            self.fail(f"--spec {' '.join(spec)}: meshplan models Megatron's own layer specs only (--spec local)")
        if backend is not None and backend != "auto":
            options["attention_backend"] = backend
        return options

    def check_rest(self) -> None:
        """Every option not read above: neutral, at its default, or refused (one line)."""
        table = options(self.dialect)
        for name, value in self.given.items():
            if name in self.used or name in NEUTRAL:
                continue
            if name in AT_DEFAULT:
                default = AT_DEFAULT[name]
                same = value == default if isinstance(default, str) else number(value, name) == default
                if same:
                    continue
                self.fail(f"{name} {value}: meshplan models {name} {default} only")
            if table[name][0] in NEUTRAL_GROUPS and name not in NOT_NEUTRAL:
                continue
            self.fail(f"{name} changes the job in a way meshplan does not model: drop it to simulate without it")

"""Pieces of the runtime that need no process group."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from cost_models.errors import MeshplanError
from planner.plan import Plan
from planner.zoo import load_model
from runtime import checkpointing
from runtime.config import TrainingConfig
from runtime.data import Loader, MemmapSource, SyntheticSource
from runtime.metrics import flops_per_token, gpu_for_device, progress_line
from runtime.optim import lr_lambda
from runtime.parallelize import megatron_layout, resolve_layout
from runtime.pipeline import check_schedule, local_stages, stage_ranges

pytestmark = pytest.mark.runtime   # needs torch >= the runtime's floor (planner/torch_compat.py)

GPT = load_model("gpt-tiny").config
LLAMA = load_model("llama-tiny").config


def _global_batch(source, dp, steps=2, G=8, m=1):
    """What all dp ranks together see in each step, in global row order."""
    loaders = [Loader(source, G, m, dp, r, torch.device("cpu")) for r in range(dp)]
    out = []
    for _ in range(steps):
        parts = [ld.next_batch() for ld in loaders]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out, loaders


@pytest.mark.parametrize("make", [lambda tmp: SyntheticSource(256, 16, 5),
                                  lambda tmp: MemmapSource(str(tmp / "t.npy"), 256, 16, 5)])
def test_global_batch_does_not_depend_on_dp(tmp_path, make):
    np.save(tmp_path / "t.npy", np.arange(3000, dtype=np.uint16) % 256)
    source = make(tmp_path)
    ref, _ = _global_batch(source, 1)
    for dp in (2, 4, 8):
        got, loaders = _global_batch(source, dp)
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        assert all(ld.state_dict()["position"] == 16 for ld in loaders)
    x, y = ref[0]
    assert torch.equal(x[:, 1:], y[:, :-1])          # targets are inputs shifted by one
    assert not torch.equal(ref[0][0], ref[1][0])     # steps see different data


def test_micro_batches_are_consecutive_rows():
    ld = Loader(SyntheticSource(256, 8, 0), 8, 2, 2, 1, torch.device("cpu"))
    x, y = ld.next_batch()
    mbs = ld.micro_batches(x, y)
    assert len(mbs) == 2 and torch.equal(torch.cat([m[0] for m in mbs]), x)


def test_memmap_epochs_cover_every_window(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(161, dtype=np.int64) % 256)
    src = MemmapSource(str(tmp_path / "t.npy"), 256, 16, 0)       # 10 windows of 17 tokens
    starts = sorted(int(r[0]) for r in src.rows(0, 10))
    assert starts == [16 * i for i in range(10)]
    assert not np.array_equal(src.rows(0, 10), src.rows(10, 10))   # epoch 2 is reshuffled
    np.save(tmp_path / "bad.npy", np.full(100, 999, dtype=np.int64))
    with pytest.raises(MeshplanError, match="outside the model's vocabulary"):
        MemmapSource(str(tmp_path / "bad.npy"), 256, 16, 0).rows(0, 1)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(steps=110, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(109) == pytest.approx(0.1)
    assert f(10 + 99 // 2) == pytest.approx(0.55, abs=0.02)
    assert lr_lambda(1, 0, 0.1)(0) == pytest.approx(1.0)


def _plan(**kw):
    return Plan(**{"dp": 1, "tp": 2, "global_batch": 2, "seq": 32, **kw})


def test_default_layout_is_megatron():
    layout = resolve_layout(GPT, _plan())
    assert layout["blocks.0.qkv"] == "colwise" and layout["blocks.3.fc2"] == "rowwise"
    assert layout["tok"] == "vocab" and layout["head"] == "vocab" and layout["blocks.0.ln1"] == "replicate"
    sp = resolve_layout(LLAMA, _plan(sequence_parallel=True))
    assert sp["blocks.1.n2"] == "sequence" and sp["norm"] == "sequence" and sp["blocks.1.k"] == "colwise"
    odd = load_model({"arch": "gpt", "layers": 2, "hidden": 64, "heads": 4, "vocab": 255}).config
    assert megatron_layout(odd, _plan())["tok"] == "replicate"      # vocab 255 does not split over 2


def test_layout_per_layer_override_and_partial_layout():
    layout = resolve_layout(GPT, _plan(tp_layout={"fc1": "colwise", "fc2": "rowwise",
                                                  "blocks.2.fc1": "replicate", "blocks.2.fc2": "replicate"}))
    assert layout["blocks.1.fc1"] == "colwise" and layout["blocks.2.fc1"] == "replicate"
    assert layout["blocks.0.qkv"] == "replicate" and layout["tok"] == "replicate"   # not named: replicated


@pytest.mark.parametrize("layout, match", [
    ({"qkv": "colwise", "proj": "replicate"}, "must be followed by a rowwise proj"),
    ({"fc2": "rowwise"}, "needs colwise"),
    ({"q": "colwise"}, "names no module"),
    ({"tok": "vocab", "head": "rowwise"}, "ties tok and head"),
    ({"ln1": "sequence"}, "sequence_parallel is False"),
    ({"qkv": "vocab", "proj": "rowwise"}, "an input projection"),
    ({"blocks.9.qkv": "colwise"}, "has 4 blocks"),
])
def test_bad_layouts_say_what_to_change(layout, match):
    with pytest.raises(MeshplanError, match=match):
        resolve_layout(GPT, _plan(tp_layout=layout))


def test_layout_divisibility():
    with pytest.raises(MeshplanError, match="kv heads"):
        resolve_layout(LLAMA, _plan(tp=4))                            # llama-tiny has 2 kv heads
    with pytest.raises(MeshplanError, match="heads over tp 8"):
        resolve_layout(GPT, _plan(tp=8))


def test_pipeline_stage_placement():
    plan = Plan(pp=2, interleave=2, schedule="interleaved", global_batch=4, seq=32)
    assert stage_ranges(plan, 8) == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert local_stages(plan, 0) == [0, 2] and local_stages(plan, 1) == [1, 3]
    assert stage_ranges(Plan(pp=2, stages=[[0, 1], [1, 4]]), 4) == [[0, 1], [1, 4]]
    with pytest.raises(MeshplanError, match="1f1b schedule needs at least"):
        check_schedule(Plan(pp=4, global_batch=2, micro_batch=1, schedule="1f1b"))


def test_flops_per_token_palm_convention():
    cfg = load_model("gpt2-124m").config
    params = 124_439_808                                            # tied, with 1024 positions
    expected = 6 * (params - 1024 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, params, 1024) == expected
    assert gpu_for_device(torch.device("cpu")) == "cpu"


def test_flops_per_token_counts_the_active_experts():
    """An MoE token multiplies by top_k of the routed experts' weights: counted from the
    built module, each expert stack at top_k / experts, the untied embedding not at all."""
    spec = load_model("moe-tiny")
    cfg, model = spec.config, spec.build("meta")
    active = sum(p.numel() * (cfg.top_k / cfg.experts if ".experts." in name else 1.0)
                 for name, p in model.named_parameters() if not name.startswith("tok."))
    params = sum(p.numel() for p in model.parameters())
    expected = 6 * active + 12 * cfg.layers * cfg.heads * cfg.head_dim * 32
    assert flops_per_token(cfg, params, 32) == pytest.approx(expected, rel=1e-12)


def test_progress_line_has_the_numbers():
    line = progress_line(dict(step=3, loss=2.5, lr=1e-4, grad_norm=0.5, tokens_per_s=12345.0, mfu=0.41,
                              peak_mem_bytes=3 * 2**30), 10)
    for part in ("step 3/10", "loss 2.5000", "lr 1.00e-04", "grad_norm 0.500", "12,345 tok/s", "MFU 41.0%",
                 "mem 3.00 GiB"):
        assert part in line


def test_unfinished_checkpoint_is_never_latest(tmp_path):
    done = tmp_path / "step-00000003"
    done.mkdir()
    (done / checkpointing.MARKER).write_text("{}")
    (tmp_path / "latest").write_text("step-00000003\n")
    (tmp_path / ".step-00000006.partial").mkdir()                 # a save that crashed half-way
    (tmp_path / "step-00000009").mkdir()                          # no marker: not complete
    assert checkpointing.latest(str(tmp_path)) == done
    (tmp_path / "latest").unlink()
    assert checkpointing.latest(str(tmp_path)) == done
    with pytest.raises(MeshplanError, match="already holds checkpoints"):
        checkpointing.check_directory(str(tmp_path), resume=False)
    checkpointing.check_directory(str(tmp_path), resume=True)


def test_training_config_defaults_are_the_flags():
    config = TrainingConfig(steps=10)
    assert (config.lr, config.warmup, config.weight_decay, config.clip, config.seed) == (3e-4, 0, 0.1, 1.0, 0)
    assert config.min_lr == pytest.approx(3e-5)                     # None: lr / 10
    assert TrainingConfig(steps=1, lr=1e-3, min_lr=0.0, clip=0.0).to_dict() == dict(
        steps=1, lr=1e-3, min_lr=0.0, warmup=0, weight_decay=0.1, clip=0.0, seed=0)


@pytest.mark.parametrize("fields,fragment", [
    (dict(steps=0), "--steps must be >= 1"),
    (dict(steps=2.5), "--steps must be a whole number"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(lr=float("nan")), "--lr must be a finite number, got nan"),
    (dict(lr=float("inf")), "--lr must be a finite number, got inf"),
    (dict(min_lr=float("nan")), "--min-lr must be a finite number"),
    (dict(weight_decay=float("nan")), "--weight-decay must be a finite number"),
    (dict(weight_decay=float("inf")), "--weight-decay must be a finite number"),
    (dict(clip=float("nan")), "--clip must be a finite number"),
    (dict(clip=float("-inf")), "--clip must be a finite number"),
    (dict(lr=1e-3, min_lr=2e-3), "--min-lr must be between 0 and --lr"),
    (dict(min_lr=-1e-5), "--min-lr must be between 0 and --lr"),
    (dict(warmup=-1), "--warmup must be >= 0"),
    (dict(clip=-0.5), "--clip must be >= 0"),
    (dict(weight_decay=-0.1), "--weight-decay must be >= 0"),
    (dict(seed=-1), "--seed must be between 0 and 2**63 - 1"),
    (dict(seed=2**64), "--seed must be between 0 and 2**63 - 1"),
    (dict(seed=True), "--seed must be a whole number"),
    (dict(lr="big"), "--lr must be a number"),
])
def test_training_config_refuses_bad_values_in_one_line(fields, fragment):
    with pytest.raises(MeshplanError) as exc:
        TrainingConfig(**{"steps": 4, **fields})
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_training_config_resume_check():
    config = TrainingConfig(steps=6, lr=1e-3, seed=1)
    assert config.check_resume(config.to_dict(), "ck/step-00000003") == []
    longer = TrainingConfig(steps=9, lr=1e-3, seed=1)
    assert "--steps 6 -> 9" in longer.check_resume(config.to_dict(), "ck/step-00000003")[0]
    assert "records no training settings" in config.check_resume(None, "ck/step-00000003")[0]
    for other in (dict(lr=2e-3), dict(seed=2), dict(min_lr=0.0), dict(warmup=1), dict(weight_decay=0.0),
                  dict(clip=0.0)):
        changed = TrainingConfig(**{**config.to_dict(), **other})
        with pytest.raises(MeshplanError, match="cannot resume from ck/step-00000003 with other training settings"):
            changed.check_resume(config.to_dict(), "ck/step-00000003")


@pytest.mark.parametrize("attention", ["unfused", "sdpa"])
def test_attention_recompute_replays_dropout_and_keeps_the_gradients(attention):
    """apply_checkpointing's "attention" mode: each block reruns its attention core in
    backward with the forward's RNG state, so the dropout masks replay and the step is
    bit-identical to one without recomputation - and without RNG preservation it would not be."""
    from planner.models import Decoder, ModelConfig
    from runtime.parallelize import apply_checkpointing

    cfg = ModelConfig.from_dict({**GPT.to_dict(), "attention": attention, "dropout": 0.1})
    idx = torch.randint(0, cfg.vocab, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(modes):
        model = Decoder(cfg).init_weights(seed=0)
        apply_checkpointing(model, Plan(checkpoint=modes))
        torch.manual_seed(1)
        model(idx, idx).backward()
        return model, {n: p.grad for n, p in model.named_parameters()}

    model, recomputed = step(["attention"] * cfg.layers)
    assert all(block.recompute_attention for block in model.blocks.values())
    _, plain = step([])
    assert all(torch.equal(recomputed[n], plain[n]) for n in plain)
    torch.manual_seed(2)   # a different dropout mask: the gradients do depend on it
    model = Decoder(cfg).init_weights(seed=0)
    model(idx, idx).backward()
    assert not all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())

"""The model as the plan lays it out on this rank, and one training step of it.

Building: the full model is built and initialised on the CPU from the seed
(`init_weights(seed)`) on every rank, then cut into this rank's pipeline stages, moved
to the device and sharded - so the weights, and the loss, are the same whatever the
layout. (That needs the whole model in host memory on every rank: fine for the models
one trains for tests and demos; a very large model would instead be built on the meta
device, sharded, `to_empty`'d and initialised shard by shard - not done here.)

A file.py:factory model is built from the seed the same way, cut into stages by
torch.fx and split over tp on the linears its layout names (runtime.modules, runtime.split);
it trains on its example_inputs and backpropagates the loss its forward returns.

Order per part: context parallel (cp > 1: runtime.context_parallel points the part's
positions and attention at this rank's sequence chunks) -> expert parallel (ep > 1:
runtime.expert_parallel) -> tensor parallel -> activation checkpointing -> torch.compile
per block (plan.compile: runtime.compiling) -> autocast (pipeline stages) -> data parallel
(FSDP2 / replicate / DDP), as TorchTitan does.

A step: this dp rank's rows of the global batch (under cp, this rank's two chunks of each
of them) as `grad_accum` micro-batches; without
a pipeline each micro-batch's loss / grad_accum is back-propagated (gradient sync only
on the last micro-batch for replicate/DDP; FSDP reduce-scatters each), with a pipeline
the plan's schedule runs them. Then tied-embedding gradients are summed between the
first and last pipeline stage (they hold one shared weight twice), the fp16 scaler
unscales, gradients are clipped to the global norm, the optimizers step, and the loss
(mean over every micro-batch of the global batch) is all-reduced for logging.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from cost_models.errors import MeshplanError
from planner.arch.moe import check_tensor_parallel
from planner.models import count_parameters
from planner.plan import Plan
from planner.torch_compat import pipeline_first_stage_input
from planner.trace.inputs import primary_output
from runtime import context_parallel, expert_parallel, fp8
from runtime import optim as optim_mod
from runtime import compiling
from runtime.compiling import compile_blocks
from runtime.config import TrainingConfig
from runtime.modules import chunks as factory_chunks
from runtime.parallelize import (apply_checkpointing, autocast_context, data_parallel, resolve_layout,
                                 tensor_parallel, vocab_parallel_loss, with_autocast)
from runtime.pipeline import build_schedule, check_schedule, cut, divide_grads, local_stages, loss_fn, stage_ranges


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check_plan(spec, plan: Plan):
    """Everything about plan + model that can be checked without a process group."""
    compiling.check_plan(plan)
    context_parallel.check(spec, plan)
    if spec.config is None:   # a file.py:factory model, checked on the meta device
        from runtime.modules import FactoryModel
        check_schedule(plan)
        factory = FactoryModel(spec, plan, "meta")
        factory.check()
        expert_parallel.check(spec.name, factory.module, plan)
        if expert_parallel.moe_layers(factory.module):
            check_tensor_parallel(plan.tp)
        return
    cfg = spec.config
    if cfg.is_moe:
        check_tensor_parallel(plan.tp)
    if plan.ep > 1:
        expert_parallel.check(spec.name, spec.build("meta"), plan)
    plan.check_fits(cfg.layers)
    if plan.seq > cfg.max_seq:
        raise MeshplanError(f"plan seq {plan.seq} exceeds the model's max_seq {cfg.max_seq}")
    if plan.sequence_parallel and plan.local_seq % plan.tp:
        per_rank = f"each cp rank's {plan.local_seq} tokens" if plan.cp > 1 else f"seq {plan.seq}"
        raise MeshplanError(f"sequence_parallel splits {per_rank} over tp {plan.tp}: make tp divide seq"
                            f"{' / cp' if plan.cp > 1 else ''}")
    check_schedule(plan)
    if plan.tp > 1:
        resolve_layout(cfg, plan)


class Engine:
    def __init__(self, spec, plan: Plan, rt, config: TrainingConfig):
        check_plan(spec, plan)
        cfg = self.cfg = spec.config
        self.plan, self.rt, self.config = plan, rt, config
        self.device = rt.device
        V = plan.virtual_stages
        torch.manual_seed(config.seed)
        self.factory = None
        if cfg is None:
            parts = self._factory_parts(spec, plan, rt, config)
            layout = None
        else:
            plan.check_fits(cfg.layers, rt.world_size)
            full = spec.build("cpu").init_weights(config.seed)
            self.params_total = count_parameters(full)
            if plan.pp > 1:
                ranges = stage_ranges(plan, cfg.layers)
                if plan.sequence_parallel and any(a == b for a, b in ranges):
                    raise MeshplanError("sequence parallelism needs at least one block in every pipeline stage")
                mine = local_stages(plan, rt.coords["pp"])
                parts = {v: cut(full, *ranges[v], v == 0, v == V - 1) for v in mine}
            else:
                parts = {0: full}
            del full
            layout = resolve_layout(cfg, plan) if plan.tp > 1 else None
        # a vocabulary-parallel head leaves its logits split: the loss and its backward run
        # under loss_parallel, so the logits are never gathered (vocab_parallel_loss)
        self.loss_context = loss_parallel if vocab_parallel_loss(layout) else contextlib.nullcontext

        self.parts, self.modules = {}, {}
        self.context = None
        if plan.cp > 1:
            self.context = context_parallel.ContextShard(rt.group("cp"), rt.coords["cp"], plan.cp)
        if plan.precision == "fp8":
            fp8.check_device(self.device)
        self.fp8_linears = 0   # block linears converted to torchao's Float8Linear (runtime.fp8)
        for v, part in parts.items():
            part.to(self.device)
            if self.context is not None:
                context_parallel.apply(part, self.context)
            blocks = self.factory.blocks(part) if self.factory else {int(k): b for k, b in part.blocks.items()}
            if plan.ep > 1:
                expert_parallel.apply_expert_parallel(part, rt.expert_mesh)
            if plan.precision == "fp8":   # before TP and FSDP wrap them, as torchtitan converts
                self.fp8_linears += fp8.convert_blocks(blocks, plan)
            if layout is not None:
                tensor_parallel(part, rt.submesh("tp"), layout, cfg, plan, first_stage=v == 0, last_stage=v == V - 1)
            elif self.factory and plan.tp > 1:
                self.factory.tensor_parallel(part, rt.submesh("tp"))
            apply_checkpointing(part, plan, blocks)
            if plan.compile:        # after TP and AC, before FSDP (torchtitan's apply_compile)
                compile_blocks(blocks)
            if plan.pp > 1:
                with_autocast(part, plan, self.device)
            self.parts[v] = part
            self.modules[v] = data_parallel(part, rt, plan, blocks)

        # Optimizers (one per part), schedules, fp16 scaler.
        fused = self.device.type == "cuda" and not rt.distributed
        self.optimizers = [optim_mod.build_optimizer(self.modules[v], config.lr, config.weight_decay, fused)
                           for v in sorted(self.modules)]
        factor = optim_mod.lr_lambda(config.steps, config.warmup, config.min_lr / config.lr)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.scaler = optim_mod.make_scaler(plan.precision, self.device, rt.distributed)

        # Tied embeddings across pipeline stages: one weight held by the first and last stage.
        self.tied_param, self.tied_group, self.norm_skip = None, None, frozenset()
        if cfg is not None and cfg.tie_embeddings and plan.pp > 1:
            self._tie_across_stages(V)

        self.mb_losses: list = []
        if plan.pp > 1:
            def stage_loss(logits, targets):
                # a factory's last stage returns its loss already (runtime.split)
                loss = _local(logits.sum() if self.factory else loss_fn(logits, targets))   # DTensor: loss_parallel
                return self.scaler.scale(loss) if self.scaler is not None else loss
            self.schedule, self.stages = build_schedule(plan, self.modules, rt, stage_loss,
                                                        carries_inputs=self.factory is not None)
            self.has_first = 0 in self.modules
            self.has_last = (V - 1) in self.modules
        else:
            self.schedule, self.has_first, self.has_last = None, True, True

    def _factory_parts(self, spec, plan: Plan, rt, config: TrainingConfig) -> dict:
        """{virtual stage: module} of a file.py:factory model on this rank (runtime.modules)."""
        from runtime.modules import FactoryModel
        from runtime.split import check_carried
        factory = self.factory = FactoryModel(spec, plan, "cpu", config.seed)
        plan.check_fits(len(factory.block_paths) or None, rt.world_size)
        self.params_total = count_parameters(factory.module)
        if plan.pp == 1:
            return {0: factory.module}
        stages = factory.stages()
        check_carried(stages, factory.example[0], factory.module)
        return {v: stages[v] for v in local_stages(plan, rt.coords["pp"])}

    # -------------------------------------------------------------------------------
    def _tie_across_stages(self, V: int):
        rt, plan = self.rt, self.plan
        for i, c, j in itertools.product(range(plan.dp), range(plan.cp), range(plan.tp)):
            ranks = sorted({rt.rank_at(pp=0, dp=i, cp=c, tp=j), rt.rank_at(pp=plan.pp - 1, dp=i, cp=c, tp=j)})
            group = dist.new_group(ranks)
            if rt.rank in ranks:
                self.tied_group = group
        if 0 in self.parts:
            self.tied_param = self.parts[0].tok.weight
        if V - 1 in self.parts:
            head = self.parts[V - 1].head.weight
            if self.tied_param is None:
                self.tied_param = head
            self.norm_skip = frozenset({id(head)})   # counted once, on the first stage

    def parameters(self):
        seen = set()
        for module in self.modules.values():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _sync(self, module: nn.Module, last: bool):
        """Before one micro-batch: replicate (ZeRO 0) reduces gradients only in the last one;
        ZeRO 1 also keeps the gathered parameters and the unsharded gradients until then
        (Megatron-LM's distributed optimizer; planner.simulate.fsdp prices exactly this)."""
        from torch.distributed.fsdp import FSDPModule
        if isinstance(module, FSDPModule) and self.plan.zero <= 1:
            module.set_requires_gradient_sync(last)
            if self.plan.zero == 1:
                module.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------
    def step(self, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> dict:
        """One optimizer step on this rank's rows; returns loss, grad_norm, lr, skipped."""
        plan, rt = self.plan, self.rt
        lr = self.optimizers[0].param_groups[0]["lr"]
        self.mb_losses = []
        if self.context is not None:   # this cp rank's chunks of each sequence, labels alike
            inputs, targets = self.context.shard(inputs), self.context.shard(targets)
        if self.schedule is None:
            model = self.modules[0]
            if self.factory:   # inputs: this rank's (args, kwargs) (runtime.modules.ExampleSource)
                chunks = factory_chunks(inputs, micro_batch)
            else:
                chunks = [((inputs[i:i + micro_batch], targets[i:i + micro_batch]), {})
                          for i in range(0, inputs.shape[0], micro_batch)]
            n = len(chunks)
            for k, (args, kwargs) in enumerate(chunks):
                with self._sync(model, k == n - 1), self.loss_context():
                    with autocast_context(plan, self.device):
                        out = model(*args, **kwargs)
                        loss = _local(primary_output(out) if self.factory else out)
                    self.mb_losses.append(loss.detach())
                    scaled = loss / n
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    scaled.backward()
        else:
            losses = [] if self.has_last else None
            if self.factory:   # positional tensors in; the last stage's output is the loss (no target)
                args = [pipeline_first_stage_input(a) for a in inputs[0]]
                targets = torch.zeros(plan.grad_accum, device=self.device)
            else:
                args = [pipeline_first_stage_input(inputs)]
            with self.loss_context():
                if self.has_first:
                    self.schedule.step(*args, target=targets if self.has_last else None, losses=losses)
                elif self.has_last:
                    self.schedule.step(target=targets, losses=losses)
                else:
                    self.schedule.step()
            divide_grads(self.schedule, self.modules, plan.grad_accum)
            if losses:
                scale = self.scaler.get_scale() if self.scaler is not None else 1.0
                self.mb_losses = [l.detach() / scale for l in losses]

        params = list(self.parameters())
        for p in params:   # DTensor autograd may hand back a gradient laid out unlike its parameter
            g = p.grad
            if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(p.device_mesh, p.placements)
        if self.tied_group is not None and self.tied_param is not None and self.tied_param.grad is not None:
            dist.all_reduce(_local(self.tied_param.grad), group=self.tied_group)
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        grad_norm = optim_mod.clip_gradients(params, self.config.clip, rt.coords, self.device, rt.distributed,
                                             skip=self.norm_skip)
        skipped = False
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        else:
            for opt in self.optimizers:
                opt.step()
        fp8.after_optimizer_step(self.modules.values(), plan)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers:
            sched.step()

        # Mean loss over every micro-batch of the global batch, summed once per (dp, cp, pp-last)
        # rank: each cp rank's mean is over as many tokens as any other's.
        owner = self.has_last and rt.coords["tp"] == 0
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if owner and self.mb_losses:
            total[0] = torch.stack([l.double() for l in self.mb_losses]).sum()
            total[1] = len(self.mb_losses)
        if rt.distributed:
            dist.all_reduce(total)
        loss = float(total[0] / total[1])
        return dict(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped)

    # -------------------------------------------------------------------------------
    def set_schedule_step(self, step: int):
        """Put the learning-rate schedules at `step` optimizer steps done (after a resume)."""
        for sched, opt in zip(self.schedulers, self.optimizers):
            sched.last_epoch = step
            lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, value in zip(opt.param_groups, lrs):
                group["lr"] = value
            sched._last_lr = lrs

    def scaler_state(self) -> dict:
        if self.scaler is None:
            return {}
        sd = self.scaler.state_dict()
        return {"scaler_scale": float(sd.get("scale", 0.0)), "scaler_growth_tracker": int(sd.get("_growth_tracker", 0))}

    def load_scaler_state(self, state: dict):
        if self.scaler is None or "scaler_scale" not in state:
            return
        sd = self.scaler.state_dict()
        sd.update(scale=state["scaler_scale"], _growth_tracker=state["scaler_growth_tracker"])
        self.scaler.load_state_dict(sd)

"""Runtime: executes a `planner.Plan` with PyTorch's own distributed engine.

Depends on `planner` and `cost_models`; nothing depends on it.

Entry point: `python -m runtime.train` (argparse in runtime/train.py), run as one process
or under torchrun. Modules, one job each:

- mesh.py           process group (torchrun env or single process) and the plan's DeviceMesh
                    (`init_device_mesh` with named dims in `plan.rank_order`, outermost first)
- parallelize.py    tp_layout -> DTensor parallel styles, activation checkpointing, ZeRO wrapping
                    (FSDP2 fully_shard / replicate / DDP), mixed precision
- pipeline.py       stage cuts, PipelineStage and the plan's pipelining schedule
- engine.py         builds this rank's model parts and optimizers; one training step
- optim.py          AdamW, warm-up + cosine schedule, global grad-norm clipping, fp16 scaler
- data.py           synthetic and .npy-memmap token sources; each dp rank's rows of a global batch
- checkpointing.py  atomic torch.distributed.checkpoint save (synchronous or async_save) / resume
- cadence.py        when to save: every K steps, or Young/Daly (--checkpoint-every auto)
- preemption.py     SIGTERM: every rank stops after the same step with a checkpoint
- metrics.py        progress line, JSONL, TensorBoard, MFU
- wandb_log.py      the per-step records to Weights & Biases (--wandb, offline by default)
- summary.py        the run's last line: measured step time and memory beside the prediction
"""

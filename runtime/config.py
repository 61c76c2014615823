"""The training hyperparameters: one validated `TrainingConfig`, saved with every checkpoint.

`runtime.train` builds it from its flags (each field is the flag of the same name:
`min_lr` is `--min-lr`), `runtime.engine.Engine` trains with it, and each checkpoint
records it in its `meshplan.json` under "training". A resume whose settings differ in a
field that changes the trained weights is refused (see `TrainingConfig.check_resume`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cost_models.errors import MeshplanError

# Fields that must match the checkpoint's to resume: any other value trains other weights
# from the resumed step on (another data order, learning rate, decay or clipping), so the
# run would be neither the saved one continued nor a new one. `steps` may change: that is
# how a run is extended (or cut short); the cosine schedule then follows the new length.
RESUME_MUST_MATCH = ("seed", "lr", "min_lr", "warmup", "weight_decay", "clip")


@dataclass(frozen=True)
class TrainingConfig:
    steps: int
    """Optimizer steps to train, in total (resumed ones counted); >= 1."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after the warm-up; > 0. Every float field must be finite."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay, 0 <= min_lr <= lr; None means lr / 10."""
    warmup: int = 0
    """Steps of linear warm-up from lr / warmup to lr; >= 0."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only; >= 0."""
    clip: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off; >= 0."""
    seed: int = 0
    """Seed of the weights' initialisation and of the data order; 0 <= seed < 2**63."""

    def __post_init__(self):
        for name in ("steps", "warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MeshplanError(f"--{name} must be a whole number, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "clip"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise MeshplanError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
            if value is not None and not math.isfinite(value):     # inf/nan train to NaN weights
                raise MeshplanError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.steps < 1:
            raise MeshplanError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise MeshplanError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if not 0 <= self.min_lr <= self.lr:
            raise MeshplanError(f"--min-lr must be between 0 and --lr, got {self.min_lr}")
        if self.warmup < 0:
            raise MeshplanError(f"--warmup must be >= 0, got {self.warmup}")
        if self.clip < 0:
            raise MeshplanError(f"--clip must be >= 0, got {self.clip}")
        if self.weight_decay < 0:
            raise MeshplanError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**63:          # torch.manual_seed's range (numpy takes any >= 0)
            raise MeshplanError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")

    @classmethod
    def from_args(cls, args) -> "TrainingConfig":
        """From `runtime.train`'s parsed flags."""
        return cls(steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                   weight_decay=args.weight_decay, clip=args.clip, seed=args.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_resume(self, saved: dict | None, where) -> list[str]:
        """Refuse (MeshplanError) to resume a checkpoint saved with other RESUME_MUST_MATCH
        values; returns notes for the user: a changed `steps`, or a checkpoint that recorded
        no training config (saved before meshplan recorded it: nothing to compare). Values
        compare exactly: JSON writes a float's repr, which reads back as the same float."""
        if saved is None:
            return [f"{where} records no training settings: resuming with these, unchecked"]
        changed = [f"--{name.replace('_', '-')} {saved.get(name)!r} -> {getattr(self, name)!r}"
                   for name in RESUME_MUST_MATCH if saved.get(name) != getattr(self, name)]
        if changed:
            raise MeshplanError(f"cannot resume from {where} with other training settings ({', '.join(changed)}): "
                                f"give the saved values, or start a new --checkpoint-dir")
        if saved.get("steps") != self.steps:
            return [f"--steps {saved.get('steps')} -> {self.steps}: the learning-rate schedule follows "
                    f"the new length from the resumed step"]
        return []


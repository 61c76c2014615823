"""What every engine's import and export share: the imported job (`Imported`), reading a
source that is a file or the text itself, the checks on the numbers a source gives, and the
export folder that never has a user's file replaced."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.inputs import MAX_FILE_BYTES, check_output_path, read_text, shown
from planner.plan import Plan, even_stages


class SplitError(MeshplanError):
    """The engine cannot split the layers over the pipeline stages as the plan does (the
    CLI then exports the even split, simulated again, when it fits)."""


@dataclass
class Imported:
    """A training job as an engine's configuration describes it, in meshplan's terms."""

    engine: str
    """The planner.engines profile that runs it (e.g. megatron-lm@2021 for a `--DDP-impl` line)."""
    engine_options: dict
    fields: dict
    """Plan fields the source sets (global_batch, seq, dp, tp, ..., checkpoint as one mode per
    layer, stages when the engine splits layers its own way)."""
    model: object | None = None
    """The planner.zoo.ModelSpec the source describes; None when it names no model (--model)."""
    notes: list = field(default_factory=list)
    """What the import could not honour exactly, said on the command line (never silently)."""
    pinned: tuple = ()
    """The plan fields the source itself sets (`meshplan plan --from` pins them)."""

    def pins(self) -> dict:
        """{field: value} for `planner.search.plan`: the fields the source sets, a per-layer
        checkpoint list as its one mode (a mix cannot be pinned: the search chooses it)."""
        from dataclasses import fields as dataclass_fields
        defaults = {f.name: f.default for f in dataclass_fields(Plan) if f.name in self.pinned}
        pins = {k: self.fields.get(k, defaults.get(k)) for k in self.pinned}
        if "checkpoint" in pins:
            mode = uniform_mode(pins.pop("checkpoint"))
            if mode is not None:
                pins["checkpoint"] = mode
            else:
                self.notes.append("the imported recompute differs from layer to layer: the search chooses it")
        return pins

    def plan(self, model_name: str | None, cluster_name: str | None) -> Plan:
        """The Plan that runs this job (checked as any plan is)."""
        return Plan(**self.fields, engine=self.engine, engine_options=dict(self.engine_options),
                    model=model_name, cluster=cluster_name)


def source_text(source: str, what: str) -> tuple[str, str]:
    """(text, where): the file `source` names, or `source` itself when it is no file (a launch
    line quoted on the command line). A name that looks like a path but is none gets one line."""
    if not isinstance(source, str) or not source.strip():
        raise MeshplanError(f"{what}: give a file or the text itself, got {shown(source)}")
    path = Path(source)
    try:
        is_file = "\n" not in source and path.is_file()
    except OSError:          # a launch line longer than a file name can be
        is_file = False
    if is_file:
        return read_text(path, what), f"{what} {source!r}"
    if len(source.encode()) > MAX_FILE_BYTES:
        raise MeshplanError(f"{what} is over {MAX_FILE_BYTES // 2**20} MiB")
    if " " not in source.strip() and (os.sep in source or source.endswith((".json", ".sh", ".txt", ".toml"))):
        raise MeshplanError(f"{what} file {source!r} does not exist")
    return source, what


def whole(value, name: str, low: int = 1) -> int:
    """`value` (an int, or the text of one) as an int >= low, else one line naming `name`."""
    if isinstance(value, bool):
        raise MeshplanError(f"{name} takes a whole number, got {shown(value)}")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise MeshplanError(f"{name} takes a whole number, got {value!r}")
        value = int(text)
    if not isinstance(value, int) or value < low:
        raise MeshplanError(f"{name} takes a whole number >= {low}, got {shown(value)}")
    return value


def number(value, name: str) -> float:
    """`value` (a number, or its text) as a float, else one line naming `name`."""
    if isinstance(value, bool):
        raise MeshplanError(f"{name} takes a number, got {shown(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MeshplanError(f"{name} takes a number, got {shown(value)}") from None


def data_parallel(world: int, model_parallel: int, what: str) -> int:
    """world / (tp x pp): every engine here puts the remaining ranks in data parallelism."""
    if world % model_parallel:
        raise MeshplanError(f"{what} = {model_parallel} does not divide the {world} GPUs: change the degrees "
                            f"or the cluster")
    return world // model_parallel


def layer_modes(layers: int, stages: list, modes_of_stage) -> list:
    """One checkpoint mode per layer: `modes_of_stage(k, n)` gives the modes of stage k's n layers."""
    out = []
    for k, (start, end) in enumerate(stages):
        out.extend(modes_of_stage(k, end - start))
    assert len(out) == layers
    return out


def default_stages(layers: int, virtual_stages: int) -> list:
    """meshplan's even split (planner.plan.even_stages), as engines without their own split use."""
    return even_stages(layers, virtual_stages)


def uniform_mode(checkpoint: list) -> str | None:
    """The one mode every layer has ("none" for an empty list), or None for a mix."""
    modes = set(checkpoint) or {"none"}
    return modes.pop() if len(modes) == 1 else None


def stage_prefix_counts(plan: Plan, layers: int) -> list | None:
    """Per virtual stage, how many of its first layers recompute in full when the rest keep
    everything (Megatron-LM's and DeepSpeed's 'block' recompute); None for any other pattern."""
    stages = plan.stages or even_stages(layers, plan.virtual_stages)
    counts = []
    for start, end in stages:
        modes = [plan.checkpoint_for(i) for i in range(start, end)]
        k = sum(1 for m in modes if m == "full")
        if set(modes) - {"full", "none"} or modes[:k] != ["full"] * k:
            return None
        counts.append(k)
    return counts


class ExportFolder:
    """The files of one export, all checked before any is written: each new (unless
    `force`), in a folder that exists or is made."""

    def __init__(self, folder: str, force: bool = False):
        if not isinstance(folder, str) or not folder.strip():
            raise MeshplanError("--export needs --out DIR: the folder to write into")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise MeshplanError(f"--out {folder!r} is a file: with --export, --out names a folder")
        self.force = force
        self.files: dict[str, tuple[str, bool]] = {}

    def add(self, name: str, text: str, executable: bool = False) -> None:
        self.files[name] = (text, executable)

    def write(self) -> list:
        """Write every file (atomically each); return their paths."""
        parent = self.folder.parent
        if not self.folder.exists():
            check_output_path(self.folder, overwrite=False)   # the parent exists and takes new files
        for name in self.files:
            target = self.folder / name
            if target.exists():
                check_output_path(target, overwrite=self.force, force_hint=True)
        if not parent.is_dir():
            raise MeshplanError(f"directory {str(parent)!r} does not exist")
        self.folder.mkdir(exist_ok=True)
        written = []
        for name, (text, executable) in self.files.items():
            target = self.folder / name
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_text(text)
            if executable:
                tmp.chmod(0o755)
            tmp.replace(target)
            written.append(str(target))
        return written

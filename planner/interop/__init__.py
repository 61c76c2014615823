"""Import a job from another training engine's configuration, and export a plan to it.

One module per engine: megatron_lm (+ megatron_lm_export), deepspeed, torchtitan (+
torchtitan_export), and
meshplan (the export to this project's own runtime on many nodes). `import_job` reads an
engine's configuration into an `Imported` (a Plan's fields, the model, the engine profile
and its options); `export_plan` writes what runs a Plan on an engine. The CLI's `--from`
and `--export` (planner/interop/cli.py) are thin layers over these two.
"""
from __future__ import annotations

from cost_models.errors import MeshplanError
from cost_models.inputs import shown
from planner.interop import deepspeed, megatron_lm, megatron_lm_export, meshplan, torchtitan, torchtitan_export
from planner.interop.base import ExportFolder, Imported

IMPORTERS = {"megatron-lm": megatron_lm, "megatron-lm@2021": megatron_lm, "deepspeed": deepspeed,
             "torchtitan": torchtitan}
EXPORTERS = {"megatron-lm": megatron_lm_export, "deepspeed": deepspeed, "torchtitan": torchtitan_export,
             "meshplan": meshplan}
# The engine profiles (planner.engines) each export writes for.
EXPORT_ENGINES = {"megatron-lm": ("megatron-lm", "megatron-lm@2021"), "deepspeed": ("deepspeed",),
                  "torchtitan": ("torchtitan",), "meshplan": ("meshplan",)}


def _named(name, table: dict, what: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in table:
        raise MeshplanError(f"{what} {shown(name)} is not an engine meshplan {what.split()[0]}s; use one of "
                            f"{', '.join(table)}")
    return name.strip().lower()


def importer(name):
    """The module that reads engine `name`'s configuration (one line naming the choices if none)."""
    return IMPORTERS[_named(name, IMPORTERS, "import from")]


def import_job(engine: str, source: str, world: int, model=None, flags: dict | None = None) -> Imported:
    """The job `source` (a file, or a launch line for Megatron-LM) describes on `world` GPUs.
    `model`: a planner.zoo.ModelSpec when the source holds none (DeepSpeed); `flags`: the plan
    fields the caller sets beside it (only those the engine's OPEN lists)."""
    name = _named(engine, IMPORTERS, "import from")
    module = IMPORTERS[name]
    if module is megatron_lm:
        return megatron_lm.read(source, world, model, flags, dialect=name if name.endswith("@2021") else None)
    return module.read(source, world, model, flags)


def export_engines(name) -> tuple:
    """The engine profiles export `name` writes plans of."""
    return EXPORT_ENGINES[_named(name, EXPORTERS, "export to")]


def export_plan(engine: str, plan, spec, cluster, folder: str, force: bool = False, model_text=None) -> list:
    """Write what runs `plan` (of `spec` on `cluster`) on `engine` into `folder`; the paths written.
    Refused in one line when the engine cannot run the plan."""
    from planner.engines import get_engine
    name = _named(engine, EXPORTERS, "export to")
    if plan.engine not in EXPORT_ENGINES[name]:
        raise MeshplanError(f"the plan runs on {plan.engine}; --export {name} writes plans of "
                            f"{' or '.join(EXPORT_ENGINES[name])}: plan with --engine {EXPORT_ENGINES[name][0]}")
    reason = get_engine(plan.engine).refusal(plan)
    if reason:
        raise MeshplanError(f"cannot export to {name}: {reason}")
    out = ExportFolder(folder, force)
    if name == "meshplan":
        meshplan.write(plan, spec, cluster, out, model_text)
    else:
        EXPORTERS[name].write(plan, spec, cluster, out)
    return out.write()


def check_export_folder(engine: str, folder: str, force: bool = False) -> None:
    """Before any search: the folder can be written and holds none of the export's files (unless force)."""
    from cost_models.inputs import check_output_path
    from pathlib import Path
    name = _named(engine, EXPORTERS, "export to")
    out = ExportFolder(folder, force)
    if not out.folder.exists():
        check_output_path(out.folder)
        return
    for file in EXPORTERS[name].FILES:
        target = Path(folder) / file
        if target.exists():
            check_output_path(target, overwrite=force, force_hint=True)


__all__ = ["EXPORTERS", "IMPORTERS", "ExportFolder", "Imported", "check_export_folder", "export_engines",
           "export_plan", "import_job", "importer"]

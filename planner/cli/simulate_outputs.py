"""What `meshplan simulate` writes beside its table: the Chrome trace, the two pictures, the
HTML report, and - for a plan that does not fit - the line saying by how much and what fits."""
from __future__ import annotations

import json

from cost_models.inputs import check_output_path
from planner.cli import outputs
from planner.cli.flags import check_image_path


def write_outputs(args, plan, result, spec, cluster, compute, comm, calibration: str) -> str | None:
    """Write every output the flags ask for (a "wrote" line each); return the does-not-fit
    line (planner.simulate.fit.advice), or None when the plan fits."""
    from planner.cli import plots
    title = plots.plan_title(spec.name, cluster.name, plan)
    if args.trace:
        from planner.simulate.chrome_trace import chrome_trace
        write_new(args.trace, json.dumps(chrome_trace(result, title)), args.force)
        outputs.wrote(args, args.trace)
    for target, draw in ((args.timeline, plots.timeline_png), (args.memory_plot, plots.memory_png)):
        if target:
            check_image_path(target, overwrite=args.force)
            draw(result, target, title=title)
            outputs.wrote(args, target)
    misfit = None
    if not result.fits:
        from planner.simulate.fit import advice
        with outputs.progress("looking for the nearest plan that fits"):
            misfit = advice(plan, result, spec, cluster, compute, comm)
    if args.html:
        from planner.report import simulate_report
        outputs.write_html(args, simulate_report(plan, result, spec.name, cluster.name, calibration,
                                                 outputs.command_line(args), misfit))
    return misfit


def write_new(path: str, text: str, overwrite: bool = False) -> None:
    check_output_path(path, overwrite=overwrite)
    with open(path, "w" if overwrite else "x") as f:   # "x": never replaces a file that appeared meanwhile
        f.write(text)

"""`meshplan profile`: measure this machine (cost_models.profiling) into a calibration JSON
and print its summary."""
from __future__ import annotations

import argparse

from cost_models.profiling import profile_device, rank, summary_lines
from planner.cli.flags import Parser

HELP = ("measure this machine's GEMMs, attention, copies, a checkpoint save (and collectives) into a "
        "calibration JSON")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `meshplan profile` options, for this module's parser or a CLI subparser."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", required=True, help="calibration file to write (.json)")
    parser.add_argument("--gpu", help="catalogue name this calibration belongs to (default: cpu for --device cpu)")
    parser.add_argument("--quick", action="store_true", help="small grid and short timings")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--save-dir", metavar="DIR",
                        help="where to time a checkpoint save, on the storage training will write to "
                             "(default: the folder of --out; the save is removed after timing)")
    return parser


def build_parser(prog: str = "meshplan profile") -> argparse.ArgumentParser:
    return add_arguments(Parser(prog=prog, description="Measure this machine and write a calibration JSON."))


def run(args: argparse.Namespace) -> int:
    """Handler for parsed `meshplan profile` arguments: profile, write, print a summary."""
    from planner.cli.outputs import progress
    with progress(f"measuring {args.device}" + (" (quick)" if args.quick else "")):
        calibration = profile_device(args.device, args.out, quick=args.quick, gpu=args.gpu, force=args.force,
                                     save_dir=args.save_dir)
    print("\n".join(summary_lines(calibration)))
    if rank() == 0:
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    """`meshplan profile` on its own: raises MeshplanError on user mistakes (the CLI prints them)."""
    return run(build_parser().parse_args(argv))

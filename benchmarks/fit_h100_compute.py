"""Build the shipped H100 calibration from the reference measurements and report its fit.

    python benchmarks/fit_h100_compute.py [--reference shared/reference/h100/measured.jsonl]
                                          [--out cost_models/data/h100-sxm-80gb.json] [--check]

Reads `shared/reference/h100/measured.jsonl` (one NVIDIA H100 80GB HBM3, PyTorch
2.11/CUDA 13: 36 GEMMs in bf16/fp16/fp32/tf32, a 1 GiB device copy, 3 causal bf16
flash-attention cases), fits the calibration (see cost_models/calibration.py), writes it,
and prints predicted vs measured per case with mean absolute percentage errors:
- in-sample: the shipped fit (all shapes) on all shapes;
- held-out: a fit on 6 of the 9 GEMM shapes per precision, scored on the other 3
  (HELD_OUT_SHAPES: a square mid-size, a tall-skinny and the GPT-2 LM head), and a
  leave-one-shape-out pass (fit on 8 shapes, score the 9th, for each shape).
`--check` compares against the existing file instead of writing it (exit 1 if stale).
The training-step rows of measured.jsonl are not used: they are the simulator's test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cost_models.calibration import (Calibration, build_calibration, mape, measurements_from_reference, predict_attention_row,  # noqa: E402
                                     predict_matmul_row, summary_lines)
from cost_models.compute import ComputeModel  # noqa: E402
from cost_models.hardware import get_gpu  # noqa: E402

DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "h100" / "measured.jsonl"
DEFAULT_OUT = REPO / "cost_models" / "data" / "h100-sxm-80gb.json"
HELD_OUT_SHAPES = ((4096, 4096, 4096), (16384, 4096, 1024), (4096, 768, 50304))
SOURCE = ("shared/reference/h100/measured.jsonl (NVIDIA H100 80GB HBM3, torch 2.11.0+cu130; GEMMs "
          "timed as 10 back-to-back launches, the copy as 10 copies of 1 GiB, flash attention as one "
          "single-shot call per direction); fitted by benchmarks/fit_h100_compute.py")


def shape(row: dict) -> tuple:
    return row["m"], row["k"], row["n"]


def refit_without(measurements: dict, shapes, gpu) -> ComputeModel:
    """A model fitted with the GEMM rows of `shapes` removed."""
    kept = dict(measurements, matmul=[r for r in measurements["matmul"] if shape(r) not in shapes])
    return ComputeModel(gpu, build_calibration(gpu, kept, "held-out fit"))


def print_matmul_table(model: ComputeModel, holdout_model: ComputeModel, rows: list) -> None:
    print(f"{'prec':5} {'M':>6} {'K':>6} {'N':>6} {'measured us':>12} {'fit us':>9} {'err %':>6} "
          f"{'held-out us':>12} {'err %':>6}  split")
    for r in rows:
        fit_s, held_s = predict_matmul_row(model, r), predict_matmul_row(holdout_model, r)
        split = "test" if shape(r) in HELD_OUT_SHAPES else "train"
        print(f"{r['precision']:5} {r['m']:6} {r['k']:6} {r['n']:6} {r['seconds'] * 1e6:12.1f} "
              f"{fit_s * 1e6:9.1f} {100 * (fit_s / r['seconds'] - 1):+6.1f} {held_s * 1e6:12.1f} "
              f"{100 * (held_s / r['seconds'] - 1):+6.1f}  {split}")


def leave_one_shape_out(measurements: dict, gpu) -> list:
    errors = []
    for s in sorted({shape(r) for r in measurements["matmul"]}):
        model = refit_without(measurements, (s,), gpu)
        errors += [abs(predict_matmul_row(model, r) / r["seconds"] - 1)
                   for r in measurements["matmul"] if shape(r) == s]
    return errors


def report(calibration: Calibration, measurements: dict, gpu) -> None:
    model = ComputeModel(gpu, calibration)
    holdout = refit_without(measurements, HELD_OUT_SHAPES, gpu)
    rows = measurements["matmul"]
    print_matmul_table(model, holdout, rows)
    train = [r for r in rows if shape(r) not in HELD_OUT_SHAPES]
    test = [r for r in rows if shape(r) in HELD_OUT_SHAPES]
    errs = [abs(predict_matmul_row(model, r) / r["seconds"] - 1) for r in rows]
    print(f"\nGEMM in-sample (fit on all {len(rows)}): MAPE {mape([predict_matmul_row(model, r) for r in rows], [r['seconds'] for r in rows]):.1f}%, "
          f"max {100 * max(errs):.1f}%")
    for name, part in (("train", train), ("held-out", test)):
        predicted = [predict_matmul_row(holdout, r) for r in part]
        worst = max(abs(p / r["seconds"] - 1) for p, r in zip(predicted, part))
        print(f"GEMM split fit, {name} ({len(part)} rows): MAPE {mape(predicted, [r['seconds'] for r in part]):.1f}%, "
              f"max {100 * worst:.1f}%")
    loo = leave_one_shape_out(measurements, gpu)
    print(f"GEMM leave-one-shape-out ({len(loo)} rows): MAPE {100 * sum(loo) / len(loo):.1f}%, max {100 * max(loo):.1f}%")
    print(f"\n{'attention B,H,T,D':22} {'fwd meas us':>11} {'fit':>7} {'err %':>6} {'bwd meas us':>11} {'fit':>7} {'err %':>6}")
    for r in measurements["attention"]:
        fwd, bwd = predict_attention_row(model, r, False), predict_attention_row(model, r, True)
        label = f"{r['batch']},{r['heads']},{r['seq_q']},{r['head_dim']}"
        print(f"{label:22} {r['fwd_s'] * 1e6:11.1f} {fwd * 1e6:7.1f} {100 * (fwd / r['fwd_s'] - 1):+6.1f} "
              f"{r['bwd_s'] * 1e6:11.1f} {bwd * 1e6:7.1f} {100 * (bwd / r['bwd_s'] - 1):+6.1f}")
    copy = measurements["copy"][0]
    predicted = model.memory_bound_time_s(2 * copy["bytes"])
    print(f"\ncopy {copy['bytes'] / 2 ** 30:.0f} GiB: measured {copy['seconds'] * 1e6:.1f} us, model {predicted * 1e6:.1f} us "
          f"({100 * (predicted / copy['seconds'] - 1):+.1f}%; includes the kernel overhead)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out differs from a fresh fit")
    args = parser.parse_args(argv)
    gpu = get_gpu("h100-sxm-80gb")
    measurements, device = measurements_from_reference(args.reference)
    calibration = build_calibration(gpu, measurements, SOURCE, device)
    print("\n".join(summary_lines(calibration)) + "\n")
    report(calibration, measurements, gpu)
    text = json.dumps(calibration.to_dict(), indent=1) + "\n"
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"\n{args.out}: {'up to date' if same else 'STALE: re-run without --check'}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predicted vs measured: single-H100 training steps (shared/reference/h100/measured.jsonl).

    python benchmarks/accuracy.py [--reference DIR] [--json]
    python benchmarks/accuracy.py --calibration h100.json   # score a `meshplan profile --device cuda` file

For each measured case, builds the same model (untied head, the case's vocab and
shapes, as in the reference measure.py), a one-GPU plan (dp=tp=pp=1, no accumulation)
and prints predicted vs measured peak allocated memory and step time, then the MAPEs.
Three H100 constants are fitted on these steps (benchmarks/fit_h100_compute.py, stage 2:
sustained 16-bit GEMM rate, host time per op, host/device overlap), so the time MAPE
printed here is in-sample; that script also prints the leave-one-model-out MAPE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from cost_models.calibration import Calibration
from cost_models.compute import ComputeModel
from cost_models.errors import MeshplanError
from cost_models.hardware import get_gpu
from planner.plan import Plan
from planner.simulate import simulate
from planner.zoo import load_model

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def h100_cases(reference: Path) -> list[dict]:
    rows = [json.loads(line) for line in (reference / "h100" / "measured.jsonl").read_text().splitlines()]
    return [r for r in rows if "kind" not in r]


def predict(case: dict, compute=None):
    """The simulated step of one measured case; `compute` overrides the shipped H100 model (fits)."""
    config = dict(arch=case["arch"], layers=case["layers"], hidden=case["hidden"], heads=case["heads"],
                  vocab=case["vocab"], ffn=case["ffn"], max_seq=max(case["seq"], 1024),
                  tie_embeddings=False, name=case["model"])
    if case["arch"] == "llama":
        config["kv_heads"] = case["kv_heads"]
    spec = load_model(config)
    layers = case["layers"]
    plan = Plan(micro_batch=case["micro_batch"], global_batch=case["micro_batch"], seq=case["seq"],
                precision=case["precision"], checkpoint=[case["checkpoint"]] * layers)
    return simulate(plan, spec, "h100-sxm-80gb:1x1", compute=compute)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calibration", type=Path,
                        help="an H100 calibration file to score instead of the shipped one")
    args = parser.parse_args(argv)
    try:
        compute = ComputeModel(get_gpu("h100-sxm-80gb"), Calibration.load(args.calibration)) if args.calibration else None
    except MeshplanError as exc:
        parser.error(str(exc))
    mem_err, time_err, rows = [], [], []
    print(f"{'case':42s} {'mem pred':>9s} {'mem meas':>9s} {'err':>7s} {'t pred ms':>10s} {'t meas ms':>10s} {'err':>7s}")
    for case in h100_cases(args.reference):
        if case.get("status") != "ok":
            continue
        result = predict(case, compute)
        mem = result.worst_stage.peak_allocated_bytes
        mem_e = (mem - case["peak_allocated_bytes"]) / case["peak_allocated_bytes"]
        t_e = (result.step_time_s - case["step_time_s_median"]) / case["step_time_s_median"]
        mem_err.append(abs(mem_e))
        time_err.append(abs(t_e))
        name = f"{case['model']} s{case['seq']} b{case['micro_batch']} {case['precision']} {case['checkpoint']}"
        rows.append(dict(case=name, mem_pred=mem, mem_meas=case["peak_allocated_bytes"], time_pred=result.step_time_s,
                         time_meas=case["step_time_s_median"], fits=result.fits))
        print(f"{name:42s} {mem / 1e9:9.2f} {case['peak_allocated_bytes'] / 1e9:9.2f} {100 * mem_e:+6.1f}% "
              f"{1e3 * result.step_time_s:10.1f} {1e3 * case['step_time_s_median']:10.1f} {100 * t_e:+6.1f}%"
              f"{'' if result.fits else '  (predicted not to fit)'}")
    print(f"\nH100 single-GPU, {len(mem_err)} cases: peak-allocated MAPE {100 * statistics.mean(mem_err):.1f}% "
          f"(median {100 * statistics.median(mem_err):.1f}%), step-time MAPE {100 * statistics.mean(time_err):.1f}% "
          f"(median {100 * statistics.median(time_err):.1f}%), predicted to fit: {sum(r['fits'] for r in rows)}/{len(rows)}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

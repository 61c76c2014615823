"""Fit the per-op host overhead of eager PyTorch on vTrain's single-node runs; score held-out rows.

    python benchmarks/fit_host_overhead.py [--stride 4]

One empirical constant of the A100 calibration (`host_s_per_op`): the host time per
launched aten op of eager PyTorch on those DGX-A100 hosts. Fitted by a grid search on the
even-numbered rows of shared/reference/vtrain/single_node.json, scored on the
odd-numbered rows. The multi-node file is never read here. With --write, saves
cost_models/data/a100-sxm-80gb.json: the H100 efficiencies transferred to the A100
datasheet (default_calibration) plus the fitted host time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vtrain import DEFAULT_REFERENCE, predict_ms  # noqa: E402

from cost_models.calibration import default_calibration  # noqa: E402
from cost_models.hardware import get_gpu  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "cost_models" / "data" / "a100-sxm-80gb.json"
GRID_US = (0, 20, 30, 35, 40, 45, 50, 60)


def errors(rows, host_s: float) -> list:
    return [(predict_ms(row, host_s) - row["iteration_time_ms"]) / row["iteration_time_ms"] for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--stride", type=int, default=4, help="use every Nth training row (speed)")
    parser.add_argument("--write", action="store_true", help="save the A100 calibration with the fitted value")
    args = parser.parse_args(argv)
    rows = json.loads((args.reference / "vtrain" / "single_node.json").read_text())["rows"]
    train, test = rows[0::2][:: args.stride], rows[1::2]
    best = None
    for us in GRID_US:
        errs = errors(train, us * 1e-6)
        mape = statistics.mean(map(abs, errs))
        print(f"{us:3d} us/op: train MAPE {100 * mape:5.1f}%  mean signed {100 * statistics.mean(errs):+5.1f}%",
              flush=True)
        if best is None or mape < best[1]:
            best = (us, mape)
    held = errors(test, best[0] * 1e-6)
    print(f"chosen {best[0]} us/op; held-out (odd rows, {len(test)} runs): MAPE "
          f"{100 * statistics.mean(map(abs, held)):.1f}%, median {100 * statistics.median(map(abs, held)):.1f}%")
    if args.write:
        gpu = get_gpu("a100-sxm-80gb")
        calibration = replace(
            default_calibration(gpu), host_s_per_op=best[0] * 1e-6,
            source=f"H100 efficiencies transferred to the A100 datasheet; host_s_per_op {best[0]} us fitted on "
                   f"vTrain single-node even rows (benchmarks/fit_host_overhead.py)")
        calibration.save(OUT, force=True)
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

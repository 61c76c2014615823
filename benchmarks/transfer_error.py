"""How far off a transferred calibration is: the H100 fit transferred to the A100 datasheet
(what a GPU that was never measured gets: Calibration.transferred_to), scored on vTrain's
measured A100 Megatron runs beside the shipped A100 fit, on the same evenly spaced rows.

    python benchmarks/transfer_error.py            # ~120 single-node and 109 multi-node runs

Its MAPE is the uncertainty `meshplan compare` shows for clusters whose GPU's calibration is
transferred (planner.compare.TRANSFERRED_UNCERTAINTY; docs/accuracy.md).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vtrain import DEFAULT_REFERENCE, predict_ms  # noqa: E402

from cost_models import get_gpu  # noqa: E402
from cost_models.calibration import shipped_calibration  # noqa: E402
from cost_models.compute import ComputeModel  # noqa: E402

ROWS_PER_SET = 120


def main() -> int:
    gpu = get_gpu("a100-sxm-80gb")
    models = {"H100 fit transferred to the A100": ComputeModel(gpu, shipped_calibration("h100-sxm-80gb")
                                                               .transferred_to(gpu)),
              "shipped A100 fit": ComputeModel(gpu)}
    for name in ("single_node.json", "multi_node.json"):
        rows = json.loads((DEFAULT_REFERENCE / "vtrain" / name).read_text())["rows"]
        rows = rows[:: max(1, len(rows) // ROWS_PER_SET)]
        for label, compute in models.items():
            errors = [(predict_ms(r, compute) - r["iteration_time_ms"]) / r["iteration_time_ms"] for r in rows]
            absolute = sorted(map(abs, errors))
            print(f"{name} {label}: {len(rows)} runs, MAPE {100 * statistics.mean(absolute):.1f}%, "
                  f"median {100 * statistics.median(absolute):.1f}%, p90 {100 * absolute[int(0.9 * len(absolute))]:.1f}%, "
                  f"mean signed {100 * statistics.mean(errors):+.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`meshplan profile`: measure this machine into a calibration JSON (cost_models.calibration)."""
from __future__ import annotations

from cost_models.calibration import add_arguments, run  # noqa: F401  (the subcommand's flags and handler)

HELP = "measure this machine's GEMMs, attention, copies (and collectives) into a calibration JSON"

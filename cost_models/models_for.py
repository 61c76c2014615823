"""The compute and communication models a CLI command runs on: built on a calibration
file, or the simulator's defaults (a layer above compute.py and comm.py)."""
from __future__ import annotations

from cost_models.calibration import Calibration, default_calibration
from cost_models.comm import CommModel
from cost_models.compute import ComputeModel


def cost_models_for(cluster, path=None) -> tuple:
    """(compute, comm, calibration) for the CLI: with `path`, models built on that
    `meshplan profile` file; without, (None, None) - the simulator's own defaults - and the
    calibration those use, whose source the report names."""
    if not path:
        return None, None, default_calibration(cluster.gpu)
    calibration = Calibration.load(path)
    return ComputeModel(cluster.gpu, calibration), CommModel(cluster, calibration), calibration

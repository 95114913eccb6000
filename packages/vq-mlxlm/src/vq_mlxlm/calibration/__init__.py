"""Calibration on a model: capture keys/values, probe sensitivity, train (vq-calibrate) and
write artifacts. ``calibrate(model, method, bits, out=DIR)`` does it all."""

from vq_mlxlm.calibration.options import (
    METHODS,
    CalibrationOptions,
    check_model_options,
    check_options,
)
from vq_mlxlm.calibration.run import calibrate
from vq_mlxlm.evaluation.text import calibration_text

__all__ = [
    "METHODS",
    "CalibrationOptions",
    "calibrate",
    "calibration_text",
    "check_model_options",
    "check_options",
]

"""vq-calibrate: activation capture, PCA rotations, k-means codebooks, sensitivity probing
and the safetensors artifact store. ``calibrate(model, method, bits, out=DIR)`` does it all.
"""

from vq_calibrate.calibrate import METHODS, calibrate, check_options
from vq_calibrate.ratequant import allocate, load_allocation
from vq_calibrate.store import SafetensorsStore, check_model
from vq_calibrate.text import calibration_text, evaluation_text

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SafetensorsStore",
    "allocate",
    "calibrate",
    "calibration_text",
    "check_model",
    "check_options",
    "evaluation_text",
    "load_allocation",
]

"""vq-calibrate: trainers on arrays, and the artifacts they write.

Feed a :class:`Capture` with key/value batches (numpy ``[B, H, L, D]``), then
``train(method, capture, bits, out=DIR, version=...)`` writes ``DIR/<method>.safetensors``
in the format of :mod:`vq_core.artifacts`. Trainers: PCA rotations (spectral), k-means
product codebooks (vecinfer), CommVQ's EM; :func:`allocate` solves RateQuant's per-layer
bit allocation. Nothing here runs a model: capture from an mlx-lm model, sensitivity
probing and ``calibrate(model, ...)`` live in ``vq_mlxlm.calibration``.
"""

from vq_calibrate.capture import Capture, Reservoir
from vq_calibrate.ratequant import allocate, load_allocation
from vq_calibrate.store import SafetensorsStore, check_model
from vq_calibrate.train import TRAINERS, train, train_comm_vq, train_spectral, train_vecinfer

__version__ = "0.1.0"

__all__ = [
    "TRAINERS",
    "Capture",
    "Reservoir",
    "SafetensorsStore",
    "allocate",
    "check_model",
    "load_allocation",
    "train",
    "train_comm_vq",
    "train_spectral",
    "train_vecinfer",
]

# Names that ran a model, moved to vq-mlxlm (vq-calibrate never imports it).
_MOVED = {
    "METHODS": "vq_mlxlm.calibration.METHODS",
    "calibrate": "vq_mlxlm.calibration.calibrate",
    "check_options": "vq_mlxlm.calibration.check_options",
    "calibration_text": "vq_mlxlm.calibration.calibration_text",
    "evaluation_text": "vq_mlxlm.evaluation.text.default_text(held_out=True)",
}


def __getattr__(name: str):
    if name in _MOVED:  # an ImportError, so ``from vq_calibrate import calibrate`` says where
        raise ImportError(
            f"vq_calibrate.{name} moved to {_MOVED[name]} (everything that runs a model lives "
            "in vq-mlxlm; vq-calibrate trains on arrays)"
        )
    raise AttributeError(f"module 'vq_calibrate' has no attribute {name!r}")

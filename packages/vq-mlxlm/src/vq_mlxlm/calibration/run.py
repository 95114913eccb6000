"""``calibrate(model, method, bits, text=None, out=DIR)``: capture, train, save atomically.

Methods: ``spectral``, ``vecinfer`` and ``comm_vq`` (quantizers in vq-algorithms, trained
by vq-calibrate from keys/values captured here; comm_vq from per-head pre-RoPE keys) and
``ratequant`` (a per-layer bit allocation over ``base_method``, from probed sensitivity).
The artifact is ``<out>/<method>.safetensors``; ``patch(model, method,
artifacts=out)`` uses it (for ratequant, ``patch(model, base_method, artifacts=out)``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from vq_algorithms.comm_vq import CommVQConfig
from vq_algorithms.vecinfer import CODEBOOK_SIZE
from vq_calibrate import allocate, train
from vq_calibrate.ratequant import VERSION as RATEQUANT_VERSION
from vq_calibrate.ratequant import default_options
from vq_core import ArtifactStore, ConfigError, get
from vq_mlxlm.calibration.capture import capture
from vq_mlxlm.calibration.options import check_model_options, check_options
from vq_mlxlm.calibration.probe import probe
from vq_mlxlm.evaluation.text import calibration_text
from vq_mlxlm.model_shape import model_fingerprint, model_kv_shape, model_ropes


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from vq_mlxlm.default_model import load_model

        return load_model(str(model))
    return model


def token_sequences(tokens: list[int], n_sequences: int, seq_len: int) -> list[list[int]]:
    """Up to ``n_sequences`` consecutive, non-overlapping windows of ``seq_len`` tokens."""
    n = min(n_sequences, len(tokens) // seq_len)
    if n == 0:
        raise ConfigError(f"text has {len(tokens)} tokens; need at least seq_len={seq_len}")
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def calibrate(
    model: Any = "default",
    method: str = "spectral",
    bits: float = 2,
    text: str | None = None,
    out: str | os.PathLike = "artifacts",
    progress: bool = True,
    **options: Any,
) -> Path:
    """Calibrate ``method`` on ``model`` and write ``<out>/<method>.safetensors``.

    Args:
        model: ``"default"``, a model path, or a loaded ``(model, tokenizer)`` pair.
        bits: the width the codebooks are trained for (vecinfer), or the average budget
            (ratequant, e.g. 2.5); spectral's artifact serves every width.
        text: calibration text (default :func:`~vq_mlxlm.evaluation.text.calibration_text`).
        options: :class:`~vq_mlxlm.calibration.options.CalibrationOptions` fields
            (``n_sequences``, ``seq_len``, ``max_samples``, ``seed``, ``base_method``,
            ``probe_sequences``, ``head_samples``, ``table_bits``), checked before the model
            is used.
    Returns:
        The artifact's path.
    """
    o = check_options(method, bits, out=out, **options)
    net, tokenizer = _load(model)
    shape = model_kv_shape(net)
    check_model_options(method, bits, shape.layers, shape.head_dim, o.table_bits)
    text = calibration_text() if text is None else text
    sequences = token_sequences(tokenizer.encode(text), o.n_sequences, o.seq_len)
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    if method == "ratequant":
        widths = default_options(bits, get(o.base_method).config_class.allowed_bits)
        sens = probe(
            net,
            sequences[: o.probe_sequences],
            o.base_method,
            widths,
            prefix=o.seq_len // 2,
            chunk=max(o.seq_len // 16, 1),
            progress=progress,
        )
        arrays = {
            "sensitivity": sens.astype("float32"),
            "bits_options": np.array(widths, dtype="int32"),
            "allocation": np.array(allocate(sens, widths, bits), dtype="int32"),
        }
        meta = {
            "text_sha256": text_sha256,
            "bits": bits,
            "method": "ratequant",
            "version": RATEQUANT_VERSION,
            "base_method": o.base_method,
            "fingerprint": model_fingerprint(net),
        }
        return ArtifactStore(out).save(method, arrays, meta)
    ropes, trainer, config = None, {}, None
    if method == "comm_vq":
        ropes = model_ropes(net, shape.head_dim)
        stages = CommVQConfig(head_dim=shape.head_dim, bits=int(bits), table_bits=o.table_bits)
        trainer = {"ropes": ropes, "stages": stages.stages, "table_bits": o.table_bits}
        trainer["seed"] = o.seed
        config = {"table_bits": o.table_bits}  # what patch() passes to the quantizer
    elif method == "vecinfer":
        trainer = {"codebook_size": CODEBOOK_SIZE}
    cap = capture(
        net,
        sequences,
        text_sha256=text_sha256,
        max_samples=o.max_samples,
        seed=o.seed,
        progress=progress,
        head_samples=o.head_samples if method == "comm_vq" else 0,
        ropes=ropes,
    )
    version = get(method).config_class.version
    return train(method, cap, bits, out, version=version, config=config, progress=progress,
                 **trainer)  # fmt: skip

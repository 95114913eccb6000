"""``calibrate(model, method, bits, text=None, out=DIR)``: capture, train, save atomically.

Methods: ``spectral``, ``vecinfer`` and ``comm_vq`` (quantizers in vq-algorithms, trained
from captured keys/values; comm_vq from per-head pre-RoPE keys) and ``ratequant`` (a
per-layer bit allocation over ``base_method``, from probed sensitivity). The artifact is ``<out>/<method>.safetensors``; use it with
``create(method, artifact=out, layer=i, kind="k"|"v", ...)`` or, for ratequant,
``patch(model, base_method, bits=load_allocation(out))``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vq_calibrate import ratequant
from vq_calibrate.capture import capture, model_fingerprint
from vq_calibrate.store import SafetensorsStore
from vq_calibrate.text import calibration_text, text_sha256, token_sequences
from vq_calibrate.train import TRAINERS

METHODS = (*TRAINERS, "ratequant")


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from vq_mlxlm.default_model import load_model

        return load_model(str(model))
    return model


def calibrate(
    model: Any = "default",
    method: str = "spectral",
    bits: float = 2,
    text: str | None = None,
    out: str | os.PathLike = "artifacts",
    progress: bool = True,
    *,
    n_sequences: int = 64,
    seq_len: int = 512,
    max_samples: int = 16384,
    seed: int = 0,
    base_method: str = "turboquant_mse",
    probe_sequences: int = 4,
    head_samples: int = 2048,
    table_bits: int = 6,
) -> Path:
    """Calibrate ``method`` on ``model`` and write ``<out>/<method>.safetensors``.

    Args:
        model: ``"default"``, a model path, or a loaded ``(model, tokenizer)`` pair.
        bits: the width the codebooks are trained for (vecinfer), or the average budget
            (ratequant, e.g. 2.5); spectral's artifact serves every width.
        text: calibration text (default :func:`~vq_calibrate.text.calibration_text`).
        head_samples, table_bits: comm_vq's tokens per layer for EM and table size
            (``2**table_bits`` entries, ``4**table_bits`` codewords per stage).
    Returns:
        The artifact's path.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: calibrated methods are {METHODS}")
    net, tokenizer = _load(model)
    text = calibration_text() if text is None else text
    sequences = token_sequences(tokenizer.encode(text), n_sequences, seq_len)
    meta: dict[str, Any] = {"text_sha256": text_sha256(text), "bits": bits}
    store = SafetensorsStore(out)
    if method == "ratequant":
        from vq_core import get

        allowed = get(base_method).config_class.allowed_bits
        options = ratequant.default_options(bits, allowed)
        sens = ratequant.probe(
            net,
            sequences[:probe_sequences],
            base_method,
            options,
            prefix=seq_len // 2,
            chunk=max(seq_len // 16, 1),
            progress=progress,
        )
        alloc = ratequant.allocate(sens, options, bits)
        caches_shape = _kv_shape(net)
        arrays = {
            "sensitivity": sens.astype("float32"),
            "bits_options": np.array(options, dtype="int32"),
            "allocation": np.array(alloc, dtype="int32"),
        }
        meta |= {
            "method": "ratequant",
            "version": ratequant.VERSION,
            "base_method": base_method,
            "fingerprint": model_fingerprint(net, caches_shape[1], caches_shape[0]),
        }
    else:
        from vq_core import get

        ropes, options = None, {}
        if method == "comm_vq":
            from vq_mlxlm.model_shape import model_ropes

            ropes = model_ropes(net, _kv_shape(net)[1])
            options = {"ropes": ropes, "table_bits": table_bits, "seed": seed}
            meta["config"] = {"table_bits": table_bits}  # what patch() passes to the quantizer
        cap = capture(
            net,
            sequences,
            text_sha256=meta["text_sha256"],
            max_samples=max_samples,
            seed=seed,
            progress=progress,
            head_samples=head_samples if method == "comm_vq" else 0,
            ropes=ropes,
        )
        arrays, extra = TRAINERS[method](cap, int(bits), progress=progress, **options)
        meta |= extra | {
            "method": method,
            "version": get(method).config_class.version,
            "fingerprint": cap.fingerprint,
        }
    store.save(method, arrays, meta)
    return store.path(method)


def _kv_shape(model) -> tuple[int, int]:
    """(kv_heads, head_dim) of a loaded mlx-lm model."""
    from vq_mlxlm.model_shape import model_kv_shape

    s = model_kv_shape(model)
    return s.kv_heads, s.head_dim

"""``calibrate(model, method, bits, text=None, out=DIR)``: capture, train, save atomically.

Methods: ``spectral``, ``vecinfer`` and ``comm_vq`` (quantizers in vq-algorithms, trained
from captured keys/values; comm_vq from per-head pre-RoPE keys) and ``ratequant`` (a
per-layer bit allocation over ``base_method``, from probed sensitivity). The artifact is ``<out>/<method>.safetensors``; use it with
``create(method, artifact=out, layer=i, kind="k"|"v", ...)`` or, for ratequant,
``patch(model, base_method, bits=load_allocation(out))``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vq_calibrate import ratequant
from vq_calibrate.capture import capture, model_fingerprint
from vq_calibrate.store import SafetensorsStore
from vq_calibrate.text import calibration_text, text_sha256, token_sequences
from vq_calibrate.train import TRAINERS
from vq_core import invalid_choice

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
    check_options(
        method,
        bits,
        n_sequences=n_sequences,
        seq_len=seq_len,
        max_samples=max_samples,
        seed=seed,
        base_method=base_method,
        probe_sequences=probe_sequences,
        head_samples=head_samples,
        table_bits=table_bits,
        out=out,
    )
    net, tokenizer = _load(model)
    _, head_dim = _kv_shape(net)
    check_model_options(method, bits, len(net.layers), head_dim, table_bits)
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

            ropes = model_ropes(net, head_dim)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    method: str,
    bits: float,
    *,
    n_sequences: int = 64,
    seq_len: int = 512,
    max_samples: int = 16384,
    seed: int = 0,
    base_method: str = "turboquant_mse",
    probe_sequences: int = 4,
    head_samples: int = 2048,
    table_bits: int = 6,
    out: str | os.PathLike = "artifacts",
) -> None:
    """ConfigError naming the argument (``name=value``) for anything :func:`calibrate` would
    fail on, before a model is loaded: the widths each trainer can produce, counts, the
    output directory."""
    from vq_core import get, invalid

    invalid_choice("method", method, METHODS)
    counts = [("n_sequences", n_sequences, 1), ("seq_len", seq_len, 2), ("seed", seed, 0)]
    counts += [("max_samples", max_samples, 1), ("probe_sequences", probe_sequences, 1)]
    if method == "comm_vq":
        counts.append(("head_samples", head_samples, 1))
    for name, value, low in counts:
        if not _is_int(value) or value < low:
            raise invalid(name, value, f"an integer >= {low}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise invalid("bits", bits, "a number")
    if method == "ratequant":
        base = get(base_method)
        if base.needs_calibration:
            raise invalid("base_method", base_method, "a method that needs no calibration")
        allowed = base.config_class.allowed_bits
        if not min(allowed) <= bits <= max(allowed):
            raise invalid("bits", bits, f"a mean within {base_method}'s widths {allowed}")
    else:
        allowed = get(method).config_class.allowed_bits
        if bits != int(bits) or int(bits) not in allowed:
            raise invalid("bits", bits, f"one of {allowed} (the widths {method} trains)")
    if method == "comm_vq" and table_bits not in range(1, 7):
        raise invalid("table_bits", table_bits, "an integer in 1..6")
    if Path(out).exists() and not Path(out).is_dir():
        raise invalid("out", str(out), "a directory (this path is a file)")


def check_model_options(method: str, bits: float, layers: int, head_dim: int, table_bits: int):
    """ConfigError for what only the loaded model's shape rules out, before any capture."""
    from vq_core import ConfigError, get, invalid

    if method == "ratequant":
        if abs(bits * layers - round(bits * layers)) > 1e-9:
            raise invalid("bits", bits, f"a mean that {layers} layers can meet in whole bits")
        return
    extra = {"table_bits": table_bits} if method == "comm_vq" else {}
    config = get(method).config_class
    try:
        config(head_dim=head_dim, bits=int(bits), untrained=True, **extra)
    except ConfigError as e:
        raise ConfigError(f"bits={bits!r} at this model's head_dim={head_dim}: {e}") from None


def _kv_shape(model) -> tuple[int, int]:
    """(kv_heads, head_dim) of a loaded mlx-lm model."""
    from vq_mlxlm.model_shape import model_kv_shape

    s = model_kv_shape(model)
    return s.kv_heads, s.head_dim

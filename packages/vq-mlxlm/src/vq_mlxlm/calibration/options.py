"""The options of :func:`vq_mlxlm.calibration.calibrate`, with their one set of defaults,
checked before a model is loaded (:func:`check_options`) and against its shape
(:func:`check_model_options`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vq_algorithms  # noqa: F401  (registers the methods even without installed entry points)
from vq_core import ConfigError, get, invalid, invalid_choice

TRAINED = ("spectral", "vecinfer", "comm_vq")
METHODS = (*TRAINED, "ratequant")


@dataclass(frozen=True)
class CalibrationOptions:
    """``n_sequences`` windows of ``seq_len`` calibration tokens; at most ``max_samples``
    vectors per layer and kind kept for k-means; ``seed`` for sampling and training;
    ratequant: ``base_method`` probed on ``probe_sequences`` windows; comm_vq:
    ``head_samples`` tokens per layer for EM and ``2**table_bits`` entries per table."""

    n_sequences: int = 64
    seq_len: int = 512
    max_samples: int = 16384
    seed: int = 0
    base_method: str = "turboquant_mse"
    probe_sequences: int = 4
    head_samples: int = 2048
    table_bits: int = 6

    @classmethod
    def of(cls, options: dict[str, Any]) -> CalibrationOptions:
        """ConfigError naming an unknown option."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"unknown calibration option(s) {unknown}; allowed: {names}")
        return cls(**options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    method: str, bits: float, *, out: str | os.PathLike = "artifacts", **options: Any
) -> CalibrationOptions:
    """The checked :class:`CalibrationOptions`; ConfigError naming the argument
    (``name=value``) for anything calibration would fail on, before a model is loaded: the
    widths each trainer can produce, counts, the output directory."""
    o = CalibrationOptions.of(options)
    invalid_choice("method", method, METHODS)
    counts = [("n_sequences", o.n_sequences, 1), ("seq_len", o.seq_len, 2), ("seed", o.seed, 0)]
    counts += [("max_samples", o.max_samples, 1), ("probe_sequences", o.probe_sequences, 1)]
    if method == "comm_vq":
        counts.append(("head_samples", o.head_samples, 1))
    for name, value, low in counts:
        if not _is_int(value) or value < low:
            raise invalid(name, value, f"an integer >= {low}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise invalid("bits", bits, "a number")
    if method == "ratequant":
        base = get(o.base_method)
        if base.needs_calibration:
            raise invalid("base_method", o.base_method, "a method that needs no calibration")
        allowed = base.config_class.allowed_bits
        if not min(allowed) <= bits <= max(allowed):
            raise invalid("bits", bits, f"a mean within {o.base_method}'s widths {allowed}")
    else:
        allowed = get(method).config_class.allowed_bits
        if bits != int(bits) or int(bits) not in allowed:
            raise invalid("bits", bits, f"one of {allowed} (the widths {method} trains)")
    if method == "comm_vq" and o.table_bits not in range(1, 7):
        raise invalid("table_bits", o.table_bits, "an integer in 1..6")
    if Path(out).exists() and not Path(out).is_dir():
        raise invalid("out", str(out), "a directory (this path is a file)")
    return o


def check_model_options(method: str, bits: float, layers: int, head_dim: int, table_bits: int):
    """ConfigError for what only the loaded model's shape rules out, before any capture."""
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

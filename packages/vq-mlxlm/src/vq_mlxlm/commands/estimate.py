"""``vq estimate``: KV-cache memory at a context length for fp16 and every method.

Full-attention layers are counted at the method's bits for ``context`` tokens;
sliding-window layers hold ``min(context, window)`` tokens (see
:func:`vq_mlxlm.model_shape.layer_windows`), at the method's bits as
:func:`vq_mlxlm.patch` compresses them by default (``sliding="compressed"``), or exact in
fp16 in every row with ``sliding="exact"``. Calibrated methods (marked ``*``) are
included: their bits per element follow from the config alone (their untrained neighbour
gives the accounting; the artifact must match the config)."""

from __future__ import annotations

import json

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import ConfigError, available, get, make_cache
from vq_mlxlm.commands.flags import check_model
from vq_mlxlm.model_shape import kv_shape, layer_windows


def estimate_rows(model: str, context: int, sliding: str = "compressed") -> tuple[dict, list[dict]]:
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    if sliding not in ("compressed", "exact"):
        raise ConfigError(f"--sliding must be 'compressed' or 'exact', got {sliding!r}")
    shape = kv_shape(model)
    windows = layer_windows(model)
    full = sum(w is None for w in windows)
    per_token = shape.kv_heads * shape.head_dim  # elements per layer and token, K or V
    window_tokens = sum(min(context, w) for w in windows if w)  # sliding layers' tokens
    fp16 = 2 * per_token * 2 * (full * context + window_tokens)
    if sliding == "compressed":
        compressed = full + sum(1 for w in windows if w)
        exact_bytes = 0
        elements = per_token * (full * context + window_tokens)  # compressed, K or V
    else:
        compressed = full
        exact_bytes = 2 * per_token * 2 * window_tokens
        elements = full * per_token * context
    rows = []
    for name in available():
        cls = get(name)
        untrained = {"untrained": True} if cls.needs_calibration else {}
        for bits in cls.config_class.allowed_bits:
            try:
                cache = make_cache(name, head_dim=shape.head_dim, bits=bits, **untrained)
            except ValueError:  # this width does not exist at this head_dim
                continue
            k, v = cache.key_quantizer, cache.value_quantizer
            bpe = (k.bits_per_element + v.bits_per_element) / 2
            nbytes = round(elements * 2 * bpe / 8) + exact_bytes
            rows.append(
                {
                    "method": name,
                    "bits": bits,
                    "values": f"{v.method}@{v.config.bits}",
                    "bits_per_element": round(bpe, 4),
                    "bytes": nbytes,
                    "ratio": round(fp16 / nbytes, 2),
                    "needs_calibration": cls.needs_calibration,
                }
            )
    info = {
        "model": model,
        "context": context,
        "layers": shape.layers,
        "compressed_layers": compressed,
        "exact_layers": len(windows) - compressed,
        "sliding": sliding,
        "exact_bytes": exact_bytes,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "fp16_bytes": fp16,
    }
    return info, rows


def estimate(args) -> int:
    check_model(args.model)
    info, rows = estimate_rows(args.model, args.context, args.sliding)
    if args.json:
        print(json.dumps({**info, "methods": rows}, indent=2))
        return 0
    print(
        f"{info['model']}: {info['layers']} layers x {info['kv_heads']} KV heads x head_dim "
        f"{info['head_dim']}, {info['context']:,} tokens; {info['compressed_layers']} "
        f"layers compressed, {info['exact_layers']} other layers left exact "
        f"({info['exact_bytes'] / 2**20:.2f} MiB in every row)"
    )
    print(f"{'fp16':<24} {'16.0':>8} {info['fp16_bytes'] / 2**20:>12.2f} MiB {'1.00x':>8}")
    for r in rows:
        label = f"{r['method']}@{r['bits']}{'*' if r['needs_calibration'] else ''}"
        print(
            f"{label:<24} {r['bits_per_element']:>8} {r['bytes'] / 2**20:>12.2f} MiB "
            f"{r['ratio']:>7.2f}x"
        )
    print("* needs a `vq calibrate` artifact; values as `vq generate` stores them by default")
    return 0

"""``vq estimate``: KV-cache memory at a context length for fp16 and every method.

Only the layers :func:`vq_mlxlm.patch` compresses (full-attention ``KVCache`` layers) are
counted at the method's bits; sliding-window layers keep mlx-lm's bounded cache, exact in
fp16 at ``min(context, window)`` tokens, in every row (see
:func:`vq_mlxlm.model_shape.layer_windows`). Calibrated methods (marked ``*``) are
included: their bits per element follow from the config alone (their untrained neighbour
gives the accounting; the artifact must match the config)."""

from __future__ import annotations

import json

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import ConfigError, available, get, make_cache
from vq_mlxlm.commands.flags import check_model
from vq_mlxlm.model_shape import kv_shape, layer_windows


def estimate_rows(model: str, context: int) -> tuple[dict, list[dict]]:
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    shape = kv_shape(model)
    windows = layer_windows(model)
    compressed = sum(w is None for w in windows)
    per_token = shape.kv_heads * shape.head_dim  # elements per layer and token, K or V
    exact_bytes = sum(2 * per_token * 2 * min(context, w) for w in windows if w is not None)
    fp16 = 2 * compressed * per_token * 2 * context + exact_bytes
    elements = compressed * per_token * context  # compressed elements, K or V
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
        "exact_bytes": exact_bytes,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "fp16_bytes": fp16,
    }
    return info, rows


def estimate(args) -> int:
    check_model(args.model)
    info, rows = estimate_rows(args.model, args.context)
    if args.json:
        print(json.dumps({**info, "methods": rows}, indent=2))
        return 0
    print(
        f"{info['model']}: {info['layers']} layers x {info['kv_heads']} KV heads x head_dim "
        f"{info['head_dim']}, {info['context']:,} tokens; {info['compressed_layers']} "
        f"full-attention layers compressed, {info['exact_layers']} sliding-window layers "
        f"left exact ({info['exact_bytes'] / 2**20:.2f} MiB in every row)"
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

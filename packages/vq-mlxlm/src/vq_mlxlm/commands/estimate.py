"""``vq estimate``: KV-cache memory at a context length for fp16 and every method.

Calibrated methods (marked ``*``) are included: their bits per element do not depend on
what calibration learns, only on the config (the artifact must match it)."""

from __future__ import annotations

import json

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import available, get, make_cache
from vq_mlxlm.model_shape import kv_shape


def estimate_rows(model: str, context: int) -> tuple[dict, list[dict]]:
    if context <= 0:
        raise ValueError(f"--context must be a positive number of tokens, got {context}")
    shape = kv_shape(model)
    fp16 = shape.fp16_bytes(context)
    elements = shape.layers * shape.kv_heads * shape.head_dim * context  # per K or V
    rows = []
    for name in available():
        cls = get(name)
        for bits in cls.config_class.allowed_bits:
            try:
                cache = make_cache(name, head_dim=shape.head_dim, bits=bits)
            except ValueError:  # this width does not exist at this head_dim
                continue
            k, v = cache.key_quantizer, cache.value_quantizer
            bpe = (k.bits_per_element + v.bits_per_element) / 2
            nbytes = round(elements * 2 * bpe / 8)
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
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "fp16_bytes": fp16,
    }
    return info, rows


def estimate(args) -> int:
    info, rows = estimate_rows(args.model, args.context)
    if args.json:
        print(json.dumps({**info, "methods": rows}, indent=2))
        return 0
    print(
        f"{info['model']}: {info['layers']} layers x {info['kv_heads']} KV heads x head_dim "
        f"{info['head_dim']}, {info['context']:,} tokens"
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

"""What ``vq generate`` reports: each rank's measured cache (:mod:`vq_mlxlm.cache_memory`)
and, under ``vq launch``, their sum.

With several ranks, ``cache_bytes``, ``used_cache_bytes``, ``fp16_cache_bytes`` and the
other byte counts in the JSON are rank 0's own cache; ``total_cache_bytes`` (and
``total_used_cache_bytes``, ``total_fp16_cache_bytes``) add every rank's, ``ranks`` lists
each rank's, and ``ratio`` and the printed memory line are the whole cache's.
"""

from __future__ import annotations

from dataclasses import astuple, fields

from vq_mlxlm.cache_memory import CacheMemory, cache_memory
from vq_mlxlm.commands.flags import bits_label


def measure(model, cache) -> list[int]:
    """This process's :class:`CacheMemory` as a row of ints (its own KV heads and layers)."""
    from vq_mlxlm.model_shape import model_kv_shape

    return list(astuple(cache_memory(cache, model_kv_shape(model).kv_heads)))


def _total(rows: list[list[int]]) -> CacheMemory:
    mems = [CacheMemory(*row) for row in rows]
    out = {f.name: sum(getattr(m, f.name) for m in mems) for f in fields(CacheMemory)}
    out["tokens"] = max(m.tokens for m in mems)
    return CacheMemory(**out)


def _bytes(m: CacheMemory) -> tuple[int, int]:
    """(allocated, used) bytes of all of ``m``'s layers."""
    rest = m.exact_kv_bytes + m.state_bytes
    return m.compressed_bytes + rest, m.compressed_used_bytes + rest


def report(args, cache, last, rows: list[list[int]], ranks, model) -> dict:
    from vq_core import CompressedKVCache

    own, total = CacheMemory(*rows[0]), _total(rows)
    first = next((c for c in cache if isinstance(c, CompressedKVCache)), None)
    (own_alloc, own_used), (all_alloc, all_used) = _bytes(own), _bytes(total)
    result = {
        "prompt_tokens": last.prompt_tokens,
        "generated_tokens": last.generation_tokens,
        "cache_tokens": own.tokens,
        "cache_bytes": own_alloc,
        "used_cache_bytes": own_used,
        "fp16_cache_bytes": own.fp16_bytes,
        "compressed_used_bytes": own.compressed_used_bytes,
        "total_cache_bytes": all_alloc,
        "total_used_cache_bytes": all_used,
        "total_fp16_cache_bytes": total.fp16_bytes,
        "ratio": round(total.ratio, 3),
        "layers": own.layers,
        "compressed_layers": own.compressed_layers,
        "exact_kv_layers": own.exact_kv_layers,
        "exact_kv_bytes": own.exact_kv_bytes,
        "state_layers": own.state_layers,
        "state_bytes": own.state_bytes,
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "method": args.method,
        "bits": args.bits,
        "value_method": first.value_quantizer.method if first is not None else None,
        "value_bits": args.value_bits or args.bits,
        "window": args.window,
    }
    if ranks is not None:
        from vq_mlxlm.distributed import layout

        result["world_size"] = ranks.size
        result["parallel"] = ranks.parallel
        result["layout"] = layout(model).describe()  # rank 0's
        result["ranks"] = []
        for r, row in enumerate(rows):
            m = CacheMemory(*row)
            alloc, used = _bytes(m)
            result["ranks"].append(
                {
                    "rank": r,
                    "cache_bytes": alloc,
                    "used_cache_bytes": used,
                    "fp16_cache_bytes": m.fp16_bytes,
                    "layers": m.layers,
                    "compressed_layers": m.compressed_layers,
                }
            )
    return result


def print_report(args, result: dict, cache, rows: list[list[int]]) -> None:
    total = _total(rows)
    ratio = total.ratio
    print()
    if ratio >= 1:
        size = f"{ratio:.2f}x smaller"
    else:  # a short context: most of its tokens are still in the exact partial block
        block = max(getattr(c, "block", 1) for c in cache)
        size = (
            f"{1 / ratio:.2f}x larger: up to {block - 1} newest tokens per layer stay exact, "
            f"in the model's activation dtype, until their {block}-token block is encoded"
        )
    where = f" (all {len(rows)} ranks)" if len(rows) > 1 else ""
    print(
        f"[vq] cache{where}: {total.compressed_used_bytes:,} bytes of codes for {total.tokens} "
        f"tokens in {total.compressed_layers} of {total.layers} layers vs fp16 "
        f"{total.fp16_bytes:,} bytes ({size}; {total.compressed_bytes:,} bytes allocated in "
        f"256-token steps) | {args.method} {bits_label(args.bits)}-bit keys, "
        f"{result['value_method']} {bits_label(result['value_bits'])}-bit values"
    )
    for row in result.get("ranks", []):
        print(
            f"[vq] rank {row['rank']}: {row['cache_bytes']:,} bytes allocated, "
            f"{row['used_cache_bytes']:,} used, fp16 {row['fp16_cache_bytes']:,} "
            f"({row['compressed_layers']} of {row['layers']} layers compressed)"
        )
    if total.untouched():
        print(f"[vq] not compressed: {total.untouched()}")
    print(
        f"[vq] prompt {result['prompt_tokens']} tokens at {result['prompt_tps']:.1f} tok/s, "
        f"generation {result['generated_tokens']} tokens at {result['generation_tps']:.1f} tok/s"
    )

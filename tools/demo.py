"""Encode a tensor with the one compressed cache and print its measured bits and bytes."""

from __future__ import annotations

import mlx.core as mx

from vq_core import CompressedKVCache, available, create


def main() -> None:
    methods = available()
    method = "turboquant_mse" if "turboquant_mse" in methods else methods[0]
    head_dim, tokens, heads = 128, 4096, 8
    k = create(method, head_dim=head_dim, bits=4)
    v = create(method, head_dim=head_dim, bits=4, seed=1)
    cache = CompressedKVCache(k, v)
    keys = mx.random.normal((1, heads, tokens, head_dim))
    values = mx.random.normal((1, heads, tokens, head_dim))
    cache.update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
    mx.eval(cache.state)
    fp16 = 2 * keys.size * 2
    print(f"method={method} bits/element K={k.bits_per_element:.3f} V={v.bits_per_element:.3f}")
    print(f"cache bytes={cache.nbytes:,} fp16 bytes={fp16:,} ratio={fp16 / cache.nbytes:.2f}x")


if __name__ == "__main__":
    main()

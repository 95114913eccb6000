"""What a patched model's per-layer caches hold, measured: the compressed layers against
fp16 for the same tokens, and the layers vq leaves as mlx-lm keeps them (sliding-window
``RotatingKVCache``s hold their window exact; hybrids' ``ArraysCache``s hold recurrent
state, not keys and values) counted apart, so the ratio compares like with like."""

from __future__ import annotations

from dataclasses import dataclass

from vq_core import CompressedKVCache


@dataclass(frozen=True)
class CacheMemory:
    layers: int
    compressed_layers: int
    tokens: int  # tokens seen by the attention layers (the largest offset)
    compressed_bytes: int  # allocated code buffers + exact parts of the compressed layers
    compressed_used_bytes: int  # the same without step padding
    fp16_bytes: int  # the compressed layers' tokens as fp16 keys and values
    exact_kv_layers: int  # other attention layers (mlx-lm's own KV caches, exact)
    exact_kv_bytes: int
    state_layers: int  # layers whose cache holds no keys/values (recurrent state)
    state_bytes: int

    @property
    def ratio(self) -> float:
        """fp16 bytes over used bytes of the compressed layers (nan when none)."""
        return (
            self.fp16_bytes / self.compressed_used_bytes
            if self.compressed_used_bytes
            else float("nan")
        )

    def untouched(self) -> str:
        """The layers left as mlx-lm keeps them, in words ("" when there are none)."""
        parts = []
        if self.exact_kv_layers:
            parts.append(
                f"{self.exact_kv_layers} attention layers kept exact by mlx-lm's own cache "
                f"({self.exact_kv_bytes:,} bytes)"
            )
        if self.state_layers:
            parts.append(
                f"{self.state_layers} recurrent-state layers untouched ({self.state_bytes:,} bytes)"
            )
        return "; ".join(parts)


def cache_memory(cache: list, kv_heads: int) -> CacheMemory:
    """Measure ``cache`` (one entry per layer, as ``make_prompt_cache`` built it) of a model
    with ``kv_heads`` KV heads per attention layer."""
    comp = [c for c in cache if isinstance(c, CompressedKVCache)]
    kv = [c for c in cache if not isinstance(c, CompressedKVCache) and hasattr(c, "offset")]
    state = [c for c in cache if not isinstance(c, CompressedKVCache) and not hasattr(c, "offset")]
    # size(): the tokens an exact cache would hold (a sliding window's at most max_size)
    fp16 = sum(2 * c.size() * kv_heads * c.key_quantizer.head_dim * 2 for c in comp)
    return CacheMemory(
        layers=len(cache),
        compressed_layers=len(comp),
        tokens=max((c.offset for c in (*comp, *kv)), default=0),
        compressed_bytes=sum(c.nbytes for c in comp),
        compressed_used_bytes=sum(c.used_nbytes for c in comp),
        fp16_bytes=fp16,
        exact_kv_layers=len(kv),
        exact_kv_bytes=sum(c.nbytes for c in kv),
        state_layers=len(state),
        state_bytes=sum(c.nbytes for c in state),
    )

"""Small quantizers used to test the core machinery (not shipped)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_core import (
    Codes,
    Quantizer,
    QuantizerConfig,
    pack,
    packed_words,
    register,
    register_compressed_attention,
    unpack,
)


@dataclass(frozen=True)
class UniformConfig(QuantizerConfig):
    allowed_bits = (2, 3, 4, 5, 6, 8)


@register
class ToyUniform(Quantizer):
    """Per-vector absmax scale (fp16) + b-bit uniform codes."""

    method = "toy_uniform"
    config_class = UniformConfig

    def field_layout(self):
        d, b = self.head_dim, self.config.bits
        return {"q": ((packed_words(d, b),), mx.uint32), "scale": ((1,), mx.float16)}

    def _levels(self):
        return (1 << self.config.bits) - 1

    def _encode(self, x):
        scale = mx.maximum(mx.abs(x).max(axis=-1, keepdims=True), 1e-8)
        q = mx.round((x / scale + 1) / 2 * self._levels()).astype(mx.uint32)
        return Codes(q=pack(q, self.config.bits), scale=scale.astype(mx.float16))

    def _decode(self, codes):
        q = unpack(codes["q"], self.config.bits, self.head_dim).astype(mx.float32)
        return (q / self._levels() * 2 - 1) * codes["scale"].astype(mx.float32)


@dataclass(frozen=True)
class BlockConfig(QuantizerConfig):
    allowed_bits = (8,)


@register
class ToyBlock(Quantizer):
    """Per-channel scale shared by blocks of 4 tokens (a KIVI-like layout)."""

    method = "toy_block"
    config_class = BlockConfig
    token_block = 4

    def field_layout(self):
        return {
            "q": ((packed_words(self.head_dim, 8),), mx.uint32),
            "scale": ((self.head_dim,), mx.float16),
        }

    def token_strides(self):
        return {"scale": 4}

    def _encode(self, x):
        *lead, n, d = x.shape
        blocks = x.reshape(*lead, n // 4, 4, d)
        scale = mx.maximum(mx.abs(blocks).max(axis=-2), 1e-8)
        q = mx.round((blocks / scale[..., None, :] + 1) * 127.5).astype(mx.uint32)
        return Codes(q=pack(q.reshape(*lead, n, d), 8), scale=scale.astype(mx.float16))

    def _decode(self, codes):
        q = unpack(codes["q"], 8, self.head_dim).astype(mx.float32)
        *lead, n, d = q.shape
        scale = codes["scale"].astype(mx.float32)
        x = (q.reshape(*lead, n // 4, 4, d) / 127.5 - 1) * scale[..., None, :]
        return x.reshape(*lead, n, d)


@register
class ToyFused(ToyUniform):
    """ToyUniform with a 'fused kernel' (decode + exact softmax) to test the merge path."""

    method = "toy_fused"
    calls = 0


def _toy_fused(q, keys, values, *, scale):
    """Decode + exact softmax: a stand-in 'kernel' to test the table and the merge."""
    if keys.lengths is not None:
        return None  # a ragged batch: this stand-in cannot skip each row's padding
    ToyFused.calls += 1
    k = keys.quantizer.decode(keys.valid())
    v = values.quantizer.decode(values.valid())
    s = (q @ mx.swapaxes(k, -1, -2)) * scale
    return mx.softmax(s, axis=-1) @ v, mx.logsumexp(s, axis=-1)


register_compressed_attention("toy_fused", "*", _toy_fused)  # any value partner


@register
class ToyPositional(ToyUniform):
    """ToyUniform of ``x / (1 + position)``: decoding or scoring at the wrong ``start``
    gives visibly wrong keys, so it checks that the cache passes every token's position."""

    method = "toy_positional"
    position_aware = True

    @staticmethod
    def _factor(n: int, start: int) -> mx.array:
        return (1.0 + start + mx.arange(n, dtype=mx.float32))[:, None]

    def _encode(self, x, start=0):
        return super()._encode(x / self._factor(x.shape[-2], start))

    def _decode(self, codes, start=0):
        y = super()._decode(codes)
        return y * self._factor(y.shape[-2], start)

    def _scores(self, q, codes, *, start=0):
        return q.astype(mx.float32) @ mx.swapaxes(self._decode(codes, start=start), -1, -2)

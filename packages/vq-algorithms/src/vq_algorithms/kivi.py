"""KIVI (Liu et al., arXiv 2402.02750): keys per channel, values per token.

Section 3.2: keys have outlier *channels*, so KIVI quantizes them per channel, each group
being one channel over ``g`` consecutive tokens; values are quantized per token, in groups
of ``g`` along head_dim. Both are asymmetric round-to-nearest: ``scale = (max - min) /
(2**b - 1)``, ``code = round((x - min) / scale)``, ``x̂ = scale * code + min``, with ``scale``
and ``min`` stored in float16. The newest ``L mod g`` tokens stay in full precision (Section
3.3): in vq that is :class:`~vq_core.CompressedKVCache`, which flushes whole ``token_block``
groups and keeps the partial group exact. On a GPU a decode step reads the codes in
vq-kernels' one-pass affine kernel (:func:`vq_algorithms.affine.fused_affine_attention`).

``axis="channel"`` (the default, keys) groups ``g`` tokens x 1 channel; ``axis="token"``
(KIVI's values) groups 1 token x ``g`` channels. ``make_cache("kivi")`` pairs the keys with
``affine`` values: KIVI's value quantizer *is* per-token group quantization, which is the
mlx-lm baseline (default ``g=64`` there; for KIVI's exact values build the cache with
``create("kivi", axis="token")`` or ``create("affine", group_size=32)`` as value quantizer).

Codes for ``x [..., L, D]``: ``idx`` uint32 ``[..., L, ceil(D*b/32)]``, ``scale`` and
``zero`` (the min) float16 ``[..., L, D/g]``: ``b + 32/g`` bits per element either way. With
``axis="channel"`` the tokens are cut into ``L // g`` blocks of ``g``; a block's ``D`` per
channel scales are laid out row-major over its ``g`` token rows (row ``t`` holds channels
``t·D/g .. (t+1)·D/g - 1``), so every field stays per-token shaped and the cache can store
and slice it at block boundaries. A trailing partial block (only when ``encode`` is called
directly with ``L % g != 0``; the cache never flushes one) is grouped per token instead,
at the same bit cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_algorithms.affine import fused_affine_attention, fused_affine_decode
from vq_core import (
    FLOAT16_MAX,
    Codes,
    ConfigError,
    Quantizer,
    QuantizerConfig,
    invalid_choice,
    pack,
    packed_words,
    register,
    register_compressed_attention,
    register_decode_attention,
    unpack,
)

AXES = ("channel", "token")
GROUP_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class KiviConfig(QuantizerConfig):
    """``group_size`` ``g`` (default 32, the paper's); ``axis``: "channel" (keys) or "token"."""

    allowed_bits = (2, 3, 4, 8)
    group_size: int = 32
    axis: str = "channel"

    def validate(self) -> None:
        super().validate()
        invalid_choice("group_size", self.group_size, GROUP_SIZES)
        invalid_choice("axis", self.axis, AXES)
        if self.head_dim % self.group_size:
            raise ConfigError(
                f"kivi: head_dim={self.head_dim} is not a multiple of group_size="
                f"{self.group_size}; pick a group_size in {GROUP_SIZES} dividing it"
            )


def _affine(x: mx.array, bits: int, axis: int) -> tuple[mx.array, mx.array, mx.array]:
    """Asymmetric RTN over ``axis``: (codes uint32 like x, scale fp16, min fp16 kept dims)."""
    lo = x.min(axis=axis, keepdims=True).astype(mx.float16)
    hi = x.max(axis=axis, keepdims=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).astype(mx.float16)
    s = mx.where(scale > 0, scale, 1).astype(mx.float32)
    idx = mx.clip(mx.round((x - lo) / s), 0, (1 << bits) - 1).astype(mx.uint32)
    return idx, scale, lo


@register
class Kivi(Quantizer):
    method = "kivi"
    config_class = KiviConfig
    family = "per-channel keys / per-token values (asymmetric)"
    max_abs = FLOAT16_MAX  # group minima and scales are stored as float16
    default_value_method = "affine"
    # Measured on N(0,1), head_dim 128, g=32 (3 seeds, either axis): 0.1547, 0.0282,
    # 0.00612, 2.12e-5 at b = 2, 3, 4, 8; plus ~8% margin.
    round_trip_bound = {2: 0.167, 3: 0.031, 4: 0.0067, 8: 2.3e-5}

    def __init__(self, config: KiviConfig):
        super().__init__(config)
        self.g = config.group_size
        self.token_block = self.g if config.axis == "channel" else 1

    def field_layout(self):
        n = self.head_dim // self.g
        return {
            "idx": ((packed_words(self.head_dim, self.config.bits),), mx.uint32),
            "scale": ((n,), mx.float16),
            "zero": ((n,), mx.float16),
        }

    def _n_channel(self, length: int) -> int:
        """Tokens (of ``length``) grouped per channel: whole blocks of ``g``, or none."""
        return length - length % self.g if self.config.axis == "channel" else 0

    # -- encoding --------------------------------------------------------------------------

    def _encode(self, x: mx.array) -> Codes:
        flat = x.ndim == 1
        x = x[None] if flat else x
        *lead, length, d = x.shape
        g, n, b = self.g, self._n_channel(length), self.config.bits
        idx, scale, zero = [], [], []
        if n:  # per channel: blocks [..., nb, g, D], stats over the g tokens
            i, s, z = _affine(x[..., :n, :].reshape(*lead, n // g, g, d), b, axis=-2)
            idx.append(i.reshape(*lead, n, d))
            scale.append(s.reshape(*lead, n, d // g))
            zero.append(z.reshape(*lead, n, d // g))
        if n < length:  # per token: groups [..., t, D/g, g], stats over g channels
            t = length - n
            i, s, z = _affine(x[..., n:, :].reshape(*lead, t, d // g, g), b, axis=-1)
            idx.append(i.reshape(*lead, t, d))
            scale.append(s.reshape(*lead, t, d // g))
            zero.append(z.reshape(*lead, t, d // g))
        codes = Codes(
            {
                "idx": pack(mx.concatenate(idx, axis=-2), b),
                "scale": mx.concatenate(scale, axis=-2),
                "zero": mx.concatenate(zero, axis=-2),
            }
        )
        return codes.map(lambda _, a: a[0]) if flat else codes

    def _split(self, codes: Codes):
        """Codes -> (n, channel part, token part); parts are (idx f32, scale, zero) or None.

        Channel part: idx ``[..., nb, g, D]``, scale/zero ``[..., nb, 1, D]``.
        Token part: idx ``[..., t, D/g, g]``, scale/zero ``[..., t, D/g, 1]``.
        """
        idx = unpack(codes["idx"], self.config.bits, self.head_dim).astype(mx.float32)
        scale = codes["scale"].astype(mx.float32)
        zero = codes["zero"].astype(mx.float32)
        *lead, length, d = idx.shape
        g, n = self.g, self._n_channel(length)
        chan = tok = None
        if n:
            nb = n // g
            chan = (
                idx[..., :n, :].reshape(*lead, nb, g, d),
                scale[..., :n, :].reshape(*lead, nb, 1, d),
                zero[..., :n, :].reshape(*lead, nb, 1, d),
            )
        if n < length:
            t = length - n
            tok = (
                idx[..., n:, :].reshape(*lead, t, d // g, g),
                scale[..., n:, :, None],
                zero[..., n:, :, None],
            )
        return n, chan, tok

    def _decode(self, codes: Codes) -> mx.array:
        flat = codes["idx"].ndim == 1
        if flat:
            codes = codes.map(lambda _, a: a[None])
        _, chan, tok = self._split(codes)
        parts = []
        for part in (chan, tok):
            if part is not None:
                i, s, z = part
                x = i * s + z
                parts.append(x.reshape(*x.shape[:-3], -1, self.head_dim))
        out = mx.concatenate(parts, axis=-2)
        return out[0] if flat else out

    # -- attention from the integer codes --------------------------------------------------

    def _scores(self, q: mx.array, codes: Codes) -> mx.array:
        """``q [..., M, D]`` x codes ``[..., L, ...]`` -> ``[..., M, L]``, never forming k̂.

        Per channel block: ``(q ⊙ scale_blk) @ idxᵀ + q · min_blk``. Per token group:
        ``Σ_G scale_tG (q_G · idx_tG) + min_tG Σ q_G``.
        """
        q = q.astype(mx.float32)
        _, chan, tok = self._split(codes)
        parts = []
        if chan is not None:
            i, s, z = chan  # [..., nb, g, D], [..., nb, 1, D]
            qs = q[..., None, :, :] * s  # [..., nb, M, D]
            blk = qs @ mx.swapaxes(i, -1, -2) + (q[..., None, :, :] * z).sum(-1, keepdims=True)
            blk = mx.swapaxes(blk, -3, -2)  # [..., M, nb, g]
            parts.append(blk.reshape(*blk.shape[:-2], -1))
        if tok is not None:
            i, s, z = tok  # [..., t, G, g], [..., t, G, 1]
            qg = q.reshape(*q.shape[:-1], -1, self.g)  # [..., M, G, g]
            dots = mx.swapaxes(qg, -3, -2) @ mx.moveaxis(i, -3, -1)  # [..., G, M, t]
            s_t = mx.moveaxis(s[..., 0], -1, -2)[..., None, :]  # [..., G, 1, t]
            part = (dots * s_t).sum(axis=-3) + qg.sum(-1) @ mx.swapaxes(z[..., 0], -1, -2)
            parts.append(part)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    def _weighted_sum(self, p: mx.array, codes: Codes) -> mx.array:
        """``p [..., M, L]`` over codes -> ``Σ_t p_t k̂_t`` ``[..., M, D]``, never forming k̂.

        Per channel block: ``scale_blk ⊙ (p_blk @ idx_blk) + (Σ p_blk) min_blk``. Per token
        group: ``(p ⊙ scale_G) @ idx_G + p @ min_G``.
        """
        p = p.astype(mx.float32)
        n, chan, tok = self._split(codes)
        out = 0.0
        if chan is not None:
            i, s, z = chan
            pb = mx.swapaxes(p[..., :n].reshape(*p.shape[:-1], -1, self.g), -3, -2)
            acc = (pb @ i) * s + pb.sum(-1, keepdims=True) * z  # [..., nb, M, D]
            out = out + acc.sum(axis=-3)
        if tok is not None:
            i, s, z = tok
            pt = p[..., n:]  # [..., M, t]
            s_g = mx.moveaxis(s[..., 0], -1, -2)[..., None, :]  # [..., G, 1, t]
            acc = (pt[..., None, :, :] * s_g) @ mx.moveaxis(i, -3, -2)  # [..., G, M, g]
            acc = mx.swapaxes(acc, -3, -2) + (pt @ z[..., 0])[..., None]  # [..., M, G, g]
            out = out + acc.reshape(*acc.shape[:-2], self.head_dim)
        return out


# A decode step over KIVI keys (either axis) and affine or per-token KIVI values: vq-kernels'
# affine kernel (per-channel keys fold a block's scales into the query once per block).
register_compressed_attention("kivi", "affine", fused_affine_attention)
register_compressed_attention("kivi", "kivi", fused_affine_attention)
register_decode_attention("kivi", "affine", fused_affine_decode)
register_decode_attention("kivi", "kivi", fused_affine_decode)

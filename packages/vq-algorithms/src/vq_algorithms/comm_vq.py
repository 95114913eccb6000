"""CommVQ (arXiv 2506.18879): additive VQ of keys with codebooks that commute with RoPE.

A key is split into its RoPE pairs, written as complex numbers ``z_j`` (``j < P = D/2``; see
:mod:`vq_algorithms._rope`). Per layer, KV head and residual stage ``r`` a table
``θ_r [K, P]`` of complex entries (``K = 2**table_bits``) defines ``K²`` codewords
``c_{A,B} = θ_A + i·θ_B`` (paper §3.3: each codeword's 2×2 blocks ``[[x, -y], [y, x]]`` are
complex numbers, so they commute with RoPE's per-pair rotation ``e^{i m ω_j}``).

Encoding (paper §3.2, additive quantization, greedy residual): the cache receives post-RoPE
keys, so a key at position ``m`` is first rotated back, ``z = e^{-i m ω} k``, normalized
(``norm`` kept in fp16), then each stage picks the nearest ``c_{A,B}`` to what is left.
Because ``⟨z, θ_A + iθ_B⟩`` splits into a term in ``A`` plus a term in ``B``, the ``K²``
distances cost two ``[D] × [D, K]`` products and a ``K × K`` table add, not ``K²·D``.

Decoding is ``k̂ = norm · e^{i m ω} Σ_r c_{A_r,B_r}``: the codewords are summed in the
position-free basis and rotated once, which is what commuting with RoPE buys (``R_m C = C
R_m``): one codebook serves every position, and scores ``q·k̂`` read the codes plus the
token's position, never a stored fp16 key. Stages per token: as many ``2·table_bits``-bit
stages as fit in ``bits·D − 16`` bits (the 16 are the norm), stored as whole bytes, so
``bits`` is an upper bound on bits per element (``bits_per_element`` is exact).

Keys only: values go to ``turboquant_mse`` (``default_value_method``). The paper compresses
values with a learned encoder fine-tuned together with the model, which is not reproduced;
EM-trained additive codebooks for SmolLM2-135M's values generalized worse to held-out text
than TurboQuant (relative error 0.13–0.16 against 0.11 at 2 bits), while keys, whose
pre-RoPE form is highly structured, went from 0.10–0.11 to 0.013–0.026 (docs/results.md).

Calibration (``vq calibrate --method comm_vq``) trains ``θ`` per layer, head and stage by
the paper's EM (soft assignments with an annealed temperature, then the closed-form
structured M-step) on pre-RoPE keys, and saves the model's RoPE geometry with it.
``untrained=True`` (and no artifact) asks for the untrained neighbour: Gaussian tables shared
by every head, no RoPE; with neither (nor ``tables``) the quantizer is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from vq_algorithms._artifact import Calibrated, CalibratedConfig, check_tensors
from vq_algorithms._byte_fields import pad_last, twelve_bit_fields
from vq_algorithms._rope import RopeGeometry
from vq_core import (
    FLOAT16_MAX,
    Codes,
    ConfigError,
    HeadDims,
    ShapeError,
    invalid_choice,
    pack,
    packed_words,
    register,
    stream_key,
)
from vq_core.packing import unpack_fields

NORM_BITS = 16


@dataclass(frozen=True)
class CommVQConfig(CalibratedConfig):
    """``table_bits``: entries per stage table, ``K = 2**table_bits`` (paper: 6, i.e. 4096
    codewords per stage); see :class:`CalibratedConfig` for ``artifact``/``layer``; ``kind``
    must be ``"k"``."""

    allowed_bits = (1, 2, 3, 4)
    head_dims = HeadDims(multiple=2)  # RoPE pairs
    table_bits: int = 6

    def validate(self) -> None:
        super().validate()
        if self.kind != "k":
            raise ConfigError(
                f"comm_vq: kind={self.kind!r} is not allowed; comm_vq compresses keys only "
                "(RoPE-commuting codebooks), values use turboquant_mse"
            )
        invalid_choice("comm_vq: table_bits", self.table_bits, (1, 2, 3, 4, 5, 6))
        if self.stages < 1:
            raise ConfigError(
                f"comm_vq: bits={self.bits} at head_dim={self.head_dim} leaves no room for one "
                f"stage of {2 * self.table_bits} bits after the {NORM_BITS}-bit norm"
            )

    @property
    def stages(self) -> int:
        """Stages whose codes fit ``bits·D`` bits per token next to the norm (whole bytes)."""
        return (self.bits * self.head_dim - NORM_BITS) // 8 * 8 // (2 * self.table_bits)

    @property
    def code_bytes(self) -> int:
        return -(-2 * self.stages * self.table_bits // 8)

    @property
    def table_size(self) -> int:
        return 1 << self.table_bits


def untrained_tables(config: CommVQConfig) -> mx.array:
    """Gaussian tables ``[1, R, K, P, 2]`` shrinking by stage like a residual's norm."""
    c = config
    shape = (1, c.stages, c.table_size, c.head_dim // 2, 2)
    scale = 0.3 * 0.95 ** mx.arange(c.stages, dtype=mx.float32) / c.head_dim**0.5
    noise = mx.random.normal(shape, key=stream_key(c.seed, "codebook"))
    return noise * scale[None, :, None, None, None]


@register
class CommVQ(Calibrated):
    method = "comm_vq"
    config_class = CommVQConfig
    family = "RoPE-commuting additive VQ (EM-trained codebooks)"
    max_norm = FLOAT16_MAX  # norms are stored as float16
    needs_calibration = True
    position_aware = True
    default_value_method = "turboquant_mse"
    keys_only = True
    # Untrained Gaussian tables on Gaussian vectors; calibrated tables do far better.
    round_trip_bound = {1: 0.55, 2: 0.24, 3: 0.11, 4: 0.05}

    def __init__(
        self,
        config: CommVQConfig,
        tensors: dict[str, mx.array] | None = None,
        *,
        tables: mx.array | None = None,
        geometry: RopeGeometry | None = None,
    ):
        """``tensors``: one layer's ``tables [H, R, K, P, 2]``, ``rope_perm [D]`` and
        ``rope_freqs [D/2]`` (None with ``untrained=True``); ``tables`` and ``geometry``
        given directly (a shard's heads, trainers, tests) replace them."""
        super().__init__(config)
        c = config
        if tables is None:
            a = check_tensors(self.method, c, tensors, ("tables", "rope_perm", "rope_freqs"))
            if a is not None:
                tables = a["tables"]
                geometry = RopeGeometry(a["rope_perm"].astype(mx.int32), a["rope_freqs"])
        tables = untrained_tables(c) if tables is None else tables.astype(mx.float32)
        want = (c.stages, c.table_size, c.head_dim // 2, 2)
        if tables.ndim != 5 or tuple(tables.shape[1:]) != want:
            raise ConfigError(
                f"comm_vq: tables have shape {tuple(tables.shape)}; bits={c.bits}, "
                f"table_bits={c.table_bits}, head_dim={c.head_dim} need [heads, *{want}] "
                "(calibrate with these settings)"
            )
        self.geometry = geometry or RopeGeometry.identity(c.head_dim)
        if self.geometry.perm.shape != (c.head_dim,):
            raise ConfigError(f"comm_vq: RoPE geometry is not for head_dim={c.head_dim}")
        self.position_aware = bool(mx.any(self.geometry.freqs != 0).item())
        self.tables = tables
        self.heads = tables.shape[0]
        h, r, k, p = self.heads, c.stages, c.table_size, c.head_dim // 2
        a_part = tables.reshape(h, r, k, 2 * p)  # θ_A as [re, im] per pair
        b_part = mx.stack([-tables[..., 1], tables[..., 0]], axis=-1).reshape(h, r, k, 2 * p)
        self._a, self._b = a_part, b_part  # i·θ_B = (-im, re)
        # ||θ_A + iθ_B||² per stage: [H, R, K, K]
        sq = (a_part * a_part).sum(-1)
        self._pair_norm = (
            sq[..., :, None] + sq[..., None, :] + 2 * (a_part @ mx.swapaxes(b_part, -1, -2))
        )
        self._flat = mx.concatenate([a_part, b_part], axis=2).reshape(h * r * 2 * k, 2 * p)

    def field_layout(self):
        return {"idx": ((self.config.code_bytes,), mx.uint8), "norm": ((), mx.float16)}

    def _heads_axis(self, x: mx.array) -> None:
        if self.heads > 1 and (x.ndim < 3 or x.shape[-3] != self.heads):
            raise ShapeError(
                f"comm_vq: codebooks are per KV head ({self.heads}); input of shape "
                f"{tuple(x.shape)} needs [..., {self.heads}, tokens, head_dim]"
            )

    def _encode(self, x: mx.array, start: int = 0) -> Codes:
        self._heads_axis(x)
        z = self.geometry.to_pairs(x)
        if self.position_aware:
            z = self.geometry.rotate_pairs(z, start, inverse=True)
        u = z.reshape(*x.shape)
        norm = mx.linalg.norm(u, axis=-1)
        u = u / mx.maximum(norm, 1e-30)[..., None]
        per_head = self.heads > 1  # tables [H, ...] broadcast over u [..., H, L, 2P]
        k, fields = self.config.table_size, []
        for r in range(self.config.stages):
            a, b, pn = self._a[:, r], self._b[:, r], self._pair_norm[:, r]  # [H, K, 2P|K]
            if per_head:
                pn = pn[:, None]  # [H, 1, K, K] against [..., H, L, K, K]
            else:
                a, b, pn = a[0], b[0], pn[0]
            f = u @ mx.swapaxes(a, -1, -2)  # ⟨u, θ_A⟩: [..., L, K]
            g = u @ mx.swapaxes(b, -1, -2)  # ⟨u, iθ_B⟩
            dist = pn - 2 * (f[..., :, None] + g[..., None, :])  # ||u - c_AB||² - ||u||²
            best = mx.argmin(dist.reshape(*dist.shape[:-2], k * k), axis=-1).astype(mx.uint32)
            ia, ib = best // k, best % k
            fields += [ia, ib]
            u = u - self._pick(ia, r, 0) - self._pick(ib, r, 1)
        codes = mx.stack(fields, axis=-1)  # [..., L, 2R]: A_0, B_0, A_1, B_1, ...
        words = pack(codes, self.config.table_bits)
        idx = words.view(mx.uint8)[..., : self.config.code_bytes]  # no padding to whole words
        return Codes({"idx": idx, "norm": norm.astype(mx.float16)})

    def _pick(self, idx: mx.array, r: int, part: int) -> mx.array:
        """Rows of ``θ`` (part 0) or ``iθ`` (part 1) of stage ``r`` for ``idx [..., (H,) L]``."""
        return mx.take(self._flat, self._row(idx, r, part, trailing=1), axis=0)

    def _row(self, idx: mx.array, r, part: int, trailing: int) -> mx.array:
        """Row of ``_flat`` for entry ``idx`` of stage ``r``; with per-head tables the head
        axis is the one ``trailing`` axes before the last of ``idx``."""
        k, stages = self.config.table_size, self.config.stages
        row = (r * 2 + part) * k + idx
        if self.heads > 1:
            head = mx.arange(self.heads, dtype=mx.uint32).reshape(self.heads, *[1] * trailing)
            row = row + head * (stages * 2 * k)
        return row

    def _fields(self, idx: mx.array) -> mx.array:
        """Packed bytes ``[..., code_bytes]`` -> stage fields ``A | B << table_bits`` ``[..., R]``."""
        c = self.config
        if c.table_bits == 6:
            return twelve_bit_fields(idx, c.stages).astype(mx.uint32)
        words = pad_last(idx, 4 * packed_words(2 * c.stages, c.table_bits)).view(mx.uint32)
        return unpack_fields(words, 2 * c.table_bits, c.stages)

    def _decoded_pairs(self, codes: Codes, start: int) -> mx.array:
        """Keys ``[..., L, P, 2]`` in pair order, rotated to their positions."""
        c = self.config
        k, stages = c.table_size, c.stages
        fields = self._fields(codes["idx"])  # [..., L, R]
        self._heads_axis(fields)
        r = mx.arange(stages, dtype=mx.uint32)
        rows = mx.concatenate(
            [self._row(fields & (k - 1), r, 0, 2), self._row(fields >> c.table_bits, r, 1, 2)],
            axis=-1,
        )  # [..., L, 2R]
        u = mx.take(self._flat, rows, axis=0).sum(-2)
        z = u * codes["norm"].astype(mx.float32)[..., None]
        z = z.reshape(*z.shape[:-1], c.head_dim // 2, 2)
        if self.position_aware:
            z = self.geometry.rotate_pairs(z, start)
        return z

    def _decode(self, codes: Codes, start: int = 0) -> mx.array:
        return self.geometry.from_pairs(self._decoded_pairs(codes, start))

    def _scores(self, q: mx.array, codes: Codes, *, start: int = 0) -> mx.array:
        """``q [B, H, M, D]`` · keys ``[B, H, L]`` at positions ``start + t``.

        The codewords are summed in the position-free basis (one gather of ``2R`` table rows
        per token, shared by the ``M`` query rows) and rotated once per token; scoring the
        ``K``-entry tables per query first (the paper's GPU formulation) needs ``M×`` the
        gathers, which is slower on a CPU.
        """
        z = self._decoded_pairs(codes, start)
        k_hat = z.reshape(*z.shape[:-2], self.config.head_dim)  # pair order
        q_pairs = mx.take(q.astype(mx.float32), self.geometry.perm, axis=-1)
        return q_pairs @ mx.swapaxes(k_hat, -1, -2)

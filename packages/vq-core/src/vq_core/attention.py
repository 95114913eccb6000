"""Attention of queries over what a compressed cache's ``update_and_fetch`` returned.

:meth:`CompressedKVCache.update_and_fetch` returns two :class:`CacheView` objects (keys,
values); a routed attention hands them to :func:`attend` as mlx-lm hands its own keys and
values to ``scaled_dot_product_attention``. Nothing else passes between cache and attention.

Attention is a sum of segments merged once (:mod:`vq_core.segments`): the exact tokens (the
sink, the exact recent tokens and the chunk's own tokens; only the chunk's own are causally
masked) and the compressed history, which every query sees.

* Decode (``g·L <= DECODE_ROWS`` query rows per KV head, no array mask): the compressed
  segment comes from the kernel table (:func:`~vq_core.compressed_attention.compressed_segment`).
* Prefill chunks (more rows, or an array mask): the history is decoded one tile of
  ``PREFILL_TILE`` tokens at a time and attended exactly, so the scores held at once are
  ``[B, Hkv, g·L, PREFILL_TILE]``, never ``[.., history]``. On a GPU the decoded history
  (in the queries' dtype) instead goes to ``mx.fast.scaled_dot_product_attention``, whose
  fused kernel holds no score matrix at all.

Grouped-query folding: ``q [B, Hq, L, D] -> [B, Hkv, g·L, D]`` with ``g = Hq / Hkv``; query
head ``h`` reads KV head ``h // g`` (as ``mx.fast.scaled_dot_product_attention`` does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx

from vq_core.compressed_attention import CompressedSide, compressed_segment, decode_attention
from vq_core.errors import ShapeError
from vq_core.quantizer import Codes, Quantizer
from vq_core.segments import exact_segment, merge, sink_segment

DECODE_ROWS = 32  # query rows per KV head (GQA group x tokens) that take the decode path
PREFILL_TILE = 1024  # history tokens decoded at once by a prefill chunk (CPU)
# GPU: tiles only bound a decode's float32 intermediates (8k tokens x 8 heads x 128 dims is
# 32 MiB) while every tile costs its own kernels: 1,024-token tiles ran an 8k-token prefill
# (2k chunks, Llama-3-8B shape, H200) at 0.25x fp16's rate, one tile per layer at 0.75x.
PREFILL_TILE_GPU = 8192


@dataclass(frozen=True)
class CacheView:
    """One side (keys or values) of a compressed cache, as attention consumes it.

    ``buffer [B, H, C, D]`` holds the exact tokens in its first ``n_exact = s + m`` slots
    (``n_exact`` None: all ``C``; a single cache's decode step writes the next token into
    the unused slots): the first ``n_sink = s`` tokens (the sink, oldest), then the
    ``m`` newest tokens held exactly (the last ``L`` are the current chunk's own). Between
    them in token order: ``n_comp`` compressed tokens, the first ``n_comp`` of the
    preallocated ``codes`` buffers ``[B, H, Lbuf, ...]``, shifted by ``mean [B, H, 1, D]``
    (or None) before encoding. ``finite``: a lazy boolean scalar (or ``[B, 1, 1, 1]``, one
    per row), False once a non-finite key or value reached this cache (attention's output is
    then NaN).

    Batches of ragged sequences (:class:`~vq_core.BatchCompressedKVCache`) add padding:
    ``lengths`` int32 ``[B]`` (row ``b`` holds only its first ``lengths[b] <= n_comp``
    compressed tokens) and ``valid`` bool ``[B, s + m]`` (which exact columns are real).
    Attention never sees a padded position.

    A compiled decode step's views (:meth:`CompressedKVCache.bind`) are shaped like a
    ragged batch's, ``n_comp`` being the code buffers' capacity, and add ``counts`` int32
    ``[2, B]`` (valid compressed tokens, valid exact tokens; ``lengths`` and ``valid`` come
    from it): the one-launch decode reads it instead of Python ints.
    """

    quantizer: Quantizer
    codes: Codes | None
    n_comp: int
    buffer: mx.array
    n_sink: int = 0
    mean: mx.array | None = None
    finite: mx.array | None = None
    lengths: mx.array | None = None
    valid: mx.array | None = None
    n_exact: int | None = None
    counts: mx.array | None = None

    @functools.cached_property
    def exact(self) -> mx.array:
        """The exact tokens, ``[B, H, s + m, D]``."""
        if self.n_exact is None or self.n_exact == self.buffer.shape[2]:
            return self.buffer
        return self.buffer[:, :, : self.n_exact]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, c, d = self.buffer.shape
        return (b, h, self.n_comp + (c if self.n_exact is None else self.n_exact), d)

    @property
    def dtype(self):
        return self.buffer.dtype

    def compressed(self) -> CompressedSide:
        return CompressedSide(
            self.quantizer, self.codes, self.n_comp, self.lengths, start=self.n_sink
        )

    def decoded(self, begin: int, stop: int) -> mx.array:
        """Compressed tokens ``[begin, stop)`` decoded, mean added: float32 ``[B, H, n, D]``."""
        side = self.compressed()
        x = self.quantizer.decode(side.valid(stop, begin), start=self.n_sink + begin)
        return x if self.mean is None else x + self.mean


def attend(
    queries: mx.array,
    keys: CacheView,
    values: CacheView,
    *,
    scale: float,
    mask=None,
    sinks: mx.array | None = None,
) -> mx.array:
    """Softmax attention of ``queries [B, Hq, L, D]`` over the tokens the views hold.

    ``mask``: None, ``"causal"`` (causal within the newest ``L`` tokens, everything older
    visible) or a boolean/additive array broadcastable to ``[B, Hq, L, tokens]`` with the
    tokens in order (sink, compressed, exact). ``sinks``: None or learned attention-sink
    logits ``[Hq]`` (gpt-oss; as ``mx.fast.scaled_dot_product_attention`` takes them: one
    more logit per row with a zero value, not scaled), one more segment of the merge.
    Returns ``[B, Hq, L, D]`` in the queries' dtype; exactly softmax attention over the
    decoded keys and values.
    """
    hq, lq = queries.shape[1], queries.shape[2]
    hkv = keys.buffer.shape[1]
    if hq % hkv:
        raise ShapeError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if isinstance(mask, str) and mask != "causal":
        raise ShapeError(f"mask={mask!r} is not allowed; expected None, 'causal' or an array")
    if sinks is not None and (not isinstance(sinks, mx.array) or sinks.shape != (hq,)):
        got = tuple(sinks.shape) if isinstance(sinks, mx.array) else type(sinks).__name__
        raise ShapeError(f"sinks must be an array of shape ({hq},) (one per query head), got {got}")
    g = hq // hkv
    counted = keys.counts is not None or (keys.lengths is None and keys.valid is None)
    one_row = counted and sinks is None
    if keys.n_comp and lq == 1 and one_row and not isinstance(mask, mx.array):
        # one launch for the whole step, where a kernel does that
        out = decode_attention(queries, keys, values, scale=scale)
        if out is not None:
            return out
    if keys.n_comp == 0:
        if keys.valid is not None:
            m = keys.exact.shape[2]
            mask = _both(_causal(lq, m) if mask == "causal" else mask, _exact_visible(keys))
        out = mx.fast.scaled_dot_product_attention(
            queries, keys.exact, values.exact, scale=scale, mask=mask, sinks=sinks
        )
    elif g * lq <= DECODE_ROWS and not isinstance(mask, mx.array):
        out = _decode(queries, keys, values, scale, mask, g, sinks)
    elif _prefill_on_sdpa():
        out = _prefill_fused(queries, keys, values, scale, mask, sinks)
    else:
        out = _prefill_tiled(queries, keys, values, scale, mask, g, sinks)
    if keys.finite is not None:
        out = mx.where(keys.finite, out, mx.nan)
    return out


def _decode(queries, keys: CacheView, values: CacheView, scale, mask, g, sinks):
    b, hq, lq, d = queries.shape
    q = queries.astype(mx.float32).reshape(b, hq // g, g * lq, d)
    visible = _causal_rows(lq, keys.exact.shape[2], g) if mask == "causal" else None
    visible = _both(visible, _exact_visible(keys))
    parts = [
        exact_segment(q, keys.exact, values.exact, scale=scale, mask=visible),
        compressed_segment(
            q,
            keys.compressed(),
            values.compressed(),
            scale=scale,
            key_mean=keys.mean,
            value_mean=values.mean,
        ),
    ]
    if sinks is not None:
        parts.append(sink_segment(sinks, b, hq // g, lq))
    return merge(parts).reshape(b, hq, lq, values.exact.shape[-1]).astype(queries.dtype)


def _prefill_tiled(queries, keys: CacheView, values: CacheView, scale, mask, g, sinks):
    b, hq, lq, d = queries.shape
    hkv, n, s0 = hq // g, keys.n_comp, keys.n_sink
    q = queries.astype(mx.float32).reshape(b, hkv, g * lq, d)
    m = keys.exact.shape[2]
    cols = _mask_columns(mask, b, hq, lq, n + m, g)  # [B, Hkv, g·L, tokens] or None
    tile = _tile(keys, values)
    parts = []
    for begin in range(0, n, tile):
        stop = min(n, begin + tile)
        k, v = keys.decoded(begin, stop), values.decoded(begin, stop)
        vis = None if cols is None else cols[..., s0 + begin : s0 + stop]
        vis = _both(vis, _compressed_visible(keys, begin, stop))
        parts.append(exact_segment(q, k, v, scale=scale, mask=vis))
    if cols is None:
        vis = _causal_rows(lq, m, g) if mask == "causal" else None
    else:
        vis = mx.concatenate([cols[..., :s0], cols[..., s0 + n :]], axis=-1)
    vis = _both(vis, _exact_visible(keys))
    parts.append(exact_segment(q, keys.exact, values.exact, scale=scale, mask=vis))
    if sinks is not None:
        parts.append(sink_segment(sinks, b, hkv, lq))
    return merge(parts).reshape(b, hq, lq, values.exact.shape[-1]).astype(queries.dtype)


def _prefill_on_sdpa() -> bool:
    """On a GPU, SDPA's fused kernel beats tiles (it holds no scores); on the CPU it is a
    composition that holds ``[B, Hq, L, tokens]`` scores, so tiles win there."""
    return mx.default_device() == mx.gpu


def _prefill_fused(queries, keys: CacheView, values: CacheView, scale, mask, sinks):
    """The history decoded in the queries' dtype, then one fused SDPA (GPU).

    The history is decoded ``PREFILL_TILE_GPU`` tokens at a time, each tile cast to the
    queries' dtype as it is made, so a decode's float32 intermediates exist for one tile at a time
    (MLX evaluates the tiles one after another); what the layer holds at once is its history
    in the queries' dtype, the size of one layer of an fp16 cache."""
    dt, s0 = queries.dtype, keys.n_sink
    tile = _tile(keys, values, PREFILL_TILE_GPU)
    parts = []
    for view in (keys, values):
        exact = view.exact.astype(dt)
        pieces = [exact[:, :, :s0]]
        for begin in range(0, view.n_comp, tile):
            pieces.append(view.decoded(begin, min(view.n_comp, begin + tile)).astype(dt))
        pieces.append(exact[:, :, s0:])
        parts.append(mx.concatenate(pieces, axis=2))
    if keys.valid is not None or keys.lengths is not None:  # a ragged batch: mask padding
        b, n, m, lq = keys.exact.shape[0], keys.n_comp, keys.exact.shape[2], queries.shape[2]
        ones = mx.ones((b, m), dtype=mx.bool_)
        ex = ones if keys.valid is None else keys.valid
        comp = _compressed_visible(keys, 0, n)
        comp = mx.ones((b, n), dtype=mx.bool_) if comp is None else comp[:, 0, 0]
        cols = mx.concatenate([ex[:, :s0], comp, ex[:, s0:]], axis=1)[:, None, None, :]
        mask = _both(_causal(lq, n + m) if mask == "causal" else mask, cols)
    return mx.fast.scaled_dot_product_attention(
        queries, *parts, scale=scale, mask=mask, sinks=sinks
    )


def _tile(keys: CacheView, values: CacheView, size: int | None = None) -> int:
    """``size`` (default ``PREFILL_TILE``) rounded down to whole blocks of both quantizers."""
    size = PREFILL_TILE if size is None else size
    tile = size - size % max(keys.quantizer.token_block, 1)
    return tile - tile % max(values.quantizer.token_block, 1)


def _causal_rows(lq: int, m: int, g: int) -> mx.array | None:
    """``[g·L, m]`` visibility of the ``m`` exact tokens (the chunk's ``L`` last) for the
    folded query rows (row ``i·L + l`` is query token ``l``); None when L == 1."""
    if lq == 1:
        return None
    rows = mx.arange(lq)[:, None] + (m - lq)
    vis = mx.arange(m)[None, :] <= rows
    return mx.tile(vis, (g, 1))


def _causal(lq: int, total: int) -> mx.array:
    """``[L, total]``: query ``l`` (the chunk is the last ``L`` tokens) sees tokens up to itself."""
    return mx.arange(total)[None, :] <= mx.arange(lq)[:, None] + (total - lq)


def _exact_visible(keys: CacheView) -> mx.array | None:
    """bool ``[B, 1, 1, s + m]``: the real exact columns of a ragged batch (None: all)."""
    return None if keys.valid is None else keys.valid[:, None, None, :]


def _compressed_visible(keys: CacheView, begin: int, stop: int) -> mx.array | None:
    """bool ``[B, 1, 1, stop - begin]``: compressed tokens ``[begin, stop)`` each row holds."""
    if keys.lengths is None:
        return None
    return (mx.arange(begin, stop)[None, :] < keys.lengths[:, None])[:, None, None, :]


def _both(a: mx.array | None, b: mx.array | None) -> mx.array | None:
    """Visible under both masks (each None, boolean or additive)."""
    if a is None or b is None:
        return b if a is None else a
    if a.dtype == mx.bool_ and b.dtype == mx.bool_:
        return a & b
    if a.dtype != mx.bool_ and b.dtype != mx.bool_:
        return a + b
    vis, add = (a, b) if a.dtype == mx.bool_ else (b, a)
    return mx.where(vis, add, -mx.inf)


def _mask_columns(mask, b, hq, lq, total, g):
    """An array mask (boolean or additive) over the folded rows ``[B, Hkv, g·L, tokens]``;
    None for no mask and for "causal" (handled per segment)."""
    if not isinstance(mask, mx.array):
        return None
    full = mx.broadcast_to(mask, (b, hq, lq, total))
    return full.reshape(b, hq // g, g * lq, total)

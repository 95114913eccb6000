"""A compressed sliding-window cache: mlx-lm's ``RotatingKVCache`` with packed codes.

``CompressedRotatingKVCache(key_q, value_q, max_size=W, keep=k)`` holds, like mlx-lm's
``RotatingKVCache(max_size=W, keep=k)``, the first ``k`` tokens (exact, as the
:class:`~vq_core.CompressedKVCache` sink) and the newest ``W - k``; everything between is
compressed as in :class:`~vq_core.CompressedKVCache` (new tokens exact until a block fills,
then encoded in one call). Tokens that no future query can see are evicted a whole block at
a time, so up to ``block - 1`` tokens older than the window stay held; the masks this cache
makes (:meth:`make_mask`) hide them, so attention sees exactly the tokens mlx-lm's
``RotatingKVCache`` would hold and its mask would show. A decode step sees the first ``k``
tokens and the newest ``W - k`` (itself included):

    query at position p sees token t  iff  t <= p  and  (t < k  or  t > p - (W - k))

A prefill chunk of ``N`` tokens after ``n`` held follows mlx-lm's buffer: it holds the
first ``k`` tokens, the newest ``W - 1 - k`` older ones and the chunk, and each query sees
the ``window_size`` entries of that buffer up to itself (so with ``keep > 0`` the first
``k`` tokens drop out of view for queries far enough into a long chunk, as in mlx-lm).

Eviction moves the compressed history's first position: compressed token ``i`` is at
position ``k + evicted + i``. Position-aware key quantizers (RoPE-commuting codebooks)
score with each token's position, which this cache does not hand them, so they are refused.
"""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx

from vq_core.attention import CacheView
from vq_core.cache import DEFAULT_BLOCK, CompressedKVCache
from vq_core.cache_integrity import check_arrays, parse_meta, verify_state
from vq_core.errors import CacheStateError, ConfigError, VQError
from vq_core.quantizer import Codes, Quantizer
from vq_core.registry import from_description
from vq_core.validation import check_int


class CompressedRotatingKVCache(CompressedKVCache):
    """Compressed keys and values of one sliding-window layer (see the module docstring)."""

    def __init__(
        self,
        key_quantizer: Quantizer,
        value_quantizer: Quantizer,
        *,
        max_size: int,
        keep: int = 0,
        window: int = 0,
        step: int = 256,
        center: bool = False,
        block: int = DEFAULT_BLOCK,
    ):
        check_int("max_size", max_size, low=1)
        check_int("keep", keep, low=0)
        if keep >= max_size:
            raise ConfigError(f"keep={keep} must be below max_size={max_size}")
        if key_quantizer.position_aware:
            raise ConfigError(
                f"{key_quantizer.method} keys are position-aware; a rotating cache evicts "
                "blocks and does not give them positions: use another key method for "
                "sliding-window layers"
            )
        super().__init__(
            key_quantizer,
            value_quantizer,
            window=window,
            sink=keep,
            step=step,
            center=center,
            block=block,
        )
        self.max_size, self.keep = max_size, keep
        self.evicted = 0  # compressed tokens dropped from the front, whole blocks

    @classmethod
    def like(cls, cache: CompressedKVCache, *, max_size: int, keep: int = 0):
        """An empty rotating cache with ``cache``'s quantizers, window, step, centering and
        block (e.g. mlx-lm's ``RotatingKVCache(max_size, keep)`` layer, compressed)."""
        return cls(
            cache.key_quantizer,
            cache.value_quantizer,
            max_size=max_size,
            keep=keep,
            window=cache.window,
            step=min(cache.step, max_size + cache.block),  # codes for the window, not more
            center=cache.center,
            block=cache.block,
        )

    # -- protocol --------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """As :meth:`CompressedKVCache.update_and_fetch`; then the blocks no later query
        can see are dropped. For one new token the views hold exactly the tokens it sees
        (the partly expired oldest block is decoded, and its visible tokens join the exact
        ones), so decode steps need no mask and take the compressed-attention path; a
        prefill chunk's views may hold up to ``block - 1`` expired tokens, which
        :meth:`make_mask` hides."""
        if keys.shape[2] == 1:  # the base encodes filled blocks first; count them as hidden too
            self._encode_full_blocks(own_graph=True)
        hidden = self._expired_for_one() if keys.shape[2] == 1 else 0
        view = super().update_and_fetch(keys, values)
        if hidden:
            view = tuple(_drop_oldest(v, hidden, self.block) for v in view)
        self._evict()
        return view

    def _expired_for_one(self) -> int:
        """Compressed tokens a decode step's query (at position ``offset``) cannot see."""
        first_visible = self.offset + 1 - (self.max_size - self.keep)
        return min(self._n_comp, max(0, first_visible - self._first_compressed))

    def _evict(self) -> None:
        first_visible = self.offset + 1 - (self.max_size - self.keep)  # for the next query
        dead = min(self._n_comp, first_visible - self._first_compressed)
        dead -= dead % self.block
        if dead <= 0:
            return
        for side, q in (("_keys", self.key_quantizer), ("_values", self.value_quantizer)):
            # shift left into a fresh buffer of the same capacity (a slice would keep the
            # old buffer alive while nbytes counted only the slice)
            setattr(self, side, _shift(getattr(self, side), q.token_strides(), dead))
        self._n_comp -= dead
        self.evicted += dead

    @property
    def _first_compressed(self) -> int:
        """Position of compressed token 0."""
        return self.keep + self.evicted

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """Mask ``[N, T]`` (True = visible) for ``N`` new tokens over the ``T`` tokens the
        next views hold, in their order (sink, compressed, exact, new), reproducing what
        mlx-lm's ``RotatingKVCache`` attends to (module docstring); ``"causal"`` (None for
        one token) when it hides nothing but the chunk's future tokens."""
        w, size, keep = window_size or self.max_size, self.max_size, self.keep
        if N == 1 and w >= size:  # the views hold just what the query sees
            return None
        if N == 1:
            raise ConfigError(
                f"a decode-step mask with window_size={w} below max_size={size} is not "
                "supported (mlx-lm models use window_size == max_size)"
            )
        sink = self._n_sink
        start = self._first_compressed if sink == keep else self.offset  # oldest held non-sink
        drop = max(0, self.offset - (size - 1))  # old non-keep tokens mlx-lm has dropped
        base = min(self.offset, size - 1)  # mlx-lm's buffer index of the first new token
        first_kept = keep + drop  # mlx-lm holds the first `keep` and positions >= this
        oldest = base  # the smallest buffer index among the tokens the views hold
        if sink:
            oldest = 0
        elif start < self.offset:
            oldest = max(start, first_kept) - drop
        trimmed = start < min(first_kept, self.offset)  # held tokens mlx-lm no longer holds
        if not (return_array or trimmed or oldest <= base + N - 1 - w):
            return "causal"
        pos = mx.concatenate([mx.arange(sink), mx.arange(start, self.offset + N)])
        idx = mx.where(pos >= self.offset, pos - self.offset + base, pos - drop)
        idx = mx.where(pos < keep, pos, idx)[None]
        q = mx.arange(base, base + N)[:, None]
        held = ((pos < keep) | (pos >= first_kept))[None]
        return held & (idx <= q) & (idx > q - w)

    def is_trimmable(self) -> bool:
        """As mlx-lm's ``RotatingKVCache``: only while no token has left the window."""
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        return super().trim(n)

    def size(self) -> int:
        return min(self.offset, self.max_size)

    @property
    def merge(self):
        """Absent: mlx-lm batches requests (``BatchGenerator``, the server) only when every
        layer's cache ``hasattr(cache, "merge")``, and there is no batched rotating
        compressed cache yet, so a model with these layers is served one request at a
        time instead of being batched into the full-attention batch cache."""
        raise AttributeError("CompressedRotatingKVCache has no batched form (no merge)")

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self):
        return super().state

    @state.setter
    def state(self, arrays: dict) -> None:
        CompressedKVCache.state.fset(self, arrays)
        self.offset += self.evicted

    @property
    def meta_state(self) -> tuple[str, ...]:
        meta = json.loads(CompressedKVCache.meta_state.fget(self)[0])
        meta.update(max_size=self.max_size, keep=self.keep, evicted=self.evicted)
        return (json.dumps(meta),)

    @classmethod
    def from_state(cls, state: dict, meta_state=None) -> CompressedRotatingKVCache:
        """Rebuild from :attr:`state` (checksum, meta and arrays checked as the base does)."""
        meta_json, arrays = verify_state(state, meta_state)
        meta = parse_meta(meta_json)
        try:
            evicted = int(meta["evicted"])
            keys, values = from_description(meta["key"]), from_description(meta["value"])
            cache = cls(
                keys,
                values,
                max_size=meta["max_size"],
                keep=meta["keep"],
                window=meta["window"],
                center=meta["center"],
                step=meta["step"],
                block=meta["block"],
            )
        except (VQError, KeyError, TypeError, ValueError) as e:
            raise CacheStateError(
                f"rotating cache state meta describes no valid cache ({e})"
            ) from None
        if evicted < 0 or evicted % cache.block:
            raise CacheStateError(f"rotating cache state evicted={evicted} is not whole blocks")
        check_arrays(keys, values, arrays, {**meta, "offset": meta["offset"] - evicted})
        cache.evicted = evicted
        cache.state = arrays
        return cache


def _shift(codes: Codes, strides: dict[str, int], n: int) -> Codes:
    """Each field ``[B, H, L, ...]`` without its first ``n`` tokens (``n / stride`` rows)
    and as many zero rows appended: new buffers of the same capacity."""

    def shift(name: str, a: mx.array) -> mx.array:
        rows = n // strides.get(name, 1)
        return mx.concatenate([a[:, :, rows:], mx.zeros_like(a[:, :, :rows])], axis=2)

    return codes.map(shift)


def _drop_oldest(view: CacheView, hidden: int, block: int) -> CacheView:
    """``view`` without its ``hidden`` oldest compressed tokens (``0 < hidden <= n_comp``,
    all in the first ``block``): that block is decoded, its visible tokens appended to the
    exact sink part, and the compressed part starts one block later."""
    head = min(block, view.n_comp)
    visible = view.decoded(0, head)[:, :, hidden:].astype(view.exact.dtype)  # whole blocks
    strides = view.quantizer.token_strides()
    codes = view.codes.map(lambda k, a: a[:, :, head // strides.get(k, 1) :])
    s0, exact = view.n_sink, view.exact
    held = mx.concatenate([exact[:, :, :s0], visible, exact[:, :, s0:]], axis=2)
    return replace(
        view,
        codes=codes,
        n_comp=view.n_comp - head,
        buffer=held,
        n_sink=s0 + head - hidden,
        n_exact=None,
    )

"""The compressed cache of a batch of sequences, for mlx-lm's continuous batching.

mlx-lm's ``BatchGenerator`` (and its server) batch requests only when every layer's cache
has ``merge``: :meth:`CompressedKVCache.merge` builds a :class:`BatchCompressedKVCache`, and
``filter``/``extend``/``extract``/``prepare``/``finalize`` follow the protocol of mlx-lm's
``BatchKVCache``. Each sequence keeps what it would hold alone, so attention for row ``b``
sees exactly the tokens, codes and centering means of that sequence's own cache:

* the exact sink ``[B, H, S, D]`` (``S = sink``), row ``b``'s ``s_b`` tokens left-aligned;
* the compressed history ``[B, H, cap, ...]`` (codes), row ``b``'s ``n_b`` tokens
  left-aligned, so compressed token ``i`` sits at position ``sink + i`` in every row (the
  ``start`` of position-aware keys) and ragged rows are a per-row valid count
  (:attr:`CompressedSide.lengths`), never a decode;
* the exact recent tokens ``[B, H, T, D]``, row ``b``'s ``e_b`` tokens right-aligned (left
  padding), so a decode step appends one column for every row.

Padding is masked exactly: ``update_and_fetch`` returns views whose ``valid`` marks the real
exact columns and whose ``lengths`` bounds each row's compressed tokens. mlx-lm right-pads a
ragged prompt chunk (``prepare(lengths=..., right_padding=...)``): the padding tokens come
after each row's real ones, so causality already hides them from real queries, and the cache
drops them on arrival instead of storing them (``finalize`` has nothing left to roll).
Each row encodes its own blocks when they fill (its own ``block``/``window`` schedule) and
fixes its own centering means from its first compressed block.

The per-row finiteness flag (``finite [B, 1, 1, 1]``) turns only that row's attention NaN;
nothing here raises mid-batch (that would stop every sequence): an extracted row carries its
flag, and its ``state`` then raises :class:`~vq_core.NonFiniteError`.
"""

from __future__ import annotations

import mlx.core as mx

from vq_core.attention import CacheView
from vq_core.cache_row import CacheRow, copied, copy_arrays, map_pair, pair_cat, stack_rows
from vq_core.errors import ConfigError, ShapeError
from vq_core.quantizer import Codes
from vq_core.submit import submit

_CONFIG = ("window", "sink", "step", "center", "block")


class BatchCompressedKVCache:
    """Compressed keys and values of ``B`` sequences for one attention layer."""

    def __init__(self, template, batch_size: int):
        """``template``: a :class:`~vq_core.CompressedKVCache` whose quantizers and settings
        every row shares; :meth:`extract` returns rows as caches of its class."""
        self._single = type(template)
        self.key_quantizer, self.value_quantizer = template.key_quantizer, template.value_quantizer
        for name in _CONFIG:
            setattr(self, name, getattr(template, name))
        self._n_sink, self._n_comp, self._n_tail = (
            [0] * batch_size,
            [0] * batch_size,
            [0] * batch_size,
        )
        self._centered = [False] * batch_size
        self._sink = self._tail = self._codes = self._mean = None  # (keys, values) pairs
        self._finite = mx.ones((batch_size,), dtype=mx.bool_)  # lazy, per row
        self._dtype = None
        self._pending: list[int] | None = None  # real tokens still to come (right padding)
        self._offset: tuple[list[int], mx.array] | None = None

    # -- building and reshaping the batch (mlx-lm's batch protocol) ------------------------

    @classmethod
    def merge(cls, caches: list) -> BatchCompressedKVCache:
        """One batch from single-sequence caches (all of one layer: same quantizers and
        settings), each row holding exactly what its cache held."""
        if not caches:
            raise ShapeError("merge needs at least one cache")
        batch = cls(caches[0], len(caches))
        for c in caches:
            batch._check_same(c)
        batch._set_rows([c.row() for c in caches])
        return batch

    def extract(self, idx: int):
        """Row ``idx`` as a single-sequence cache of the merged caches' class (own arrays:
        nothing of the batch's buffers stays referenced)."""
        b = self._index(idx)
        single = self._single(
            self.key_quantizer, self.value_quantizer, **{n: getattr(self, n) for n in _CONFIG}
        )
        single.load_row(copied(self._row(b)))
        return single

    def filter(self, batch_indices) -> None:
        """Keep only the rows ``batch_indices`` (in that order), in place."""
        keep = [self._index(i) for i in batch_indices]
        idx = mx.array(keep, dtype=mx.int32)
        for name in ("_n_sink", "_n_comp", "_n_tail", "_centered"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        take = (lambda a: a[idx]) if keep else (lambda a: a[:0])
        self._sink = map_pair(self._sink, take)
        self._tail = map_pair(self._tail, take)
        self._mean = map_pair(self._mean, take)
        self._codes = map_pair(self._codes, lambda c: c.map(lambda _, a: take(a)))
        self._finite = take(self._finite)
        self._shrink()

    def extend(self, other: BatchCompressedKVCache) -> None:
        """Append ``other``'s rows after this batch's, in place."""
        self._check_same(other)
        if self._pending is not None or other._pending is not None:
            raise ShapeError("extend between prompt chunks is not allowed (prepare is pending)")
        rows = [self._row(b) for b in range(self.batch_size)]
        self._set_rows(rows + [other._row(b) for b in range(other.batch_size)])

    def prepare(self, *, lengths=None, right_padding=None, left_padding=None) -> None:
        """Before a right-padded chunk: row ``b`` brings ``lengths[b]`` real tokens, then
        ``right_padding[b]`` padding tokens, which are dropped on arrival."""
        if left_padding is not None and max(left_padding, default=0) > 0:
            raise ShapeError("left padding is not supported; mlx-lm pads prompts on the right")
        if right_padding is not None and max(right_padding, default=0) > 0:
            if lengths is None or len(lengths) != self.batch_size:
                raise ShapeError(f"prepare needs lengths for all {self.batch_size} rows")
            self._pending = [int(n) for n in lengths]

    def finalize(self) -> None:
        """After a padded prompt: the padding was never stored, so only the bookkeeping ends."""
        self._pending = None

    # -- the cache protocol ---------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[CacheView, CacheView]:
        """Append ``keys, values [B, H, L, D]`` (row ``b``'s first ``r_b`` real, the rest
        right padding when :meth:`prepare` announced it); return the views of the cache as
        it was plus the chunk, exact, for :func:`vq_core.attend`."""
        self._check_input(keys, values)
        n_new = keys.shape[2]
        real = [n_new] * self.batch_size
        if self._pending is not None:
            real = [min(n_new, p) for p in self._pending]
            self._pending = [p - r for p, r in zip(self._pending, real, strict=True)]
        decode = n_new == 1 and self._pending is None
        if decode:  # blocks that earlier steps filled, as their own GPU submission
            self._encode_full_blocks()
            submit(self._encoded_arrays())
        views = self._views(keys, values)
        if all(r == n_new for r in real) and all(s == self.sink for s in self._n_sink):
            self._tail = (
                (keys, values) if self._tail is None else pair_cat(self._tail, (keys, values))
            )
            self._n_tail = [e + n_new for e in self._n_tail]
        else:
            self._append_ragged(keys, values, real)
        if not decode:
            self._encode_full_blocks()
        return views

    def _encoded_arrays(self) -> list[mx.array]:
        """What an encode produces: the exact tails, code buffers, means, finite flags."""
        arrays = [self._finite]
        for pair in (self._tail, self._mean):
            arrays += [a for a in pair or () if a is not None]
        for codes in self._codes or ():
            arrays += list(codes.values())
        return arrays

    @property
    def offset(self) -> mx.array:
        """Tokens held per row, int32 ``[B]`` (mlx-lm's RoPE offset of the next token; one
        array per set of lengths, since every layer reads it twice a step)."""
        lengths = self.lengths()
        if self._offset is None or self._offset[0] != lengths:
            self._offset = (lengths, mx.array(lengths, dtype=mx.int32))
        return self._offset[1]

    def lengths(self) -> list[int]:
        return [s + n + e for s, n, e in zip(self._n_sink, self._n_comp, self._n_tail, strict=True)]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """None for one new token, else "causal": padding is masked by the views themselves
        (their ``valid`` and ``lengths``), which routed attention consumes."""
        if window_size is not None:
            raise ConfigError(
                "sliding-window masks over a batched compressed cache are not supported"
            )
        return None if N == 1 else "causal"

    @property
    def state(self) -> list[mx.array]:
        """The arrays held (mlx-lm evaluates them between prompt chunks); a batch is not
        saved: :meth:`extract` its rows and save those."""
        out = []
        for pair in (self._sink, self._tail, self._mean):
            out += [a for a in (pair or ()) if a is not None]
        for c in self._codes or ():
            out += list(c.values())
        return [*out, self._finite]

    @property
    def keys(self) -> mx.array:
        """The per-row finite flag ``[B]``, one array of :attr:`state`, for mlx-lm's
        pipeline-parallel models only: each stage but the last ties its send to its last
        layer's cache with ``cache.keys = mx.depends(cache.keys, h)`` (as for
        :attr:`CompressedKVCache.keys`); attention never reads it as keys."""
        return self._finite

    @keys.setter
    def keys(self, value: mx.array) -> None:
        if not isinstance(value, mx.array) or value.shape != self._finite.shape:
            raise ShapeError(f"cache.keys must be an array of shape {self._finite.shape}")
        self._finite = value

    @property
    def nbytes(self) -> int:
        """Bytes really held: code buffers, exact sink and recent tokens (padding included)."""
        return sum(a.nbytes for a in self.state)

    def is_trimmable(self) -> bool:
        return False

    def size(self) -> int:
        return max(self.lengths(), default=0)

    def empty(self) -> bool:
        return self.size() == 0

    @property
    def batch_size(self) -> int:
        return len(self._n_comp)

    def __deepcopy__(self, memo) -> BatchCompressedKVCache:
        """Independent arrays (code buffers are written in place); quantizers shared."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            setattr(new, name, copy_arrays(value))
        return new

    # -- internals -------------------------------------------------------------------------

    def _quantizers(self):
        return self.key_quantizer, self.value_quantizer

    def _views(self, keys: mx.array, values: mx.array) -> tuple[CacheView, CacheView]:
        n_comp = max(self._n_comp, default=0)
        ragged = len(set(self._n_comp)) > 1
        lengths = mx.array(self._n_comp, dtype=mx.int32) if ragged else None
        valid = self._exact_valid(keys.shape[2])
        finite = self._finite.reshape(-1, 1, 1, 1)
        views = []
        for side, (q, new) in enumerate(zip(self._quantizers(), (keys, values), strict=True)):
            held = [p[side] for p in (self._sink, self._tail) if p is not None] + [new]
            exact = held[0] if len(held) == 1 else mx.concatenate(held, axis=2)
            codes = None if self._codes is None else self._codes[side]
            mean = None if self._mean is None else self._mean[side]
            n_sink = 0 if self._sink is None else self._sink[0].shape[2]
            views.append(
                CacheView(
                    q, codes, n_comp, exact, n_sink, mean, finite, lengths=lengths, valid=valid
                )
            )
        return views[0], views[1]

    def _exact_valid(self, n_new: int) -> mx.array | None:
        """bool ``[B, S + T + n_new]``: which exact columns are real (None: all are)."""
        s_w = 0 if self._sink is None else self._sink[0].shape[2]
        t_w = 0 if self._tail is None else self._tail[0].shape[2]
        short_sink = any(s < s_w for s in self._n_sink)
        padded_tail = any(e < t_w for e in self._n_tail)
        if not (short_sink or padded_tail):
            return None
        parts = []
        if s_w:
            parts.append(mx.arange(s_w)[None, :] < mx.array(self._n_sink)[:, None])
        if t_w:
            pad = mx.array([t_w - e for e in self._n_tail])
            parts.append(mx.arange(t_w)[None, :] >= pad[:, None])
        parts.append(mx.ones((self.batch_size, n_new), dtype=mx.bool_))
        return mx.concatenate(parts, axis=1)

    def _append_ragged(self, keys: mx.array, values: mx.array, real: list[int]) -> None:
        """Row ``b`` gets its first ``real[b]`` new tokens: the sink first, then the tail."""
        b_n, h, _, d = keys.shape
        if self.sink and self._sink is None:
            self._sink = tuple(mx.zeros((b_n, h, self.sink, d), dtype=keys.dtype) for _ in "kv")
        firsts = []
        for b in range(b_n):
            take = min(self.sink - self._n_sink[b], real[b])
            if take > 0:
                s = self._n_sink[b]
                for arr, new in zip(self._sink, (keys, values), strict=True):
                    arr[b : b + 1, :, s : s + take] = new[b : b + 1, :, :take]
                self._n_sink[b] += take
            firsts.append(max(take, 0))
        width = max(e + r - f for e, r, f in zip(self._n_tail, real, firsts, strict=True))
        t_w = 0 if self._tail is None else self._tail[0].shape[2]
        rows = ([], [])
        for b in range(b_n):
            e, r, f = self._n_tail[b], real[b], firsts[b]
            for side, new in enumerate((keys, values)):
                parts = [mx.zeros((1, h, width - e - (r - f), d), dtype=new.dtype)]
                if e:
                    parts.append(self._tail[side][b : b + 1, :, t_w - e :])
                parts.append(new[b : b + 1, :, f:r])
                rows[side].append(mx.concatenate(parts, axis=2))
            self._n_tail[b] = e + r - f
        self._tail = tuple(mx.concatenate(r, axis=0) for r in rows) if width else None

    def _encode_full_blocks(self) -> None:
        """Each row whose exact tokens exceed ``window`` by whole blocks encodes them;
        rows moving the same count from the same position are encoded in one call."""
        groups: dict[tuple[int, int], list[int]] = {}
        for b, e in enumerate(self._n_tail):
            n_move = max(0, e - self.window)
            n_move -= n_move % self.block
            if n_move:
                at = self._n_comp[b] if self.key_quantizer.position_aware else 0
                groups.setdefault((n_move, at), []).append(b)
        if not groups:
            return
        t_w = self._tail[0].shape[2]
        for (n_move, _), rows in groups.items():
            old = [
                mx.concatenate(
                    [
                        t[b : b + 1, :, t_w - self._n_tail[b] : t_w - self._n_tail[b] + n_move]
                        for b in rows
                    ],
                    axis=0,
                )
                for t in self._tail
            ]
            self._encode_rows(rows, *old)
            for b in rows:
                self._n_tail[b] -= n_move
        self._shrink()

    def _encode_rows(self, rows: list[int], k: mx.array, v: mx.array) -> None:
        """Encode ``k, v [len(rows), H, n, D]`` (each row's oldest exact tokens) and write
        the codes after each row's compressed tokens."""
        idx = mx.array(rows, dtype=mx.int32)
        fresh = [i for i, b in enumerate(rows) if self.center and not self._centered[b]]
        if fresh:
            self._fix_means(rows, fresh, k, v)
        if self._mean is not None:
            k = k if self._mean[0] is None else k - self._mean[0][idx]
            v = v if self._mean[1] is None else v - self._mean[1][idx]
        kq, vq = self._quantizers()
        ok = mx.stack([kq.storable(k[i]) & vq.storable(v[i]) for i in range(len(rows))])
        self._finite[idx] = self._finite[idx] & ok
        start = self.sink + self._n_comp[rows[0]]  # the same for every row of a group
        codes = (kq.encode(k, check_finite=False, start=start), vq.encode(v, check_finite=False))
        n = k.shape[2]
        self._grow(max(self._n_comp[b] for b in rows) + n, codes)
        for side, q in enumerate(self._quantizers()):
            strides = q.token_strides()
            for name, new in codes[side].items():
                s = strides.get(name, 1)
                buf = self._codes[side][name]
                for i, b in enumerate(rows):
                    lo = self._n_comp[b] // s
                    buf[b : b + 1, :, lo : lo + n // s] = new[i : i + 1]
        for b in rows:
            self._n_comp[b] += n

    def _fix_means(self, rows, fresh, k, v) -> None:
        """Rows compressing for the first time fix their means (sides that accept it)."""
        _, h, _, d = k.shape
        sel = mx.array(fresh, dtype=mx.int32)
        where = mx.array([rows[i] for i in fresh], dtype=mx.int32)
        if self._mean is None:
            shape = (self.batch_size, h, 1, d)
            self._mean = tuple(
                mx.zeros(shape, dtype=mx.float32) if q.accepts_centering else None
                for q in self._quantizers()
            )
        for m, x in zip(self._mean, (k, v), strict=True):
            if m is not None:
                m[where] = x[sel].astype(mx.float32).mean(axis=2, keepdims=True)
        for i in fresh:
            self._centered[rows[i]] = True

    def _grow(self, need: int, like: tuple[Codes, Codes]) -> None:
        """Code buffers hold at least ``need`` tokens per row (grown in ``step`` tokens)."""
        cap = 0 if self._codes is None else self.key_quantizer.tokens_in(self._codes[0])
        if need <= cap:
            return
        new_cap = self.step * -(-need // self.step)
        grown = []
        for side, q in enumerate(self._quantizers()):
            strides = q.token_strides()
            fields = {}
            for name, arr in like[side].items():
                shape = list(arr.shape)
                shape[0], shape[2] = self.batch_size, (new_cap - cap) // strides.get(name, 1)
                pad = mx.zeros(shape, dtype=arr.dtype)
                old = None if self._codes is None else self._codes[side][name]
                fields[name] = pad if old is None else mx.concatenate([old, pad], axis=2)
            grown.append(Codes(fields))
        self._codes = tuple(grown)

    def _shrink(self) -> None:
        """Drop tail columns no row uses, and code capacity past what any row needs."""
        if self._tail is not None:
            t_w, keep = self._tail[0].shape[2], max(self._n_tail, default=0)
            self._tail = (
                None if keep == 0 else map_pair(self._tail, lambda a: a[:, :, t_w - keep :])
            )
        if self._codes is not None:
            cap = self.key_quantizer.tokens_in(self._codes[0])
            need = self.step * -(-max(self._n_comp, default=0) // self.step)
            if need < cap:
                self._codes = (
                    tuple(
                        c.map(
                            lambda name, a, q=q: mx.contiguous(
                                a[:, :, : need // q.token_strides().get(name, 1)]
                            )
                        )
                        for c, q in zip(self._codes, self._quantizers(), strict=True)
                    )
                    if need
                    else None
                )

    def _row(self, b: int) -> CacheRow:
        """Row ``b``'s content as views into this batch's arrays (copied by the caller)."""
        s, n, e = self._n_sink[b], self._n_comp[b], self._n_tail[b]
        t_w = 0 if self._tail is None else self._tail[0].shape[2]
        codes = None
        if n:
            codes = tuple(
                c.map(lambda name, a, q=q: a[b : b + 1, :, : n // q.token_strides().get(name, 1)])
                for c, q in zip(self._codes, self._quantizers(), strict=True)
            )
        mean = (None, None)
        if self._mean is not None and self._centered[b]:
            mean = tuple(None if m is None else m[b : b + 1] for m in self._mean)
        return CacheRow(
            sink=map_pair(self._sink, lambda a: a[b : b + 1, :, :s]) if s else None,
            codes=codes,
            n_comp=n,
            exact=map_pair(self._tail, lambda a: a[b : b + 1, :, t_w - e :]) if e else None,
            mean=mean,
            finite=self._finite[b],
            dtype=self._dtype or mx.float16,
        )

    def _set_rows(self, rows: list[CacheRow]) -> None:
        """Hold exactly ``rows`` (new arrays: sink left-aligned, tail right-aligned, codes
        from token 0 of each row)."""
        self._n_sink = [0 if r.sink is None else r.sink[0].shape[2] for r in rows]
        self._n_comp = [r.n_comp for r in rows]
        self._n_tail = [0 if r.exact is None else r.exact[0].shape[2] for r in rows]
        self._centered = [any(m is not None for m in r.mean) for r in rows]
        self._finite = mx.stack([mx.array(True) if r.finite is None else r.finite for r in rows])
        self._sink = self._tail = self._codes = self._mean = None
        held = [p for r in rows for p in (r.sink, r.exact) if p is not None]
        coded = [r.codes for r in rows if r.codes is not None]
        if not held and not coded:
            return
        h = held[0][0].shape[1] if held else next(iter(coded[0][0].values())).shape[1]
        d = self.key_quantizer.head_dim
        self._dtype = next(r.dtype for r in rows if r.sink or r.exact or r.codes)
        if any(r.sink is not None for r in rows):
            self._sink = stack_rows(
                [r.sink for r in rows], self.sink, (h, d), self._dtype, left=True
            )
        width = max(self._n_tail)
        if width:
            self._tail = stack_rows([r.exact for r in rows], width, (h, d), self._dtype, left=False)
        if coded:
            self._grow(max(self._n_comp), coded[0])
            for b, r in enumerate(rows):
                for side, q in enumerate(self._quantizers()):
                    strides = q.token_strides()
                    for name, arr in (r.codes[side] if r.codes else {}).items():
                        self._codes[side][name][
                            b : b + 1, :, : r.n_comp // strides.get(name, 1)
                        ] = arr
        for side in (0, 1):
            if any(r.mean[side] is not None for r in rows):
                if self._mean is None:
                    self._mean = (None, None)
                zero = mx.zeros((1, h, 1, d), dtype=mx.float32)
                col = mx.concatenate([zero if r.mean[side] is None else r.mean[side] for r in rows])
                self._mean = tuple(col if i == side else m for i, m in enumerate(self._mean))

    def _check_same(self, other) -> None:
        mine = [q.describe() for q in self._quantizers()] + [getattr(self, n) for n in _CONFIG]
        theirs = [other.key_quantizer.describe(), other.value_quantizer.describe()]
        if mine != theirs + [getattr(other, n) for n in _CONFIG]:
            raise ConfigError("caches merged into one batch must share quantizers and settings")

    def _check_input(self, keys: mx.array, values: mx.array) -> None:
        self.key_quantizer.check_input(keys, "keys", check_finite=False)
        if keys.ndim != 4 or keys.shape != values.shape:
            raise ShapeError(
                f"keys {keys.shape} and values {values.shape}: expected [B, H, L, D] each"
            )
        if keys.shape[0] != self.batch_size:
            raise ShapeError(f"keys have {keys.shape[0]} rows; this batch holds {self.batch_size}")
        held = self._sink or self._tail
        if held is not None and held[0].shape[1] != keys.shape[1]:
            raise ShapeError(
                f"keys have {keys.shape[1]} heads; this batch holds {held[0].shape[1]}"
            )
        self._dtype = self._dtype or keys.dtype

    def _index(self, i) -> int:
        if type(i) is not int or not 0 <= i < self.batch_size:
            raise ShapeError(f"row {i!r} is not in this batch of {self.batch_size}")
        return i

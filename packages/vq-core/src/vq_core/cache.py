"""The one compressed KV cache.

``CompressedKVCache`` holds a key quantizer and a value quantizer and stores **packed
codes** for both, grown in steps of ``step`` tokens, plus two optional exact parts: the
first ``sink`` tokens (attention sinks, StreamingLLM arXiv 2309.17453: heads park attention
there, so their errors cost the most) and a window of the most recent ``window`` tokens. It follows mlx-lm's duck-typed cache protocol
(``update_and_fetch``, ``offset``, ``state``, ``meta_state``, ``from_state``,
``is_trimmable``, ``trim``, ``make_mask``, ``nbytes``, ``empty``, and ``merge``, which
mlx-lm's batching needs: it returns a :class:`~vq_core.BatchCompressedKVCache`) without
importing mlx-lm.
It has no ``bits`` attribute and no ``to_quantized`` method on purpose: mlx-lm reroutes or
replaces caches that have them.

With ``center`` (on in :func:`~vq_core.make_cache`, together with ``sink=1``), the per-head
mean key and value of the first tokens it
compresses are kept (fp32, one vector per head) and subtracted before encoding: on
SmolLM2-135M about half of a key's energy is that mean, and removing it halves the
quantization error; centering needs the sink, since the first token's key is far from the
mean and draws the most attention. Attention adds ``q·mean`` back to the compressed scores (a shift shared
by every compressed token) and the mean value to their weighted sum, so it stays exact.
A side whose quantizer does not accept centering (:attr:`Quantizer.accepts_centering`:
calibrated codebooks, position-aware keys) is stored uncentered.

Compressed token ``i`` is at position ``sink + i`` (the sink is full before anything is
compressed); that is the ``start`` a position-aware key quantizer receives.

``update_and_fetch`` returns the views :func:`vq_core.attention.attend` consumes: for a chunk
of ``L`` new tokens, in token order, the exact sink, the compressed history, the exact recent
tokens, and the chunk's own exact keys/values. New tokens stay exact until more than
``window`` are held by a whole ``block``; then the oldest whole blocks are encoded in one
call (KIVI's full-precision residual, arXiv 2402.02750 Section 3.3, generalized).
"""

from __future__ import annotations

import functools
import json

import mlx.core as mx

from vq_core.attention import CacheView
from vq_core.batch_cache import BatchCompressedKVCache, CacheRow
from vq_core.cache_integrity import (
    CHECKSUM,
    META,
    SEP,
    check_arrays,
    parse_meta,
    state_checksum,
    verify_state,
)
from vq_core.errors import CacheStateError, ConfigError, NonFiniteError, ShapeError, VQError
from vq_core.quantizer import Codes, Quantizer
from vq_core.registry import from_description
from vq_core.submit import submit
from vq_core.validation import check_bool, check_int

_SEP = SEP

# Tokens encoded together (rounded up to the quantizers' token_block): measured on the CPU
# with tools/bench_generate.py (see docs/results.md).
DEFAULT_BLOCK = 32
# The one set of cache defaults (make_cache, vq_mlxlm.patch and the CLI take theirs from
# here): the first token kept exact (the attention sink) and the per-head mean of the first
# compressed tokens subtracted; together they cut KL vs the exact cache by about a third on
# SmolLM2-135M (docs/results.md). Centering without the sink makes it worse.
DEFAULT_SINK = 1
DEFAULT_CENTER = True
# Decode-time encodes as one compiled graph each (CompressedKVCache._encode_compiled); off:
# built op by op, as a prefill chunk's are (kept for A/B benchmarks and tests).
COMPILED_ENCODE = True
# mx.compile on MLX's CPU backend builds each fused graph with the system C++ compiler at
# first use (seconds per graph, and one must be installed): compiled decode-time encodes
# and compiled decode steps (vq_mlxlm.compiled_decode) run on a GPU only, unless this is set.
COMPILE_ON_CPU = False


def compiles_here() -> bool:
    """Whether decode work is compiled on the default device (a GPU, or the CPU with
    ``COMPILE_ON_CPU``)."""
    return mx.default_device() == mx.gpu or COMPILE_ON_CPU


class CompressedKVCache:
    """Compressed keys and values for one attention layer, ``[B, H_kv, tokens, head_dim]``."""

    def __init__(
        self,
        key_quantizer: Quantizer,
        value_quantizer: Quantizer,
        *,
        window: int = 0,
        sink: int = DEFAULT_SINK,
        step: int = 256,
        center: bool = DEFAULT_CENTER,
        block: int = DEFAULT_BLOCK,
        encode_lag: int = 0,
    ):
        if key_quantizer.head_dim != value_quantizer.head_dim:
            raise ConfigError(
                f"key head_dim={key_quantizer.head_dim} != value head_dim="
                f"{value_quantizer.head_dim}"
            )
        check_int("window", window, low=0)
        check_int("sink", sink, low=0)
        check_int("step", step, low=1)
        check_bool("center", center)
        check_int("block", block, low=1)
        if value_quantizer.position_aware:
            raise ConfigError(
                f"{value_quantizer.method} is position-aware (RoPE keys); it cannot compress values"
            )
        self.key_quantizer, self.value_quantizer = key_quantizer, value_quantizer
        self.window, self.sink, self.step, self.center = window, sink, step, center
        unit = max(key_quantizer.token_block, value_quantizer.token_block)
        self.block = unit * -(-block // unit)  # tokens encoded together
        if step % self.block:
            self.step = self.block * -(-step // self.block)
        check_int("encode_lag", encode_lag, low=0)
        if encode_lag >= self.block:
            raise ConfigError(
                f"encode_lag={encode_lag} is not allowed; expected fewer than block={self.block} "
                f"tokens"
            )
        self.encode_lag = encode_lag
        self.offset = 0
        self._n_comp = 0
        self._keys: Codes | None = None
        self._values: Codes | None = None
        # Exact tokens, [B, H, capacity, D] each: the sink (the first _n_sink), then the
        # recent tokens; the first _n_x are valid. Decode steps write into them in place.
        self._xk: mx.array | None = None
        self._xv: mx.array | None = None
        self._n_x = 0
        self._key_mean: mx.array | None = None
        self._value_mean: mx.array | None = None
        self._finite: mx.array | None = None  # lazy: all compressed tokens were finite
        self._bound: tuple | None = None  # a compiled decode step's (counts, at) while traced

    # -- protocol --------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[CacheView, CacheView]:
        """Append ``keys, values [B, H_kv, L, D]``; return the (keys, values) views that
        :func:`vq_core.attention.attend` consumes (the routed attention gets them as mlx-lm
        passes its own keys and values).

        The views hold the cache as it was plus the ``L`` new tokens, exact. The new tokens
        join the exact recent tokens, and once those exceed ``window`` by a whole ``block``,
        the oldest whole blocks are encoded in one call: after a prefill chunk at once,
        after a decode step at the start of the next one (as its own GPU submission), so
        most decode steps do no encode work and a step's views are the same either way.
        Decode steps wait ``encode_lag`` more tokens (fewer than a block) before encoding:
        the layers of a patched model get lags spread over the block, so each decode step
        encodes about one layer's block instead of every layer's at once (building that
        step's encode graphs took ~30 ms of host time on an H200 at 8B shape).
        Non-finite values are caught without a per-step sync (see :meth:`check_finite`).
        """
        if self._bound is not None:
            return self._bound_step(keys, values)
        if not self._like_buffers(keys, values):
            self._check(keys, "keys")
            self._check(values, "values")
            if keys.shape != values.shape:
                raise ShapeError(f"keys {keys.shape} and values {values.shape} differ in shape")
        n_new = keys.shape[2]
        if n_new > 1:  # a prefill chunk: the previous chunk has been evaluated
            self.check_finite()
        else:  # a decode step: blocks that earlier steps filled, encoded on their own
            self._encode_full_blocks(own_graph=True)
        self._write_exact(keys, values)
        self.offset += n_new
        view = self._views()
        if n_new > 1:
            self._encode_full_blocks(own_graph=False)
        return view

    def _encode_full_blocks(self, *, own_graph: bool) -> None:
        """Encode the oldest exact tokens past ``window`` in whole blocks and drop them from
        the exact buffers (or only shrink buffers a prefill left larger than a decode
        step needs). With ``own_graph`` the work is handed to the GPU at once
        (``mx.async_eval``): a decode step's graph then has the same ops every step, where
        folding a block's encode into one step in ``block`` made MLX's CUDA backend build
        and instantiate new graphs for it (~30 ms per step on an H200, 8B shape). Under
        ``mx.compile`` nothing can be submitted, and the encode stays in the traced graph."""
        n_sink, n_x = self._n_sink, self._n_x
        lag = self.encode_lag if own_graph else 0
        n_move = max(0, n_x - n_sink - self.window - lag)
        n_move -= n_move % self.block
        steady = self._steady_decode if own_graph else self._steady
        if n_move and own_graph and self._encodes_compiled():
            self._encode_compiled(n_sink, n_move, n_x, steady)
            self._n_x -= n_move
        elif n_move:
            span = slice(n_sink, n_sink + n_move)
            self._encode(self._xk[:, :, span], self._xv[:, :, span])
            self._xk, self._xv = (
                _drop(b, n_sink, n_move, n_x, steady) for b in (self._xk, self._xv)
            )
            self._n_x -= n_move
        elif self._xk is not None and n_x <= steady and self._resize(own_graph, steady):
            self._xk, self._xv = (_drop(b, n_sink, 0, n_x, steady) for b in (self._xk, self._xv))
        else:
            return
        if own_graph:
            submit(self._encoded_arrays())

    def _resize(self, decode: bool, steady: int) -> bool:
        """Whether the exact buffers change size before a step: a prefill shrinks buffers
        larger than ``steady``; a decode step also grows smaller ones, so that every layer
        of a model decodes with buffers of one shape whatever its lag (each new shape costs
        the compiled decode step a new trace and new GPU graphs)."""
        size = self._xk.shape[2]
        return size > steady or (decode and size < steady)

    def _encoded_arrays(self) -> list[mx.array]:
        """What an encode produces: code buffers, exact buffers, means, the finite flag."""
        arrays = [self._xk, self._xv]
        arrays += [
            a for codes in (self._keys, self._values) if codes is not None for a in codes.values()
        ]
        arrays += [a for a in (self._key_mean, self._value_mean, self._finite) if a is not None]
        return arrays

    @property
    def _steady(self) -> int:
        """Exact tokens a cache holds between encodes: the sink, the window and one block
        (decode steps: see :attr:`_steady_decode`)."""
        return self.sink + self.window + self.block

    @property
    def _steady_decode(self) -> int:
        """:attr:`_steady` plus, with an encode lag, room for any lag (one more block):
        decode steps bring the exact buffers to this size once, on the first decode step,
        the same size for every lag > 0 (a prefill does not allocate it)."""
        return self._steady + (self.block if self.encode_lag else 0)

    @property
    def _n_sink(self) -> int:
        """Sink tokens held (the first ``sink`` tokens ever seen, once they arrived)."""
        offset = self.offset if self._bound is None else self._held[-1]  # bound: an array
        return min(self.sink, offset)

    def _write_exact(self, keys: mx.array, values: mx.array) -> None:
        """Append ``L`` new tokens to the exact buffers: in place when they fit (a decode
        step), else into new buffers holding what is valid plus the new tokens."""
        n, n_new = self._n_x, keys.shape[2]
        buf = self._xk
        fits = buf is not None and buf.dtype == keys.dtype and buf.shape[:2] == keys.shape[:2]
        if fits and n + n_new <= buf.shape[2]:
            self._xk[:, :, n : n + n_new] = keys
            self._xv[:, :, n : n + n_new] = values
        else:
            steady = self._steady_decode if n_new == 1 else self._steady
            pad = max(0, steady - n - n_new)
            self._xk, self._xv = (
                _grown(old, new, n, pad) for old, new in ((self._xk, keys), (self._xv, values))
            )
        self._n_x = n + n_new

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if a non-finite key or value has been compressed.

        Encoding folds ``isfinite(...).all()`` of each block into one lazy flag; attention
        gates its output on it (NaN once it is False), so the flag is evaluated with every
        step's output and never grows a graph. It is read here, at points where the cache
        is evaluated anyway: the start of each prefill chunk and ``state``.
        """
        if self._finite is not None and not self._finite.item():
            raise NonFiniteError(
                "keys or values stored in this cache contain NaN or Inf, or norms past what "
                "their codes hold (float16: 65504) (a diverged model or a corrupted input); "
                "the compressed history is unusable"
            )

    def _views(self) -> tuple[CacheView, CacheView]:
        n_sink, n_x = self._n_sink, self._n_x
        return tuple(
            CacheView(q, codes, self._n_comp, buf, n_sink, mean, self._finite, n_exact=n_x)
            for q, codes, buf, mean in (
                (self.key_quantizer, self._keys, self._xk, self._key_mean),
                (self.value_quantizer, self._values, self._xv, self._value_mean),
            )
        )

    def _encode(self, k_old: mx.array, v_old: mx.array) -> None:
        """Encode whole blocks ``[B, H, n, D]`` (the oldest exact tokens) and append them."""
        if self.center and self._key_mean is None and self._value_mean is None:
            # fixed by the first tokens compressed (for the sides that accept it)
            if self.key_quantizer.accepts_centering:
                self._key_mean = k_old.astype(mx.float32).mean(axis=2, keepdims=True)
            if self.value_quantizer.accepts_centering:
                self._value_mean = v_old.astype(mx.float32).mean(axis=2, keepdims=True)
        start = self._comp_start + self._n_comp  # position of k_old's first token
        kc, vc, finite = _block_codes(
            self.key_quantizer, self.value_quantizer, k_old, v_old,
            self._key_mean, self._value_mean, start,
        )  # fmt: skip
        self._finite = finite if self._finite is None else self._finite & finite
        self._append(kc, vc, k_old.shape[2])

    def _encodes_compiled(self) -> bool:
        """Whether a decode step's encode can run as one compiled graph
        (:func:`_encode_graph`): something is compressed already (the centering means are
        set; the finite flag exists) and the keys' codes do not depend on positions."""
        kq, vq = self.key_quantizer, self.value_quantizer
        sets_means = self.center and self._key_mean is None and self._value_mean is None
        sets_means = sets_means and (kq.accepts_centering or vq.accepts_centering)
        ready = COMPILED_ENCODE and compiles_here()
        ready = ready and self._keys is not None and self._finite is not None
        return ready and not (sets_means or kq.position_aware)

    def _encode_compiled(self, n_sink: int, n_move: int, n_x: int, steady: int) -> None:
        """:meth:`_encode` plus :func:`_drop` of the exact buffers as one ``mx.compile``d
        graph, the code write position an array: one trace per layer serves every
        decode-time encode until the code buffers grow (~140 graph nodes built op by op in
        Python and dispatched one by one for turboquant_mse, before)."""
        kq, vq, n = self.key_quantizer, self.value_quantizer, self._n_comp
        self._keys = _reserved(self._keys, self._keys, kq, n + n_move, self.step)
        self._values = _reserved(self._values, self._values, vq, n + n_move, self.step)
        fields = (tuple(sorted(self._keys)), tuple(sorted(self._values)))
        means = (self._key_mean is not None, self._value_mean is not None)
        fn = _encode_graph(kq, vq, n_sink, n_move, n_x, steady, fields, means)
        arrays = [self._xk, self._xv, mx.array([n], dtype=mx.int32)]
        arrays += [self._keys[f] for f in fields[0]] + [self._values[f] for f in fields[1]]
        arrays += [a for a in (self._key_mean, self._value_mean) if a is not None]
        out = iter(fn(*arrays, self._finite))
        self._xk, self._xv = next(out), next(out)
        self._keys = Codes({f: next(out) for f in fields[0]})
        self._values = Codes({f: next(out) for f in fields[1]})
        self._finite = next(out)
        self._n_comp = n + n_move

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """Mask for ``N`` new tokens after ``offset`` cached ones (mlx-lm's convention)."""
        if N == 1:
            return None
        if return_array or (window_size is not None and window_size < self.offset + N):
            rinds = mx.arange(self.offset + N)
            linds = mx.arange(self.offset, self.offset + N)[:, None]
            mask = linds >= rinds
            if window_size is not None:
                mask = mask & (linds < rinds + window_size)
            return mask
        return "causal"

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` tokens (window, then compressed, then sink); returns ``n``."""
        n = min(max(n, 0), self.offset)
        n_sink = self._n_sink
        from_recent = min(n, self._n_x - n_sink)
        self._n_x -= from_recent
        left = n - from_recent
        from_comp = min(left, self._n_comp)
        if from_comp:
            new_n = self._n_comp - from_comp
            cut = new_n - new_n % self.block
            if cut < new_n:  # a partial block goes back to the exact window, decoded
                end = cut + self.block
                kc = _slice(self._keys, self.key_quantizer, end)
                k = self.key_quantizer.decode(kc, start=self._comp_start)
                v = self.value_quantizer.decode(_slice(self._values, self.value_quantizer, end))
                if self._key_mean is not None:
                    k = k + self._key_mean
                if self._value_mean is not None:
                    v = v + self._value_mean
                dt = self._dtype
                pad = max(0, self._steady - n_sink - (new_n - cut))
                self._xk = _grown(self._xk, k[:, :, cut:new_n].astype(dt), n_sink, pad)
                self._xv = _grown(self._xv, v[:, :, cut:new_n].astype(dt), n_sink, pad)
                self._n_x = n_sink + new_n - cut
            self._n_comp = cut
        self._n_x -= left - from_comp  # sink tokens, once nothing newer is left
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes this cache really holds: allocated code buffers plus the exact window."""
        total = 0
        for codes in (self._keys, self._values):
            if codes is not None:
                total += codes.nbytes
        for a in self._exact_parts():
            if a is not None:
                total += a.nbytes
        return total

    def _exact_parts(self) -> list[mx.array]:
        """Arrays held besides the codes: the exact buffers (sink and recent tokens, at their
        allocated size) and the centering means."""
        parts = (self._xk, self._xv, self._key_mean, self._value_mean)
        return [a for a in parts if a is not None]

    @property
    def used_nbytes(self) -> int:
        """Bytes of the codes of the tokens held (no step padding) plus the exact tokens
        held and the centering means."""
        total = 0
        for codes, q in ((self._keys, self.key_quantizer), (self._values, self.value_quantizer)):
            if codes is not None and self._n_comp:
                total += _slice(codes, q, self._n_comp).nbytes
        for a in (self._xk, self._xv):
            if a is not None:
                total += a.nbytes // a.shape[2] * self._n_x
        for a in (self._key_mean, self._value_mean):
            if a is not None:
                total += a.nbytes
        return total

    @property
    def compressed_tokens(self) -> int:
        return self._n_comp

    @property
    def exact_tokens(self) -> int:
        """Recent tokens held exactly (not yet encoded; the sink not counted)."""
        return self._n_x - self._n_sink

    # -- pipeline parallelism ----------------------------------------------------------------

    @property
    def keys(self) -> mx.array | None:
        """One array this cache holds (its exact keys' buffer, else a key code field), for mlx-lm's pipeline-parallel models only: each stage but the last ties its
        send of activations to its last layer's cache with ``cache.keys = mx.depends(
        cache.keys, h)``, so that evaluating the cache state (as a prefill chunk does) also
        sends. It is no view of all the keys; attention never reads it."""
        name, field = self._tie_point()
        if name is None:
            return None
        held = getattr(self, name)
        return held[field] if field is not None else held

    @keys.setter
    def keys(self, value: mx.array) -> None:
        name, field = self._tie_point()
        if name is None or not isinstance(value, mx.array):
            raise CacheStateError("cache.keys can only replace an array this cache holds")
        held = getattr(self, name)
        if tuple(value.shape) != tuple((held[field] if field else held).shape):
            raise ShapeError(f"cache.keys: shape {value.shape} differs from the held array's")
        if field is None:
            setattr(self, name, value)
        else:
            held[field] = value

    def _tie_point(self) -> tuple[str | None, str | None]:
        """(attribute, code field or None) of the array :attr:`keys` exposes: the exact keys'
        buffer while it holds a token (the state slices it), else a key code field."""
        if self._xk is not None and self._n_x:
            return "_xk", None
        if self._keys is not None and self._n_comp:
            return "_keys", next(iter(self._keys))
        return None, None

    # -- batching (mlx-lm's BatchGenerator) ------------------------------------------------

    @classmethod
    def merge(cls, caches: list[CompressedKVCache]) -> BatchCompressedKVCache:
        """One :class:`~vq_core.BatchCompressedKVCache` holding these caches' sequences
        (mlx-lm batches requests only when every layer's cache has ``merge``)."""
        return BatchCompressedKVCache.merge(caches)

    def row(self) -> CacheRow:
        """The tokens held, as one row of a batch (views of this cache's arrays)."""
        codes = None
        if self._n_comp:
            codes = tuple(
                _slice(c, q, self._n_comp)
                for c, q in ((self._keys, self.key_quantizer), (self._values, self.value_quantizer))
            )
        n_sink, n_x = self._n_sink, self._n_x
        sink = exact = None
        if n_sink:
            sink = (self._xk[:, :, :n_sink], self._xv[:, :, :n_sink])
        if n_x > n_sink:
            exact = (self._xk[:, :, n_sink:n_x], self._xv[:, :, n_sink:n_x])
        return CacheRow(
            sink=sink,
            codes=codes,
            n_comp=self._n_comp,
            exact=exact,
            mean=(self._key_mean, self._value_mean),
            finite=self._finite,
            dtype=self._dtype,
        )

    def load_row(self, row: CacheRow) -> None:
        """Hold exactly ``row`` (this cache must be empty): a sequence leaving a batch."""
        if not self.empty():
            raise CacheStateError(f"load_row needs an empty cache; this one holds {self.offset}")
        self._keys, self._values = row.codes or (None, None)
        self._n_comp = row.n_comp
        self._load_exact(row.sink, row.exact)
        self._key_mean, self._value_mean = row.mean
        self._finite = row.finite
        self._input_dtype = row.dtype
        self.offset = self._n_comp + self._n_x

    def _load_exact(self, sink: tuple | None, exact: tuple | None) -> None:
        """Exact buffers holding ``sink`` then ``exact`` ((keys, values) pairs or None)."""
        self._xk = self._xv = None
        self._n_x = 0
        for pair in (sink, exact):
            if pair is not None and pair[0] is not None:
                n, n_new = self._n_x, pair[0].shape[2]
                pad = max(0, self._steady - n - n_new)
                self._xk = _grown(self._xk, pair[0], n, pad)
                self._xv = _grown(self._xv, pair[1], n, pad)
                self._n_x = n + n_new

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> dict[str, mx.array | str]:
        """Packed codes of the compressed tokens, the exact window, ``"meta"`` (JSON) and
        ``"checksum"`` (see :mod:`vq_core.cache_integrity`, computed lazily in the graph).

        The meta string makes the state self-describing, so loaders that keep only
        ``state`` (mlx-lm's ``load_prompt_cache`` calls ``from_state(state)``) work, and the
        checksum makes them refuse a corrupt one. Raises :class:`NonFiniteError` if a
        non-finite key or value was compressed.
        """
        self.check_finite()
        arrays: dict[str, mx.array] = {}
        for tag, codes, q in (
            ("k", self._keys, self.key_quantizer),
            ("v", self._values, self.value_quantizer),
        ):
            if codes is not None and self._n_comp:
                for name, arr in _slice(codes, q, self._n_comp).items():
                    arrays[f"{tag}{_SEP}{name}"] = arr
        n_sink = self._n_sink
        if self._n_x > n_sink:
            arrays["exact_k"] = self._xk[:, :, n_sink : self._n_x]
            arrays["exact_v"] = self._xv[:, :, n_sink : self._n_x]
        if n_sink:
            arrays["sink_k"], arrays["sink_v"] = self._xk[:, :, :n_sink], self._xv[:, :, :n_sink]
        if self._key_mean is not None:
            arrays["key_mean"] = self._key_mean
        if self._value_mean is not None:
            arrays["value_mean"] = self._value_mean
        meta = self.meta_state[0]
        return {META: meta, **arrays, CHECKSUM: state_checksum(meta, arrays)}

    @state.setter
    def state(self, arrays: dict) -> None:
        arrays = {k: v for k, v in arrays.items() if k not in (META, CHECKSUM)}
        keys = Codes({k[3:]: v for k, v in arrays.items() if k.startswith("k" + _SEP)})
        values = Codes({k[3:]: v for k, v in arrays.items() if k.startswith("v" + _SEP)})
        self._keys = keys or None
        self._values = values or None
        self._n_comp = self.key_quantizer.tokens_in(keys) if keys else 0
        held = [arrays.get(f"{part}_{side}") for side in "kv" for part in ("sink", "exact")]
        sink_k, exact_k, sink_v, exact_v = held
        self._key_mean = arrays.get("key_mean")
        self._value_mean = arrays.get("value_mean")
        self._load_exact((sink_k, sink_v), (exact_k, exact_v))
        self.offset = self._n_comp + self._n_x

    @property
    def meta_state(self) -> tuple[str, ...]:
        meta = {
            "key": self.key_quantizer.describe(),
            "value": self.value_quantizer.describe(),
            "window": self.window,
            "sink": self.sink,
            "center": self.center,
            "step": self.step,
            "block": self.block,
            "encode_lag": self.encode_lag,
            "offset": self.offset,
        }
        return (json.dumps(meta),)

    @meta_state.setter
    def meta_state(self, v) -> None:  # set through from_state
        raise AttributeError("meta_state is read-only; use CompressedKVCache.from_state")

    @classmethod
    def from_state(cls, state: dict, meta_state=None) -> CompressedKVCache:
        """Rebuild a cache from :attr:`state`, refusing (:class:`CacheStateError`) one whose
        checksum, meta, code shapes/dtypes or offset do not match."""
        meta_json, arrays = verify_state(state, meta_state)
        meta = parse_meta(meta_json)
        try:
            keys, values = from_description(meta["key"]), from_description(meta["value"])
            cache = cls(
                keys,
                values,
                window=meta["window"],
                sink=meta["sink"],
                center=meta["center"],
                step=meta["step"],
                block=meta.get("block", 1),
                encode_lag=meta.get("encode_lag", 0),
            )
        except (VQError, KeyError, TypeError) as e:
            raise CacheStateError(f"cache state meta describes no valid cache ({e})") from None
        check_arrays(keys, values, arrays, meta)
        cache.state = arrays
        return cache

    def __deepcopy__(self, memo) -> CompressedKVCache:
        """An independent copy of the tokens held (mlx-lm's server copies cached prompts).

        Every array is a new array object, because appending codes assigns into the code
        buffers in place; the quantizers are shared, since they hold only their config and
        arrays derived from it, never tokens.
        """
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            if isinstance(value, mx.array):
                value = mx.array(value)
            elif isinstance(value, Codes):
                value = value.map(lambda _, a: mx.array(a))
            setattr(new, name, value)
        return new

    # -- compiled decode steps (vq_mlxlm.compiled_decode) -----------------------------------

    def decode_inputs(self) -> list[mx.array] | None:
        """Get ready for one decode token, then return the arrays a decode step reads:
        the exact buffers, the code buffers (key fields, then value fields, sorted), then
        whichever of the key mean, value mean and finite flag exist (:meth:`decode_layout`
        says which). Blocks earlier steps filled are encoded first, as
        :meth:`update_and_fetch` does. None when a step of arrays alone cannot run now:
        nothing compressed yet, or no free slot for the token in the exact buffers."""
        self._encode_full_blocks(own_graph=True)
        if self._keys is None or self._xk is None or not self._n_x:
            return None
        if self._n_x >= self._xk.shape[2]:
            return None
        arrays = [self._xk, self._xv]
        arrays += [codes[k] for codes in (self._keys, self._values) for k in sorted(codes)]
        return arrays + [
            a for a in (self._key_mean, self._value_mean, self._finite) if a is not None
        ]

    def code_capacity(self) -> int:
        """Tokens the code buffers hold room for (0 before anything is compressed)."""
        return 0 if self._keys is None else self.key_quantizer.tokens_in(self._keys)

    def reserve(self, tokens: int) -> None:
        """Grow the code buffers to hold at least ``tokens`` tokens now (as an encode would
        when it needs the room): a compiled decode grows every layer's buffers at one step,
        so that one new trace serves them all."""
        if self._keys is not None:
            self._keys = _reserved(self._keys, self._keys, self.key_quantizer, tokens, self.step)
            vq = self.value_quantizer
            self._values = _reserved(self._values, self._values, vq, tokens, self.step)

    def decode_layout(self) -> tuple:
        """What a decode step's graph depends on besides the shapes of :meth:`decode_inputs`:
        the configuration (quantizers with their seeds, whose matrices a trace holds as
        constants), the code field names, which optional arrays come, the sink. A compiled
        step is traced once per layout and set of shapes."""
        fields = tuple(tuple(sorted(c)) for c in (self._keys, self._values))
        optional = tuple(a is not None for a in (self._key_mean, self._value_mean, self._finite))
        return (self._config_key, fields, optional, self._n_sink)

    @functools.cached_property
    def _config_key(self) -> str:
        """This cache's configuration as one string (:meth:`decode_layout`)."""
        config = [type(self).__name__, self.key_quantizer.describe()]
        config += [self.value_quantizer.describe(), self.window, self.sink, self.center]
        return json.dumps(config, sort_keys=True, default=str)

    def decode_counts(self) -> list[list[int]]:
        """``[2, B]`` ints for the next decode token: compressed tokens, then exact tokens
        with the new one (the new token is written at exact slot ``counts[1] - 1``)."""
        b = self._xk.shape[0]
        return [[self._n_comp] * b, [self._n_x + 1] * b]

    def exact_slots(self) -> int:
        """Slots of the exact buffers (sink, window and a block): the width of
        :meth:`bind`'s write mask."""
        return self._xk.shape[2]

    def bind(self, arrays: list[mx.array], counts: mx.array, here: mx.array, offset) -> None:
        """While a compiled step traces: hold ``arrays`` (as :meth:`decode_inputs` returned
        them, traced) in place of the held arrays, and take the step's ints as traced
        arrays: ``counts`` int32 ``[2, B]`` (:meth:`decode_counts`), ``here`` bool
        ``[exact_slots()]`` (True at the new token's exact slot, ``counts[1] - 1``) and
        ``offset`` (a scalar: the new token's position, as mlx-lm's RoPE reads
        ``cache.offset``). :meth:`update_and_fetch` then writes the token where ``here`` is
        True and returns views with array counts, so the trace reads no Python int that
        changes from step to step. :meth:`unbind` restores the held state."""
        if here.shape != (self.exact_slots(),) or here.dtype != mx.bool_:
            raise ShapeError(
                f"the write mask must be bool [{self.exact_slots()}], got {here.dtype} "
                f"{tuple(here.shape)}"
            )
        self._held = (self._xk, self._xv, self._keys, self._values, self._key_mean,
                      self._value_mean, self._finite, self.offset)  # fmt: skip
        it = iter(arrays)
        self._xk, self._xv = next(it), next(it)
        self._keys, self._values = (
            Codes({k: next(it) for k in sorted(c)}) for c in self._held[2:4]
        )
        self._key_mean, self._value_mean, self._finite = (
            None if a is None else next(it) for a in self._held[4:7]
        )
        self._bound = (counts, here)
        self.offset = offset

    def unbind(self) -> tuple[mx.array, mx.array]:
        """Restore what :meth:`bind` replaced; returns the traced exact buffers (the step's
        outputs)."""
        out = (self._xk, self._xv)
        (self._xk, self._xv, self._keys, self._values, self._key_mean, self._value_mean,
         self._finite, self.offset) = self._held  # fmt: skip
        self._bound = self._held = None
        return out

    def end_decode(self, keys: mx.array, values: mx.array) -> None:
        """After a compiled step: its exact buffers ``keys, values`` hold the new token."""
        self._xk, self._xv = keys, values
        self._n_x += 1
        self.offset += 1

    def _bound_step(self, keys: mx.array, values: mx.array) -> tuple[CacheView, CacheView]:
        """:meth:`update_and_fetch` while bound: one token written at an array position,
        views with array counts (the whole code buffers, ``lengths`` and ``valid`` from
        ``counts``, as a ragged batch's)."""
        if not self._like_buffers(keys, values):
            raise ShapeError(
                f"a compiled decode step takes one token shaped like the held ones; got keys "
                f"{tuple(keys.shape)} {keys.dtype} for buffers {tuple(self._xk.shape)} "
                f"{self._xk.dtype}"
            )
        counts, here = self._bound
        # A select over the (block-sized) exact buffers reading the step's write mask, not
        # a slice update at an array start: MLX runs a one-thread offset kernel before every
        # dynamic slice update (docs/gpu.md); a mask compared from the slot in the graph
        # costs a kernel per layer (MLX does not fuse one comparison into two selects).
        mask = here[None, None, :, None]
        self._xk = mx.where(mask, keys, self._xk)
        self._xv = mx.where(mask, values, self._xv)
        valid = _slots(self.exact_slots(), counts.dtype)[None, :] < counts[1][:, None]
        ragged = {"lengths": counts[0], "valid": valid, "counts": counts}
        n_cap = self.code_capacity()
        return tuple(
            CacheView(q, codes, n_cap, buf, self._n_sink, mean, self._finite, **ragged)
            for q, codes, buf, mean in (
                (self.key_quantizer, self._keys, self._xk, self._key_mean),
                (self.value_quantizer, self._values, self._xv, self._value_mean),
            )
        )

    # -- internals -------------------------------------------------------------------------

    @property
    def _comp_start(self) -> int:
        """Position of the first compressed token: the number of sink tokens held."""
        return self._n_sink

    @property
    def _dtype(self):
        if self._xk is not None:
            return self._xk.dtype
        return getattr(self, "_input_dtype", mx.float16)

    def _like_buffers(self, keys: mx.array, values: mx.array) -> bool:
        """Whether one decode token's ``keys, values`` have the shape and dtype of tokens
        the exact buffers already hold (checked by :meth:`_check` when they came): the
        checks would pass again, so a decode step skips them (host time on every step)."""
        buf = self._xk
        if buf is None or not self._n_x or keys.dtype != buf.dtype or values.dtype != buf.dtype:
            return False
        shape = keys.shape
        b, h, _, d = buf.shape
        return shape == values.shape and shape == (b, h, 1, d)

    def _check(self, x: mx.array, name: str) -> None:
        self.key_quantizer.check_input(x, name, check_finite=False)
        if x.ndim != 4:
            raise ShapeError(f"{name} must be [B, H_kv, L, head_dim], got {tuple(x.shape)}")
        held = self._held_batch_heads()
        if held is not None and tuple(x.shape[:2]) != held:
            raise ShapeError(
                f"{name} has shape {tuple(x.shape)}; this cache holds {self.offset} tokens "
                f"for [B, H_kv] = {list(held)}"
            )
        self._input_dtype = x.dtype

    def _held_batch_heads(self) -> tuple[int, int] | None:
        """``(B, H_kv)`` of the tokens held (read from array shapes), or None when empty."""
        if self._xk is not None and self._n_x:
            return tuple(self._xk.shape[:2])
        if self._keys is not None and self._n_comp:
            return tuple(next(iter(self._keys.values())).shape[:2])
        return None

    def _append(self, kc: Codes, vc: Codes, n: int) -> None:
        start = self._n_comp
        self._keys = _write(self._keys, kc, self.key_quantizer, start, n, self.step)
        self._values = _write(self._values, vc, self.value_quantizer, start, n, self.step)
        self._n_comp = start + n


@functools.lru_cache(maxsize=256)
def _slots(n: int, dtype) -> mx.array:
    """``arange(n)`` built once (a constant of a compiled graph, no kernel per step)."""
    out = mx.arange(n, dtype=dtype)
    mx.eval(out)
    return out


@functools.lru_cache(maxsize=1024)
def _encode_graph(kq, vq, n_sink, n_move, n_x, steady, fields, means):
    """The compiled decode-time encode of :meth:`CompressedKVCache._encode_compiled` for
    these quantizers and static sizes: ``fn(xk, xv, at, *key codes, *value codes, *means,
    finite)`` encodes exact tokens ``[n_sink, n_sink + n_move)`` of ``xk, xv [B, H, C, D]``
    (centered by the means given), writes their codes at compressed token ``at`` (int32
    ``[1]``) and returns the exact buffers without them (:func:`_drop`), the code buffers
    and the finite flag."""

    def fn(xk, xv, at, *rest):
        it = iter(rest)
        kbuf = {f: next(it) for f in fields[0]}
        vbuf = {f: next(it) for f in fields[1]}
        k_mean, v_mean = (next(it) if m else None for m in means)
        finite = next(it)
        span = slice(n_sink, n_sink + n_move)
        kc, vc, ok = _block_codes(kq, vq, xk[:, :, span], xv[:, :, span], k_mean, v_mean)
        out = [_drop(b, n_sink, n_move, n_x, steady) for b in (xk, xv)]
        for q, buf, codes in ((kq, kbuf, kc), (vq, vbuf, vc)):
            strides = q.token_strides()
            for f in sorted(buf):
                start = at // strides.get(f, 1)
                out.append(mx.slice_update(buf[f], codes[f], start, axes=(2,)))
        return [*out, finite & ok]

    return mx.compile(fn)


def _block_codes(kq, vq, k, v, k_mean, v_mean, start: int = 0) -> tuple[Codes, Codes, mx.array]:
    """The codes of a block of keys and values ``[B, H, n, D]`` centered by the means given
    (None: uncentered), and whether the block is storable (finite, and within what the codes
    hold, e.g. float16 norms: :meth:`Quantizer.storable`). ``start``: the position of the
    block's first token (position-aware keys)."""
    if k_mean is not None:
        k = k - k_mean
    if v_mean is not None:
        v = v - v_mean
    ok = kq.storable(k) & vq.storable(v)
    return kq.encode(k, check_finite=False, start=start), vq.encode(v, check_finite=False), ok


def _grown(old: mx.array | None, new: mx.array, n: int, pad: int) -> mx.array:
    """A new exact buffer ``[B, H, n + L + pad, D]``: the first ``n`` tokens of ``old``, then
    ``new [B, H, L, D]``, then ``pad`` unused slots."""
    parts = [old[:, :, :n].astype(new.dtype)] if old is not None and n else []
    parts.append(new)
    if pad:
        parts.append(mx.zeros((*new.shape[:2], pad, new.shape[3]), new.dtype))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _drop(buf: mx.array, n_sink: int, n_move: int, n_x: int, steady: int) -> mx.array:
    """``buf`` without tokens ``[n_sink, n_sink + n_move)`` (just encoded) of its ``n_x``
    valid ones, in a new buffer of at least ``steady`` slots."""
    b, h, _, d = buf.shape
    parts = [buf[:, :, :n_sink]] if n_sink else []
    if n_x > n_sink + n_move:
        parts.append(buf[:, :, n_sink + n_move : n_x])
    pad = max(0, steady - (n_x - n_move))
    if pad:
        parts.append(mx.zeros((b, h, pad, d), buf.dtype))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _slice(codes: Codes, q: Quantizer, n: int) -> Codes:
    strides = q.token_strides()
    return codes.map(lambda k, a: a[:, :, : n // strides.get(k, 1)])


def _write(buf: Codes | None, new: Codes, q: Quantizer, start: int, n: int, step: int) -> Codes:
    """Write ``n`` tokens of codes at ``start``, growing the buffers in whole ``step``s, by
    at least an eighth of their capacity: each new shape costs a decode step a new compiled
    graph and new GPU graphs (growing by 256 tokens at a time measured 88 tok/s against 115
    growing by 8,192, Llama-3-8B shape at 4k, H200), and an eighth bounds what is held
    unused."""
    strides = q.token_strides()
    out = Codes(_reserved(buf, new, q, start + n, step))
    for name, arr in new.items():
        s = strides.get(name, 1)
        out[name][:, :, start // s : (start + n) // s] = arr
    return out


def _reserved(buf: Codes | None, like: Codes, q: Quantizer, tokens: int, step: int) -> Codes:
    """``buf`` with room for ``tokens`` tokens (new zero buffers shaped like ``like``'s fields
    if None), grown as :func:`_write` says."""
    cap = 0 if buf is None else q.tokens_in(buf)
    if tokens <= cap:
        return buf
    strides = q.token_strides()
    grow = step * -(-max(tokens - cap, cap // 8) // step)
    grown = {}
    for name, arr in like.items():
        shape = list(arr.shape)
        shape[2] = grow // strides.get(name, 1)
        pad = mx.zeros(shape, dtype=arr.dtype)
        grown[name] = pad if buf is None else mx.concatenate([buf[name], pad], axis=2)
    return Codes(grown)

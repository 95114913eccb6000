"""A patched model's decode steps as one compiled graph (``mx.compile``).

mlx-lm builds every decode step's graph in Python, op by op, and MLX then launches it node
by node; on an H200 that host work is as long as the GPU's for a Llama-3-8B shape (about
2.4 ms of building and 4.4 ms of dispatch per token with mlx-lm's own cache,
``docs/gpu.md``), and vq's caches added more. :func:`install` makes a patched model's
one-token forward over vq caches a traced graph that MLX replays: the caches' arrays go in
(:meth:`~vq_core.CompressedKVCache.decode_inputs`), the exact buffers with the new token
come out, and everything that changes from step to step is three small arrays: the valid
counts int32 ``[layers, 2, B]`` (:meth:`~vq_core.CompressedKVCache.decode_counts`), the
write masks bool ``[layers, C]`` and the RoPE offset (one for all layers: a step whose
layers disagree on it runs uncompiled), built on the host each step. With
:data:`PREDICT_STEP_ARRAYS` each step's graph also computes the next step's three (one more
exact token, the offset plus one), so steps between block encodes send nothing from the
host. One trace then serves every step until
a buffer changes shape; :class:`Decoder` grows every layer's code buffers at one step
(:meth:`~vq_core.CompressedKVCache.reserve`) so that a growth costs one new trace, not one
per layer. Encoding the blocks that earlier steps filled stays outside the graph, as its
own submission (as in an uncompiled step).

Steps that do not fit run mlx-lm's forward unchanged: every step on the CPU (MLX builds a
compiled graph there with the system C++ compiler, seconds per graph;
``vq_core.cache.COMPILE_ON_CPU`` allows it, as the tests do), prefill chunks, calls with other
arguments, caches other than :class:`~vq_core.CompressedKVCache` (sliding-window or batched
caches, mlx-lm's own), a cache with nothing compressed yet, and the first step of each
layout (it builds and checks the kernels, which a trace cannot evaluate).
:attr:`Decoder.compiled_steps` counts the steps that ran compiled, :attr:`Decoder.traces`
the traces MLX made.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from vq_core import CompressedKVCache
from vq_core.cache import compiles_here

_SUBCLASSES: dict[type, type] = {}
# The next step's counts, masks and offset from the step's own graph instead of the host.
# Off until measured side by side: its one H200 run (2026-12-03, Llama-3-8B shape) decoded
# turboquant_mse:4 at 0.55x / 0.69x fp16 at 4k / 32k, against 0.75x / 0.71x without it in
# an earlier run on another host (fp16 itself 132 against 154 tok/s there): not an A/B.
PREDICT_STEP_ARRAYS = False


class Decoder:
    """Compiled decode steps for one model (one compiled function per cache layout)."""

    def __init__(self, model, forward):
        self.model, self.forward = model, forward
        self.compiled_steps = 0
        self.traces = 0  # times MLX traced a step (one per layout and set of shapes)
        self._seen: set = set()
        self._functions: dict = {}
        self._caches: list = []
        # (layout, counts, offset) the last step predicted for the next one, and the device
        # arrays (counts, masks, offset) it computed for it
        self._next: tuple | None = None

    def step(self, inputs: mx.array, caches) -> mx.array | None:
        """The logits of one decode step of ``inputs [B, 1]`` over ``caches``, compiled; None
        (nothing done but the encodes an uncompiled step would do first) when it does not
        apply."""
        if not compiles_here() or not isinstance(caches, (list, tuple)) or not caches:
            return None
        if any(type(c) is not CompressedKVCache for c in caches):
            return None
        arrays = [c.decode_inputs() for c in caches]
        if any(a is None for a in arrays):
            return None
        if _reserve_together(caches):
            arrays = [c.decode_inputs() for c in caches]
        layout = tuple(c.decode_layout() for c in caches)
        if layout not in self._seen:  # run uncompiled once: it builds and checks the kernels
            self._seen.add(layout)
            return None
        fn = self._functions.get(layout)
        if fn is None:
            fn = self._functions[layout] = mx.compile(self._traced([len(a) for a in arrays]))
        offset = caches[0].offset
        if any(c.offset != offset for c in caches):
            return None
        rows = [c.decode_counts() for c in caches]
        key = (layout, _frozen(rows), offset)
        if PREDICT_STEP_ARRAYS and self._next is not None and self._next[0] == key:
            step_arrays = self._next[1]
        else:
            counts = mx.array(rows, dtype=mx.int32)
            step_arrays = (counts, _write_masks(caches, rows), mx.array(offset, mx.int32))
        self._next = None
        self._caches = list(caches)
        try:
            flat = (x for a in arrays for x in a)
            outs = fn(inputs, *step_arrays, *flat)
        finally:
            self._caches = []
        n = len(caches)
        for i, c in enumerate(caches):
            c.end_decode(outs[1 + 2 * i], outs[2 + 2 * i])
        ahead = [[r[0], [x + 1 for x in r[1]]] for r in rows]
        self._next = ((layout, _frozen(ahead), offset + 1), tuple(outs[1 + 2 * n :]))
        self.compiled_steps += 1
        return outs[0]

    def _traced(self, sizes: list[int]):
        """The function ``mx.compile`` traces: bind each cache to its slice of the inputs and
        its row of ``counts``, run the model's own forward, collect the exact buffers."""

        def step(inputs, counts, masks, offset, *flat):
            self.traces += 1
            caches, start = self._caches, 0
            bound = []
            try:
                for i, (c, n) in enumerate(zip(caches, sizes, strict=True)):
                    row = counts[i : i + 1].reshape(counts.shape[1:])  # a view, no gather
                    here = masks[i, : c.exact_slots()]
                    c.bind(list(flat[start : start + n]), row, here, offset)
                    bound.append(c)
                    start += n
                logits = self.forward(self.model, inputs, cache=caches)
            finally:
                buffers = [x for c in bound for x in c.unbind()]
            # the next step's arrays if no block is encoded before it: one more exact token
            counts_next = counts + mx.array([0, 1], dtype=mx.int32)[None, :, None]
            at = counts_next[:, 1, 0] - 1
            masks_next = _slots(masks.shape[1])[None, :] == at[:, None]
            return [logits, *buffers, counts_next, masks_next, offset + 1]

        return step


def _write_masks(caches, rows) -> mx.array:
    """bool ``[layers, C]``: row i marks the exact slot cache i writes the new token to
    (``counts[1] - 1``; C the largest exact buffer), made by one comparison on the device
    per step, outside the compiled graph, so each layer's write is a select reading its
    row (no comparison kernel per layer). On an H200 (Llama-3-8B shape, 4k tokens,
    turboquant_mse:4, one run) this decoded at 120 / 132 tok/s against 92 / 89 with the
    masks built on the host (numpy; presumably every select then read host-written
    memory)."""
    at = mx.array([r[1][0] - 1 for r in rows], dtype=mx.int32)
    return _slots(max(c.exact_slots() for c in caches))[None, :] == at[:, None]


def _frozen(rows) -> tuple:
    return tuple(tuple(tuple(side) for side in r) for r in rows)


@functools.lru_cache(maxsize=64)
def _slots(n: int) -> mx.array:
    out = mx.arange(n, dtype=mx.int32)
    mx.eval(out)
    return out


def _reserve_together(caches) -> bool:
    """Grow every cache's code buffers at once when one of them would grow within a block of
    tokens; True if any grew."""
    short = [c for c in caches if c.compressed_tokens + 2 * c.block > c.code_capacity()]
    if not short:
        return False
    for c in short:
        c.reserve(c.compressed_tokens + 2 * c.block)
    target = max(c.code_capacity() for c in caches)
    for c in caches:
        c.reserve(target)
    return True


def install(model) -> Decoder:
    """Route ``model``'s one-token forwards through a :class:`Decoder` (its class becomes a
    subclass whose ``__call__`` tries the compiled step first); returns the decoder."""
    cls = type(model)
    if cls in _SUBCLASSES.values():
        return model.__dict__["_vq_decoder"]
    forward = cls.__call__
    sub = _SUBCLASSES.get(cls)
    if sub is None:

        def __call__(self, inputs, *args, **kwargs):
            cache = kwargs.get("cache", args[0] if len(args) == 1 else None)
            one_token = isinstance(inputs, mx.array) and inputs.ndim == 2 and inputs.shape[1] == 1
            if one_token and cache is not None and len(args) + len(kwargs) == 1:
                out = self.__dict__["_vq_decoder"].step(inputs, cache)
                if out is not None:
                    return out
            return forward(self, inputs, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        _SUBCLASSES[cls] = sub
    decoder = Decoder(model, forward)
    object.__setattr__(model, "_vq_decoder", decoder)
    model.__class__ = sub
    return decoder


def uninstall(model) -> None:
    """Give ``model`` its own class back (no compiled steps)."""
    cls = type(model)
    if cls in _SUBCLASSES.values():
        model.__class__ = cls.__mro__[1]
        model.__dict__.pop("_vq_decoder", None)


def decoder(model) -> Decoder | None:
    """The model's :class:`Decoder`, or None when decode steps are not compiled."""
    return model.__dict__.get("_vq_decoder")

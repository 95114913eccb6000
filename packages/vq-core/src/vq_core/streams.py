"""Random keys: one derivation of every key a method draws from its ``seed``.

A method that needs several random objects (a rotation and a sketch, a rotation and the
randomized rounding of queries) must draw them from independent streams: RaBitQ's
unbiasedness argument (arXiv 2405.12497, Sec. 3.3.2) takes the rounding noise independent
of the rotation, and QJL's (arXiv 2406.03482, Lemma 3.2) takes the sketch independent of
the data. :func:`stream_key` names each stream:

* ``"sketch"`` and ``"rotation"``: the two halves of ``split(key(seed))`` (Gaussian
  sketches; preconditioner signs and matrices). Neither replays ``key(seed)``'s own
  stream, from which test and user data are often drawn.
* ``"rounding"``: ``split(key(seed + 2**62))[0]``; seeds (with the offsets methods add per
  stage or layer) stay far below ``2**62``, so this root key is no seed's own and its
  stream is independent of the others.
* ``"codebook"``: ``key(seed)`` itself (untrained random codebooks, and turboquant_prod's
  sign sketch at ``seed + 7919``), kept so that saved numbers reproduce.
"""

from __future__ import annotations

import mlx.core as mx

from vq_core.errors import invalid, invalid_choice

STREAMS = ("sketch", "rotation", "rounding", "codebook")
_SEED_LIMIT = 2**62


def stream_key(seed: int, stream: str) -> mx.array:
    """The key of ``stream`` (one of :data:`STREAMS`) for ``seed`` (``0 <= seed < 2**62``)."""
    invalid_choice("stream", stream, STREAMS)
    if type(seed) is not int or not 0 <= seed < _SEED_LIMIT:
        raise invalid("seed", seed, f"an integer in 0..{_SEED_LIMIT - 1}")
    if stream == "codebook":
        return mx.random.key(seed)
    if stream == "rounding":
        return mx.random.split(mx.random.key(seed + _SEED_LIMIT))[0]
    return mx.random.split(mx.random.key(seed))[0 if stream == "sketch" else 1]

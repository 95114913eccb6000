"""Perplexity, KL divergence and top-1 agreement against the exact cache.

How the compressed cache is used: the text's first ``prefix`` tokens are prefilled exactly
and written into the cache under test (see :mod:`vq_mlxlm.evaluation.prefix`), so they are
stored compressed. The next ``count`` tokens are then fed through the model in chunks of
``chunk`` tokens (16-32: decode-like, but not one forward per token). Each chunk attends to
the whole compressed history plus the chunk's own keys and values: exact for vq caches
(a vq chunk attends to its own tokens exactly and stores them compressed), already
quantized for mlx-lm's ``QuantizedKVCache`` (that is how mlx-lm's cache works). Every
scored token therefore attends to at least ``prefix`` compressed tokens, and to at most
``chunk - 1`` uncompressed ones.

Scored predictions: the logits at positions ``prefix .. prefix + count - 1`` against the
next tokens. PPL is ``exp(mean NLL)``; KL is ``KL(p_exact || p_cache)`` in nats per token,
averaged; top-1 is the fraction of positions where both argmaxes agree. The per-token NLL
and KL are returned too (:class:`PerToken`), for the bootstrap intervals of
:mod:`.bootstrap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from vq_core import ConfigError


@dataclass(frozen=True)
class Quality:
    ppl: float
    kl: float
    top1: float
    tokens: int  # scored predictions


@dataclass(frozen=True)
class PerToken:
    """Each scored prediction's NLL and KL (nats), in text order."""

    nll: list[float]
    kl: list[float]


def chunk_logprobs(model, caches: list, tokens: list[int], start: int, count: int, chunk: int):
    """Yield ``(log-probs [L, V] float32, next tokens [L])`` for each chunk of the range."""
    for i in range(start, start + count, chunk):
        end = min(i + chunk, start + count)
        logits = model(mx.array(tokens[i:end])[None], cache=caches)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logp)
        yield logp, mx.array(tokens[i + 1 : end + 1])


def score(
    model,
    caches: list,
    tokens: list[int],
    start: int,
    count: int,
    chunk: int,
    reference: list[mx.array] | None = None,
) -> tuple[Quality, list[mx.array], PerToken]:
    """Score ``count`` predictions after ``start``; returns quality, the log-probs (kept
    only for the reference run) and the per-token scores.

    With ``reference`` (the exact run's log-probs, chunk by chunk) KL and top-1 are
    measured against it and nothing is kept; without, this *is* the reference run.
    """
    if len(tokens) < start + count + 1:
        raise ConfigError(f"text has {len(tokens)} tokens; scoring needs {start + count + 1}")
    nll: list[float] = []
    kl: list[float] = []
    agree = 0.0
    kept = []
    for j, (logp, target) in enumerate(chunk_logprobs(model, caches, tokens, start, count, chunk)):
        nll += (-mx.take_along_axis(logp, target[:, None], axis=-1)[:, 0]).tolist()
        if reference is None:
            kept.append(logp)
            agree += logp.shape[0]
            kl += [0.0] * logp.shape[0]
            continue
        ref = reference[j]
        kl += (mx.exp(ref) * (ref - logp)).sum(axis=-1).tolist()
        agree += (mx.argmax(ref, axis=-1) == mx.argmax(logp, axis=-1)).sum().item()
    quality = Quality(math.exp(math.fsum(nll) / count), math.fsum(kl) / count, agree / count, count)
    return quality, kept, PerToken(nll, kl)

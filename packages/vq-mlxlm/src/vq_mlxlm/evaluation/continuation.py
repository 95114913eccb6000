"""Long generation: greedy continuations through the cache under test against the exact one.

A prompt is the text's first ``end`` tokens; its exact keys and values (sliced from the
harness's exact prefix, :mod:`.prefix`) are written into the cache under test, so the
prompt is stored compressed, and ``steps`` tokens are decoded greedily one at a time, each
step attending to the compressed history (and writing its own token into it). The exact
cache's continuation of the same prompt is the reference.

Two numbers per prompt: ``agree_len``, the tokens generated before the first one that
differs from the reference (the continuation *is* the reference up to there), and
``match``, the fraction of the ``steps`` positions where both sequences hold the same
token. After a first divergence the two continuations may realign or not; ``agree_len``
is the strict measure, ``match`` the lenient one.
"""

from __future__ import annotations

import mlx.core as mx

from vq_mlxlm.evaluation.prefix import KV, fill, sliced


def greedy(model, caches: list, kv: KV, first: int, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``kv`` (written into fresh ``caches``), starting by
    feeding token ``first`` (the prompt's last token, whose keys ``kv`` does not hold)."""
    fill(caches, kv)
    token = mx.array([[first]])
    out: list[int] = []
    for _ in range(steps):
        logits = model(token, cache=caches)
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        mx.eval(token)
        out.append(int(token.item()))
    return out


def compare(tokens: list[int], reference: list[int]) -> dict:
    """``agree_len`` (common prefix) and ``match`` (position-wise) of two continuations."""
    if len(tokens) != len(reference) or not reference:
        raise ValueError(f"continuations of {len(tokens)} and {len(reference)} tokens")
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    agree = same.index(False) if False in same else len(same)
    match = sum(same) / len(same)
    return {"agree_len": agree, "match": match, "steps": len(reference)}


def run(model, make_caches, prefix_kv: KV, text: list[int], ends, steps: int) -> list[list[int]]:
    """Continuations of each prompt ``text[:end]`` for ``end`` in ``ends`` (each ``end`` at
    most the prefix's length + 1); ``make_caches()`` gives fresh caches per prompt."""
    held = prefix_kv[0][0].shape[2]
    outs = []
    for end in ends:
        if not 2 <= end <= held + 1:
            raise ValueError(f"prompt of {end} tokens; the exact prefix holds {held}")
        kv = sliced(prefix_kv, end - 1)
        outs.append(greedy(model, make_caches(), kv, text[end - 1], steps))
    return outs

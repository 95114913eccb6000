"""Needle in a haystack: a planted number, asked back through the chat template.

A trial is a user message of ``length`` tokens in total: real text (the haystack) with the
sentence ``The special magic number is NNNN.`` planted at ``depth`` (0 = start, 1 = end,
moved back to the nearest line break), then the question. The assistant turn is primed
with ``The special magic number is`` and the model answers greedily; a trial counts when
the greedy answer is exactly the planted number (no digit added or missing).

How the compressed cache is used: the system/user header and the haystack with the needle
are prefilled exactly and written into the cache under test (:mod:`.prefix`), so the
needle is stored compressed. The question, the assistant header and the primer then go
through the model as one chunk that attends to that compressed history, and every answer
token is decoded one at a time against the compressed cache. Trials of one length share
a batch (one row per depth); their exact prefixes share the haystack before the needle.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import mlx.core as mx

from vq_core import ConfigError
from vq_mlxlm.evaluation.prefix import KV, exact_kv, fill, sliced

NEEDLE = "\nThe special magic number is {number}.\n"
QUESTION = "\n\nWhat is the special magic number mentioned in the text above?"
PRIMER = "The special magic number is"
_SLOT = "@@HAYSTACK@@"


@dataclass
class NeedleGroup:
    """The trials of one length: same token count, one batch row per depth."""

    length: int
    depths: tuple[float, ...]
    numbers: list[str]
    tail: list[int]  # question + assistant header + primer, run through the cache under test
    kv: KV = field(default_factory=list)  # exact keys/values of header + haystack, [B, ...]


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def _template(tokenizer) -> tuple[str, str]:
    """Text before and after the user message in the chat template (plain text if none)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": _SLOT}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, after = text.split(_SLOT)
        return head, after
    return "", "\nAnswer: "


def _line_start(tokenizer, hay: list[int], pos: int) -> int:
    """The nearest position at or before ``pos`` that follows a line break (else ``pos``)."""
    for p in range(pos, max(pos - 256, 0), -1):
        if tokenizer.decode([hay[p - 1]]).endswith("\n"):
            return p
    return pos


def build(model, tokenizer, text: list[int], plan, chunk: int = 256, seed: int = 0):
    """Exact keys/values of every trial of ``plan`` (``(length, depths)`` pairs), the
    shared haystack prefix computed once; one :class:`NeedleGroup` per length."""
    head_text, after = _template(tokenizer)
    head = _encode(tokenizer, head_text)
    tail = _encode(tokenizer, QUESTION + after + PRIMER)
    rng = random.Random(seed)
    plans = []
    for length, depths in plan:
        numbers = [str(rng.randrange(1000, 10000)) for _ in depths]
        needles = [_encode(tokenizer, NEEDLE.format(number=n)) for n in numbers]
        size = length - len(head) - len(needles[0]) - len(tail)
        if size < 16 or size > len(text):
            raise ConfigError(f"needle length {length} needs a haystack of {size} tokens")
        spots = [_line_start(tokenizer, text, max(1, int(d * size))) for d in depths]
        plans.append((length, tuple(depths), numbers, needles, size, spots))
    deepest = max(s for *_, spots in plans for s in spots)
    base = exact_kv(model, mx.array(head + text[:deepest])[None], chunk)
    groups = []
    for length, depths, numbers, needles, size, spots in plans:
        rows = []
        for needle, spot in zip(needles, spots, strict=True):
            rest = mx.array(needle + text[spot:size])[None]
            rows.append(exact_kv(model, rest, chunk, start=sliced(base, len(head) + spot)))
        kv = [
            (mx.concatenate([r[i][0] for r in rows]), mx.concatenate([r[i][1] for r in rows]))
            for i in range(len(base))
        ]
        groups.append(NeedleGroup(length, tuple(depths), numbers, tail, kv))
    return groups


def _status(text: str, number: str) -> str | None:
    """True/False once the answer is decided, None while it could still become the number."""
    t = text.lstrip()
    if not t:
        return None
    digits = re.match(r"\d*", t).group()
    if not number.startswith(digits) or not digits:
        return False
    if digits == number and len(t) > len(digits):
        return True
    return None


def run(model, tokenizer, caches: list, group: NeedleGroup) -> list[dict]:
    """Greedy answers of one group through ``caches`` (fresh, filled here)."""
    fill(caches, group.kv)
    rows = len(group.depths)
    logits = model(mx.array([group.tail] * rows), cache=caches)
    answers: list[list[int]] = [[] for _ in range(rows)]
    found: list[bool | None] = [None] * rows
    budget = max(len(_encode(tokenizer, " " + n)) for n in group.numbers) + 2
    for step in range(budget):
        nxt = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(nxt)
        for r, token in enumerate(nxt.tolist()):
            if found[r] is None:
                answers[r].append(token)
                found[r] = _status(tokenizer.decode(answers[r]), group.numbers[r])
        if all(f is not None for f in found) or step == budget - 1:
            break
        logits = model(nxt[:, None], cache=caches)
    out = []
    for r in range(rows):
        text = tokenizer.decode(answers[r])
        hit = found[r] if found[r] is not None else text.strip() == group.numbers[r]
        out.append(
            {
                "length": group.length,
                "depth": group.depths[r],
                "number": group.numbers[r],
                "answer": text,
                "retrieved": bool(hit),
            }
        )
    return out

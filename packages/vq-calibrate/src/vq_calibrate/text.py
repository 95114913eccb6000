"""Calibration and evaluation text, held apart: the Python reference manual that ships with
every Python (``pydoc_data.topics.topics``, a dict of topic name -> text).

The topics sorted by key are split at ``len // 2``: the first half is calibration text, the
second half evaluation text, each joined with blank lines. No topic appears in both.
"""

from __future__ import annotations

import hashlib


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def calibration_text() -> str:
    """Topics ``sorted(keys)[: n // 2]`` joined by blank lines."""
    t = _topics()
    return "\n\n".join(t[: len(t) // 2])


def evaluation_text() -> str:
    """Topics ``sorted(keys)[n // 2 :]`` joined by blank lines (never used to calibrate)."""
    t = _topics()
    return "\n\n".join(t[len(t) // 2 :])


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_sequences(tokens: list[int], n_sequences: int, seq_len: int) -> list[list[int]]:
    """Up to ``n_sequences`` consecutive, non-overlapping windows of ``seq_len`` tokens."""
    n = min(n_sequences, len(tokens) // seq_len)
    if n == 0:
        raise ValueError(f"text has {len(tokens)} tokens; need at least seq_len={seq_len}")
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(n)]

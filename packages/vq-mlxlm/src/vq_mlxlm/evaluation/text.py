"""The evaluation text: the Python reference manual that ships with Python, or a file.

``pydoc_data.topics.topics`` is the text behind ``help("topic")``: about 110k tokens of
real technical English (SmolLM2's tokenizer) in every CPython install, so the default
needs no download and is the same on every machine with the same Python minor version.
Its topics are joined in sorted key order with blank lines between them. The sorted keys
are split at ``n // 2``: :func:`calibration_text` is the first half (what ``vq calibrate``
trains on by default), ``default_text(held_out=True)`` the second (what runs scoring
calibrated methods use); no topic is in both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vq_core import ConfigError, MissingFileError

DEFAULT_TEXT = "pydoc_data.topics"


@dataclass(frozen=True)
class EvalText:
    """A named text and its token ids."""

    source: str  # "pydoc_data.topics" or the file path
    sha256: str  # of the UTF-8 text, so results name exactly what was scored
    tokens: list[int]


def _topics(half: str | None) -> str:
    """All topics, or the ``"first"``/``"second"`` half of the sorted keys, joined."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = len(keys) // 2
    keys = {None: keys, "first": keys[:cut], "second": keys[cut:]}[half]
    return "\n\n".join(topics[key] for key in keys)


def default_text(held_out: bool = False) -> str:
    """The Python reference manual's topics, joined in sorted key order (``held_out``: only
    ``sorted(keys)[n // 2 :]``, never used for calibration)."""
    return _topics("second" if held_out else None)


def calibration_text() -> str:
    """Topics ``sorted(keys)[: n // 2]`` joined by blank lines (the default calibration text)."""
    return _topics("first")


PARTS = {"all": "", "held_out": " (held-out half)", "calibration": " (calibration half)"}


def load_text(
    tokenizer,
    path: str | None = None,
    min_tokens: int = 0,
    held_out: bool = False,
    part: str | None = None,
) -> EvalText:
    """Tokenize ``path`` (UTF-8) or the default text, all of it or one ``part`` of
    :data:`PARTS` (``held_out=True`` means ``part="held_out"``; ``"calibration"`` is what
    ``vq calibrate`` and ``vq plan`` use); fail clearly if it is too short."""
    if path is None:
        part = part or ("held_out" if held_out else "all")
        if part not in PARTS:
            raise ConfigError(f"text part {part!r}; choose from {sorted(PARTS)}")
        source = DEFAULT_TEXT + PARTS[part]
        text = calibration_text() if part == "calibration" else default_text(part == "held_out")
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise MissingFileError(f"--text: {file} is not a file")
        source, text = str(file), file.read_text(encoding="utf-8")
    tokens = list(tokenizer.encode(text))
    if len(tokens) < min_tokens:
        raise ConfigError(
            f"--text {source} has {len(tokens):,} tokens; this evaluation needs at least "
            f"{min_tokens:,} (use a longer text or --quick)"
        )
    return EvalText(source, hashlib.sha256(text.encode()).hexdigest(), tokens)

"""The plan artifact: one JSON file that ``vq generate``, ``serve`` and ``eval`` take (``--plan``).

Layout (format :data:`FORMAT`): ``{"vq_plan": 1, "sha256": ..., "plan": {...}}`` where
``plan`` holds the model ``fingerprint`` (architecture, layers, kv_heads, head_dim, as in
calibration artifacts), the cache settings ``method``, ``value_method``, ``key_bits`` and
``value_bits`` (one per layer), ``window``, ``sink``, ``block``, and a ``report`` of how the
plan was chosen (target, probe, measured KL against the best uniform setting). ``sha256`` is
over the canonical JSON of ``plan`` (sorted keys), so an edited or truncated file is refused.
Writes are atomic (temporary file, fsync, rename). The cache settings map one to one onto
:func:`vq_mlxlm.patch`'s keywords (:meth:`Plan.patch_kwargs`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vq_core import ArtifactError, atomic_write

FORMAT = 1
FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim")


@dataclass(frozen=True)
class Plan:
    """A per-layer cache configuration for one model."""

    fingerprint: dict[str, Any]
    method: str
    value_method: str
    key_bits: list[int]
    value_bits: list[int]
    window: int = 0
    sink: int = 1
    block: int = 32
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        layers = self.fingerprint.get("layers")
        if len(self.key_bits) != layers or len(self.value_bits) != layers:
            raise ArtifactError(
                f"plan has {len(self.key_bits)} key and {len(self.value_bits)} value widths for "
                f"a model of {layers} layers"
            )

    def patch_kwargs(self) -> dict[str, Any]:
        """``patch(model, **plan.patch_kwargs())``."""
        return dict(
            method=self.method,
            bits=list(self.key_bits),
            value_method=self.value_method,
            value_bits=list(self.value_bits),
            window=self.window,
            sink=self.sink,
            block=self.block,
        )

    def label(self) -> str:
        """Short description: ``rabitq k3.4/v2.6 w64`` (mean key/value widths, window)."""
        k = sum(self.key_bits) / len(self.key_bits)
        v = sum(self.value_bits) / len(self.value_bits)
        return f"{self.method} k{k:.2f}/v{v:.2f}" + (f" w{self.window}" if self.window else "")


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` to ``path`` atomically; returns the path."""
    p = Path(path)
    body = asdict(plan)
    data = json.dumps({"vq_plan": FORMAT, "sha256": _digest(body), "plan": body}, indent=1)
    return atomic_write(p, (data + "\n").encode())


def load_plan(path: str | os.PathLike, fingerprint: dict[str, Any] | None = None) -> Plan:
    """The plan in ``path``; ArtifactError when it is missing, corrupt, of another format or
    (with ``fingerprint``) made for another model."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"plan {p} does not exist (write one with `vq plan`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"plan {p} is not a readable plan file ({e})") from None
    if not isinstance(doc, dict) or doc.get("vq_plan") != FORMAT:
        raise ArtifactError(f"plan {p}: not a vq plan of format {FORMAT}")
    body = doc.get("plan")
    if not isinstance(body, dict) or doc.get("sha256") != _digest(body):
        raise ArtifactError(f"plan {p} is corrupt: its checksum does not match its content")
    try:
        plan = Plan(**body)
    except TypeError as e:
        raise ArtifactError(f"plan {p} is corrupt: {e}") from None
    if fingerprint is not None:
        diff = {
            k: (plan.fingerprint.get(k), fingerprint[k])
            for k in FINGERPRINT_KEYS
            if k in fingerprint and plan.fingerprint.get(k) != fingerprint[k]
        }
        if diff:
            detail = ", ".join(f"{k}: plan {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ArtifactError(f"plan {p} was made for another model ({detail})")
    return plan

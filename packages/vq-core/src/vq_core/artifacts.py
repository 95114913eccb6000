"""The ArtifactStore protocol: named arrays plus metadata, saved and loaded by name.

vq-calibrate provides the safetensors store with fingerprints and checksums; this module
holds the protocol and a small in-memory store for tests and ephemeral use.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from vq_core.errors import ArtifactError


@runtime_checkable
class ArtifactStore(Protocol):
    """Save and load named groups of arrays with JSON-serializable metadata."""

    def save(self, name: str, arrays: dict[str, mx.array], metadata: dict[str, Any]) -> None:
        """Store ``arrays`` and ``metadata`` under ``name`` (replacing any earlier one)."""
        ...

    def load(self, name: str) -> tuple[dict[str, mx.array], dict[str, Any]]:
        """Return ``(arrays, metadata)`` saved under ``name``; ArtifactError if absent."""
        ...

    def names(self) -> list[str]:
        """Names of the stored artifacts."""
        ...


class MemoryStore:
    """An :class:`ArtifactStore` that keeps everything in a dict."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[dict[str, mx.array], dict[str, Any]]] = {}

    def save(self, name: str, arrays: dict[str, mx.array], metadata: dict[str, Any]) -> None:
        if not name:
            raise ArtifactError("artifact name must be a non-empty string")
        self._items[name] = (dict(arrays), dict(metadata))

    def load(self, name: str) -> tuple[dict[str, mx.array], dict[str, Any]]:
        if name not in self._items:
            raise ArtifactError(f"no artifact named {name!r}; stored: {sorted(self._items)}")
        arrays, metadata = self._items[name]
        return dict(arrays), dict(metadata)

    def names(self) -> list[str]:
        return sorted(self._items)

"""What every calibrated method shares: its config fields and how its tensors are loaded.

A calibrated quantizer's constructor takes the tensors (``Spectral(config, tensors=...)``),
never a path. :meth:`Calibrated.from_config` (what :func:`vq_core.create` and so a cache
rebuilt from a saved state call) reads them from ``config.artifact`` with
:mod:`vq_core.artifacts` and records the file's content checksum in the config
(``artifact_checksum``); a config that already holds one (a saved prompt cache's) is refused
against an artifact whose checksum differs: the codes were made with other tensors.

The artifact format itself (read, write, verify) is public in :mod:`vq_core.artifacts`; its
names stay importable from here for one release (``artifact_path``, ``check_meta``,
``content_checksum``, ``read``, ``verify``, ``load_layer``, ``FORMAT``, ``FINGERPRINT_KEYS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from vq_core import ArtifactError, ConfigError, Quantizer, QuantizerConfig, invalid, invalid_choice
from vq_core.artifacts import (  # noqa: F401  (re-exported for one release)
    FINGERPRINT_KEYS,
    FORMAT,
    artifact_path,
    check_meta,
    content_checksum,
    load_layer,
    read,
    read_artifact,
    verify,
)


@dataclass(frozen=True)
class CalibratedConfig(QuantizerConfig):
    """Config fields every calibrated method shares.

    ``artifact``: dir or file from ``vq calibrate``; ``layer``: the model layer; ``kind``:
    ``"k"`` (keys) or ``"v"`` (values); ``artifact_checksum``: the artifact's content checksum
    (filled in when the tensors are loaded; checked against the file when given).
    ``untrained=True`` asks by name for the method's untrained neighbour (documented per
    method; for tests and demos): without it, a quantizer built with no artifact is refused
    (:func:`require_artifact`), never silently untrained.
    """

    artifact: str = ""
    layer: int = 0
    kind: str = "k"
    untrained: bool = False
    artifact_checksum: str = ""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.artifact, str):
            raise invalid("artifact", self.artifact, "a path string ('' = untrained)")
        invalid_choice("kind", self.kind, ("k", "v"))
        if type(self.layer) is not int or self.layer < 0:
            raise invalid("layer", self.layer, "an integer >= 0")
        if not isinstance(self.untrained, bool):
            raise invalid("untrained", self.untrained, "True or False")
        if not isinstance(self.artifact_checksum, str):
            raise invalid("artifact_checksum", self.artifact_checksum, "a sha256 hex string")
        if self.untrained and self.artifact:
            raise ConfigError(
                f"artifact={self.artifact!r} and untrained=True exclude each other; pass one"
            )


def require_artifact(method: str, config: CalibratedConfig) -> None:
    """ConfigError unless ``config`` names an artifact or asks for ``untrained=True``."""
    if not config.artifact and not config.untrained:
        raise ConfigError(
            f"{method} is calibrated and needs its artifact: pass artifact=<dir or file "
            f"from `vq calibrate --method {method}`>, or untrained=True for its untrained "
            "codebooks (tests and demos only)"
        )


def check_tensors(
    method: str, config: CalibratedConfig, tensors: dict[str, Any] | None, names: tuple[str, ...]
) -> dict[str, mx.array] | None:
    """``tensors`` with ``names`` present, or None for ``untrained=True``; ConfigError for
    neither (a constructor given a path but no tensors included)."""
    if tensors is None:
        if config.untrained:
            return None
        require_artifact(method, config)
        raise ConfigError(
            f"{method}: the constructor takes the artifact's tensors (tensors=...); build it "
            f"with vq_core.create({method!r}, artifact=...) to load them from a file"
        )
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ArtifactError(f"{method}: artifact tensors lack {missing} (have {sorted(tensors)})")
    return tensors


class Calibrated(Quantizer):
    """Base of calibrated quantizers: :meth:`from_config` loads the artifact's tensors."""

    needs_calibration = True

    @classmethod
    def from_config(cls, config: CalibratedConfig) -> Quantizer:
        if not config.artifact:
            require_artifact(cls.method, config)
            return cls(config)
        art = read_artifact(artifact_path(config.artifact, cls.method))
        art.check(
            method=cls.method, version=config.version, fingerprint={"head_dim": config.head_dim}
        )
        if config.artifact_checksum and config.artifact_checksum != art.checksum:
            raise ArtifactError(
                f"artifact {art.path} is not the one these codes were made with: its checksum "
                f"is {art.checksum[:16]}..., expected {config.artifact_checksum[:16]}... "
                "(recalibrated or replaced since)"
            )
        tensors = art.layer(config.layer, config.kind)
        return cls(dataclasses.replace(config, artifact_checksum=art.checksum), tensors=tensors)

"""What every calibrated method's config shares, and the refusal of an untrained one.

The artifact format itself (read, write, verify) is public in :mod:`vq_core.artifacts`; its
names stay importable from here for one release (``artifact_path``, ``check_meta``,
``content_checksum``, ``read``, ``verify``, ``load_layer``, ``FORMAT``, ``FINGERPRINT_KEYS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vq_core import ConfigError, QuantizerConfig, invalid, invalid_choice
from vq_core.artifacts import (  # noqa: F401  (re-exported for one release)
    FINGERPRINT_KEYS,
    FORMAT,
    artifact_path,
    check_meta,
    content_checksum,
    load_layer,
    read,
    verify,
)


@dataclass(frozen=True)
class CalibratedConfig(QuantizerConfig):
    """Config fields every calibrated method shares.

    ``artifact``: dir or file from ``vq calibrate``; ``layer``: the model layer; ``kind``:
    ``"k"`` (keys) or ``"v"`` (values). ``untrained=True`` asks by name for the method's
    untrained neighbour (documented per method; for tests and demos): without it, a
    quantizer built with no artifact is refused (:func:`require_artifact`), never silently
    untrained.
    """

    artifact: str = ""
    layer: int = 0
    kind: str = "k"
    untrained: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.artifact, str):
            raise invalid("artifact", self.artifact, "a path string ('' = untrained)")
        invalid_choice("kind", self.kind, ("k", "v"))
        if type(self.layer) is not int or self.layer < 0:
            raise invalid("layer", self.layer, "an integer >= 0")
        if not isinstance(self.untrained, bool):
            raise invalid("untrained", self.untrained, "True or False")
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

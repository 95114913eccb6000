"""Moved: the artifact format and store are public in :mod:`vq_core.artifacts`.

``SafetensorsStore`` (now :class:`vq_core.ArtifactStore`) and ``check_model`` stay
importable from here for one release.
"""

from vq_core.artifacts import ArtifactStore as SafetensorsStore
from vq_core.artifacts import check_model

__all__ = ["SafetensorsStore", "check_model"]

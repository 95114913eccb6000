"""Method registry: ``create("turboquant_mse", bits=3, head_dim=128)``.

Methods register with :func:`register`. Packages that ship methods also list them under the
``vq.methods`` entry-point group, so ``create`` finds them without vq-core importing them.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any

from vq_core.errors import ConfigError, UnknownMethodError
from vq_core.quantizer import Quantizer

_REGISTRY: dict[str, type[Quantizer]] = {}
_ENTRY_POINT_GROUP = "vq.methods"


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: register a Quantizer subclass under ``cls.method``."""
    name = cls.method
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"method {name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    cls.config_class.method_name = name
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            cls = ep.load()
            _REGISTRY.setdefault(ep.name, cls)


def get(method: str) -> type[Quantizer]:
    """The Quantizer class registered as ``method``."""
    if method not in _REGISTRY:
        _load_entry_points()
    if method not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none (is vq-algorithms installed?)"
        raise UnknownMethodError(f"unknown method {method!r}; registered methods: {known}")
    return _REGISTRY[method]


def available() -> list[str]:
    """Names of every registered method (entry points included)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def create(method: str, **config: Any) -> Quantizer:
    """Build a quantizer by name, e.g. ``create("turboquant_mse", bits=3, head_dim=128)``."""
    cls = get(method)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ConfigError(
            f"{method}: unknown config option(s) {unknown}; allowed: {sorted(fields)}"
        )
    return cls.from_config(cls.config_class(**config))


def from_description(desc: dict[str, Any]) -> Quantizer:
    """Rebuild a quantizer from :meth:`Quantizer.describe` output, checking the version."""
    cls = get(desc["method"])
    if desc.get("version") != cls.config_class.version:
        raise ConfigError(
            f"{desc['method']}: saved with config version {desc.get('version')}, "
            f"this install reads version {cls.config_class.version}"
        )
    return create(desc["method"], **desc["config"])

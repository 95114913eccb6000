"""The vq error hierarchy.

Every error names the bad argument and, where there is a fixed set, the allowed values, so a
user can fix the call without reading the source.
"""

from __future__ import annotations


class VQError(Exception):
    """Base class of every error raised by vq."""


class ConfigError(VQError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ShapeError(VQError, ValueError):
    """An array has the wrong shape (e.g. last dimension != head_dim)."""


class DTypeError(VQError, TypeError):
    """An array has a dtype the operation does not accept."""


class NonFiniteError(VQError, ValueError):
    """An input holds NaN or Inf."""


class RangeError(VQError, ValueError):
    """An input value is finite but beyond what the method's codes can store (e.g. a norm
    above float16's 65504)."""


class UnknownMethodError(VQError, KeyError):
    """No quantizer is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ArtifactError(VQError):
    """A saved artifact is missing, corrupt, or belongs to another model/method/version."""


class MissingFileError(VQError, FileNotFoundError):
    """A file vq was pointed at (a model, a text) does not exist or is not the kind asked for."""


class MissingDependencyError(VQError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class CacheStateError(VQError, ValueError):
    """A saved cache state (e.g. a prompt-cache file) is corrupt, truncated, or does not
    match the model or the cache configuration it is loaded into."""


def invalid(name: str, value: object, allowed: str) -> ConfigError:
    """Build a ConfigError that names the argument, the bad value and what is allowed."""
    return ConfigError(f"{name}={value!r} is not allowed; expected {allowed}")


def invalid_choice(name: str, value: object, choices) -> None:
    """Raise a ConfigError unless ``value`` is one of ``choices``, type included (``2.0``
    and ``True`` are not ``2``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise invalid(name, value, f"one of {tuple(choices)}")

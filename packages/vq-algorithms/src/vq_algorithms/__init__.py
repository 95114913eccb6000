"""vq-algorithms."""

__version__ = "0.1.0"

"""vq-algorithms: the quantizer families, each registered under its module name.

``vq_core.create("turboquant_mse", bits=3, head_dim=128)`` builds one. Importing this
package imports every public module, which registers its method (module name == registry
key == CLI value); no kernel is compiled until first use.
"""

from __future__ import annotations

import importlib
import pkgutil

__version__ = "0.1.0"


def _discover() -> tuple[str, ...]:
    names = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
            names.append(info.name)
    return tuple(sorted(names))


METHODS: tuple[str, ...] = _discover()

__all__ = ["METHODS"]

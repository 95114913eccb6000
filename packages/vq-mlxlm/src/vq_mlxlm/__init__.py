"""vq-mlxlm: run mlx-lm models with vq's compressed KV caches.

``patch(model, method="turboquant_mse", bits=4)`` makes ``model.make_cache()`` (and so
``mlx_lm.generate``, ``stream_generate`` and the server) use compressed caches; the ``vq``
command line and the embedded default model live here too.

Importing this package defines names and nothing else: it loads no BLAS library, imports no
MLX and rewrites no mlx-lm module. On Linux, call :func:`enable_fast_blas` before anything
imports ``mlx.core`` to give MLX's CPU backend a fast BLAS (the ``vq`` command does);
:func:`patch` routes mlx-lm's attention (:func:`route`) when it is called.
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_EXPORTS = {
    "UnsupportedModelError": "vq_mlxlm.routing",
    "enable_fast_blas": "vq_mlxlm.fast_blas",
    "load_prompt_cache": "vq_mlxlm.prompt_cache",
    "patch": "vq_mlxlm.patch",
    "route": "vq_mlxlm.routing",
    "save_prompt_cache": "vq_mlxlm.prompt_cache",
    "unpatch": "vq_mlxlm.patch",
    "unroute": "vq_mlxlm.routing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Loaded on first use, so that ``import vq_mlxlm`` does not import MLX before a caller
    # could choose its BLAS (enable_fast_blas).
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vq_mlxlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(ModuleType):
    """``vq_mlxlm.patch`` is the function (as with an eager ``from vq_mlxlm.patch import
    patch``), also after something imports the submodule of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name == "patch" and isinstance(value, ModuleType):
            value = value.patch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

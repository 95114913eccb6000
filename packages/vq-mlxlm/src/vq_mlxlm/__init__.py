"""vq-mlxlm: run mlx-lm models with vq's compressed KV caches.

``patch(model, method="turboquant_mse", bits=4)`` makes ``model.make_cache()`` (and so
``mlx_lm.generate``, ``stream_generate`` and the server) use compressed caches; the ``vq``
command line and the embedded default model live here too.
"""

# Before anything imports mlx.core: give MLX's Linux CPU backend a fast BLAS if one exists.
from vq_mlxlm.fast_blas import enable_fast_blas

enable_fast_blas()

from vq_mlxlm.patch import patch, unpatch  # noqa: E402
from vq_mlxlm.prompt_cache import load_prompt_cache, save_prompt_cache  # noqa: E402
from vq_mlxlm.routing import UnsupportedModelError, route, unroute  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "UnsupportedModelError",
    "enable_fast_blas",
    "load_prompt_cache",
    "patch",
    "route",
    "save_prompt_cache",
    "unpatch",
    "unroute",
]

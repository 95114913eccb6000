"""vq-mlxlm: run mlx-lm models with vq's compressed KV caches.

``patch(model, method="turboquant_mse", bits=4)`` makes ``model.make_cache()`` (and so
``mlx_lm.generate``, ``stream_generate`` and the server) use compressed caches; the ``vq``
command line and the embedded default model live here too.
"""

from vq_mlxlm.patch import patch, unpatch
from vq_mlxlm.routing import UnsupportedModelError, route, unroute

__version__ = "0.1.0"

__all__ = ["UnsupportedModelError", "patch", "route", "unpatch", "unroute"]

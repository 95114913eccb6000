"""Route mlx-lm's attention through vq caches.

mlx-lm's model modules import ``scaled_dot_product_attention`` from ``mlx_lm.models.base``
by name, so replacing the function in ``base`` alone changes nothing. :func:`route` swaps
the name in every loaded ``mlx_lm.models.*`` module for :func:`routed_attention`, which
sends layers whose cache is a :class:`~vq_core.CompressedKVCache` (or the
:class:`~vq_core.BatchCompressedKVCache` mlx-lm's batching merges them into) to
:func:`vq_core.attend` over the views its ``update_and_fetch`` returned (mlx-lm passes them
in as ``keys``/``values``) and everything else to mlx-lm's own function. Idempotent and
reversible (:func:`unroute`).
"""

from __future__ import annotations

import sys

from vq_core import BatchCompressedKVCache, CacheView, CompressedKVCache, ConfigError, attend

_ORIGINALS: dict[str, object] = {}
_NAME = "scaled_dot_product_attention"


class UnsupportedModelError(ConfigError):
    """The model's attention does not go through a function vq can route."""


def _mlx_lm_sdpa():
    from mlx_lm.models import base

    return _ORIGINALS.get("mlx_lm.models.base", base.scaled_dot_product_attention)


def routed_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Drop-in for ``mlx_lm.models.base.scaled_dot_product_attention`` (learned ``sinks``
    included: gpt-oss)."""
    if isinstance(cache, (CompressedKVCache, BatchCompressedKVCache)):
        if not (isinstance(keys, CacheView) and isinstance(values, CacheView)):
            raise TypeError(
                "a vq cache's attention needs the views its update_and_fetch returned as "
                f"keys/values, got {type(keys).__name__}/{type(values).__name__}"
            )
        return attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    return _mlx_lm_sdpa()(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def route() -> list[str]:
    """Route every loaded ``mlx_lm.models.*`` module; returns the modules routed now."""
    _mlx_lm_sdpa()  # make sure base is loaded and its original remembered
    from mlx_lm.models import base

    _ORIGINALS.setdefault("mlx_lm.models.base", base.scaled_dot_product_attention)
    done = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or module is None:
            continue
        current = getattr(module, _NAME, None)
        if current is None or current is routed_attention:
            continue
        if current is _ORIGINALS["mlx_lm.models.base"]:
            _ORIGINALS.setdefault(name, current)
            setattr(module, _NAME, routed_attention)
            done.append(name)
    return done


def unroute() -> None:
    """Put mlx-lm's own function back everywhere."""
    for name, fn in _ORIGINALS.items():
        module = sys.modules.get(name)
        if module is not None:
            setattr(module, _NAME, fn)
    _ORIGINALS.clear()


def is_routed(model) -> bool:
    """True when the module defining ``model`` calls the routed attention."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, _NAME, None) is routed_attention

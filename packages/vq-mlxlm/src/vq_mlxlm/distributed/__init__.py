"""Compressed caches under mlx-lm's distributed inference (``mx.distributed``, ``mlx.launch``).

Shard a loaded model with mlx-lm's own sharding (:func:`shard`: ``model.shard(group)`` for
tensor parallelism, ``model.model.pipeline(group)`` for pipeline parallelism), then
:func:`vq_mlxlm.patch` it: each rank builds compressed caches for its own KV heads and
layers only. :func:`check_same_settings` refuses ranks that disagree, :class:`Watchdog`
and :func:`collective` bound the wait on a rank that died or hangs, and
``vq launch`` (:mod:`vq_mlxlm.distributed.launch`) is ``mlx.launch`` with an exit status
that reports a failed rank. No transport or scheduler of vq's own is involved.
"""

from vq_mlxlm.distributed.agreement import check_same_settings, run_settings
from vq_mlxlm.distributed.layout import ShardLayout, layout
from vq_mlxlm.distributed.shard import PARALLEL, shard
from vq_mlxlm.distributed.watchdog import EXIT_TIMEOUT, RankError, Watchdog, collective

__all__ = [
    "EXIT_TIMEOUT",
    "PARALLEL",
    "RankError",
    "ShardLayout",
    "Watchdog",
    "check_same_settings",
    "collective",
    "layout",
    "run_settings",
    "shard",
]

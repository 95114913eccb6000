"""mlx-lm's ``BatchGenerator`` as ``vq serve`` runs it: the same engine, plus one log line
of KV-cache memory per active session whenever the set of sessions changes.

mlx-lm's server batches requests (continuous batching) when every layer's cache has
``merge``; vq's caches merge into :class:`~vq_core.BatchCompressedKVCache`, so concurrent
requests decode together over compressed caches. The line reads, e.g.::

    vq serve: KV 8 active sessions, 4.21 MB held, 0.53 MB/session (18,432 B/token; fp16 46,080 B/token)

``held`` is the bytes the caches really hold (``nbytes`` of every array, padding included);
bytes per token divide it by the tokens the sessions hold. A session whose client went
away is removed by mlx-lm (``remove``); that is logged as well, so its cache is seen freed.
"""

from __future__ import annotations

import logging

from mlx_lm.generate import BatchGenerator

from vq_core import BatchCompressedKVCache

log = logging.getLogger("vq_mlxlm.serve")


class LoggedBatchGenerator(BatchGenerator):
    """``BatchGenerator`` that logs KV bytes per active session (see the module docstring)."""

    fp16_bytes_per_token: int | None = None  # set by ``vq serve`` from the model's KV shape

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged: frozenset[int] = frozenset()

    def next(self):
        out = super().next()
        self._log_if_changed()
        return out

    def remove(self, uids, return_prompt_caches=False):
        out = super().remove(uids, return_prompt_caches=return_prompt_caches)
        log.info(f"vq serve: stopped {len(uids)} session(s) whose client went away")
        self._log_if_changed()
        return out

    def active_sessions(self) -> frozenset[int]:
        """Sessions holding a cache: those in prompt processing and in generation."""
        return frozenset(self._prompt_batch.uids) | frozenset(self._generation_batch.uids)

    def kv_tokens(self) -> int:
        """Tokens the active sessions hold (read from the first compressed layer)."""
        total = 0
        for batch in (self._prompt_batch, self._generation_batch):
            held = [c for c in batch.prompt_cache if isinstance(c, BatchCompressedKVCache)]
            total += sum(held[0].lengths()) if held else 0
        return total

    def _log_if_changed(self) -> None:
        active = self.active_sessions()
        if active == self._logged:
            return
        self._logged = active
        held = self.prompt_cache_nbytes
        n, tokens = len(active), self.kv_tokens()
        line = f"vq serve: KV {n} active sessions, {held / 1e6:.2f} MB held"
        if n:
            line += f", {held / n / 1e6:.2f} MB/session"
        if tokens:
            line += f" ({held // tokens:,} B/token"
            fp16 = self.fp16_bytes_per_token
            line += f"; fp16 {fp16:,} B/token)" if fp16 else ")"
        log.info(line)

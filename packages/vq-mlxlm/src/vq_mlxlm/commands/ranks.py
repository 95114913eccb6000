"""The ranks of a ``vq`` command started by ``vq launch`` / ``mlx.launch``.

:func:`join` returns ``None`` for a single process without ``--parallel``; otherwise a
:class:`Ranks` for the world group: it shards the loaded model (``--parallel``), checks that
every rank runs the same settings, guards each wait on the others with a
:class:`~vq_mlxlm.distributed.Watchdog` (``--rank-timeout``) and gathers per-rank numbers
to rank 0, which alone prints.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TypeVar

from vq_mlxlm.commands.flags import FlagError

T = TypeVar("T")


class Ranks:
    def __init__(self, group, parallel: str, tensor_size: int, timeout: float, prog: str):
        self.group, self.parallel, self.tensor_size = group, parallel, tensor_size
        self.rank, self.size, self.prog = group.rank(), group.size(), prog
        self.watchdog = None
        self.timeout = timeout

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        """A progress line on stderr, from rank 0 only."""
        if self.leader:
            print(text, file=sys.stderr, flush=True)

    def shard(self, model):
        from vq_core import VQError
        from vq_mlxlm.distributed import layout, shard

        try:
            model = shard(model, self.group, self.parallel, tensor_size=self.tensor_size)
        except VQError as e:
            raise FlagError("--parallel", str(e)) from None
        print(
            f"{self.prog}: rank {self.rank}/{self.size} (pid {os.getpid()}, "
            f"{socket.gethostname()}): {self.parallel} parallel, {layout(model).describe()}",
            file=sys.stderr,
            flush=True,
        )
        return model

    @contextmanager
    def watching(self):
        from vq_mlxlm.distributed import Watchdog

        with Watchdog(self.timeout, self.rank, self.prog) as dog:
            self.watchdog = dog
            try:
                yield self
            finally:
                self.watchdog = None

    def beat(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(what)

    def collective(self, what: str, fn: Callable[[], T]) -> T:
        from vq_mlxlm.distributed import collective

        self.beat(what)
        return collective(what, self.rank, fn)

    def check(self, model, extra: dict[str, Any]) -> None:
        from vq_mlxlm.distributed import check_same_settings, run_settings

        settings = run_settings(model, extra)
        self.collective(
            "comparing settings with the other ranks",
            lambda: check_same_settings(self.group, settings),
        )

    def gather(self, values: list[int]) -> list[list[int]]:
        """``values`` of every rank (a row each, by rank)."""
        import mlx.core as mx

        def run():
            from mlx_lm.generate import generation_stream

            # generate_step has the next step's collectives in flight; two collectives at
            # once on one group interleave their messages (garbage on the ring backend)
            mx.synchronize(generation_stream)
            mine = mx.array([values], dtype=mx.int64)
            return mx.distributed.all_gather(mine, group=self.group, stream=mx.cpu).tolist()

        return self.collective("gathering per-rank cache bytes", run)


def add_arguments(p) -> None:
    from vq_mlxlm.commands.flags import integer
    from vq_mlxlm.distributed import PARALLEL

    p.add_argument(
        "--parallel",
        choices=PARALLEL,
        default=None,
        help="under vq launch / mlx.launch: shard heads (tensor, the default), layers "
        "(pipeline) or both (needs a backend with group split, not ring)",
    )
    p.add_argument(
        "--tensor-size",
        type=integer(1),
        default=2,
        help="tensor+pipeline: ranks per pipeline stage (default 2)",
    )
    p.add_argument(
        "--rank-timeout",
        type=float,
        default=120.0,
        help="seconds a rank waits for the others' next step before it stops (default 120)",
    )


def join(args, prog: str) -> Ranks | None:
    """The world group as :class:`Ranks`, or ``None`` for one process without --parallel."""
    import mlx.core as mx

    if not args.rank_timeout > 0:
        raise FlagError("--rank-timeout", f"{args.rank_timeout} is not a number of seconds > 0")
    group = mx.distributed.init()
    if group.size() == 1 and args.parallel is None:
        return None
    return Ranks(group, args.parallel or "tensor", args.tensor_size, args.rank_timeout, prog)

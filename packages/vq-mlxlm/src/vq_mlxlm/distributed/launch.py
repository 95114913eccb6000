"""``vq launch``: ``mlx.launch`` with an exit status that reports a failed rank.

``mlx.launch`` (MLX 0.32) stops every rank once one exits with a non-zero status, but then
itself exits 0, so a script or CI job cannot tell a failed distributed run from a good one.
This runs MLX's own launcher unchanged (same arguments: ``--backend ring|mpi|nccl|jaccl``,
``-n``, ``--hosts``, ``--hostfile``, ``--env`` ...), records each rank's exit status, and
exits with the first failed rank's status (``128 + signal`` for a rank killed by a signal),
after one line naming the rank that failed first and how.
"""

from __future__ import annotations

import signal
import sys


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def main(argv: list[str] | None = None) -> int:
    try:
        from mlx._distributed_utils import launch as mlx_launch
    except ImportError as e:  # pragma: no cover - MLX moved its launcher
        print(f"vq launch: error: MLX's launcher is not importable ({e})", file=sys.stderr)
        return 2
    base = mlx_launch.RemoteProcess
    finished: list[tuple[int, int, bool]] = []  # (rank, status, stopped by the launcher)

    class Recorded(base):
        def __init__(self, rank, *args, **kwargs):
            super().__init__(rank, *args, **kwargs)
            self._vq_rank = rank

        @property
        def exit_status(self):
            code, killed = super().exit_status
            if code is not None and all(r != self._vq_rank for r, _, _ in finished):
                finished.append((self._vq_rank, code, bool(killed)))
            return code, killed

    argv = sys.argv[1:] if argv is None else argv
    saved = sys.argv
    sys.argv, mlx_launch.RemoteProcess = ["vq launch", *argv], Recorded
    try:
        mlx_launch.main()
    finally:
        sys.argv, mlx_launch.RemoteProcess = saved, base
    failed = [(rank, code) for rank, code, _ in finished if code != 0]  # in finishing order
    if not failed:
        return 0
    (rank, code), later = failed[0], failed[1:]
    rest = "".join(f"; then rank {r} {_describe(c)}" for r, c in later)
    print(f"vq launch: error: rank {rank} {_describe(code)} first{rest}", file=sys.stderr)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())

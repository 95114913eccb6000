"""Handing finished cache work to the device early (``mx.async_eval``), outside traces."""

from __future__ import annotations

import mlx.core as mx


def submit(arrays: list[mx.array]) -> None:
    """``mx.async_eval(arrays)``: their graph runs as its own submission, ahead of the step
    that reads them. While ``mx.compile`` (or another transformation) traces, which refuses
    any evaluation, nothing is submitted and the arrays stay in the traced graph."""
    try:
        mx.async_eval(arrays)
    except ValueError as exc:
        if "graph transformation" not in str(exc):
            raise

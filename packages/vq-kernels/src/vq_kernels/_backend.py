"""Backend choice, lazy compilation with a per-specialization cache, and the compile report.

``backend`` is ``"metal"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; ``None`` means the
environment variable ``VQ_KERNELS_BACKEND`` if set, else the GPU MLX was built for, else
``"cpu"``. ``"cpu"`` is native CPU code (``vq_kernels/cpu/``, compiled with the system C++
compiler at first use, :mod:`vq_kernels._cpu`) for the ops in :data:`CPU_OPS` and the pure-MLX
reference for every other op: the one rule, applied by ``resolve_backend(backend, op=...)``.
Nothing here runs at import: kernel objects are made on the first call of an op, and MLX
compiles each specialization (the template ints and input dtypes) on its first evaluation,
which :func:`launch` forces and times. A kernel that fails to compile or run raises
:class:`KernelError` naming the kernel and the backend; no op ever switches path on failure
(the one exception, warned about on stderr: native CPU code that cannot be built when
``"cpu"`` was only the default choice, see :mod:`vq_kernels._cpu`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from vq_kernels import _sources

BACKENDS = ("metal", "cuda", "cpu", "reference")
ENV_VAR = "VQ_KERNELS_BACKEND"
# Ops with native CPU code: on the "cpu" backend every other op runs its reference.
CPU_OPS = frozenset({"codebook_decode_attention"})


class KernelError(RuntimeError):
    """A vq kernel failed to compile or run, or its backend is unavailable."""


@dataclass(frozen=True)
class CompileRecord:
    """First call of one kernel specialization: compile plus one run, in seconds."""

    kernel: str
    backend: str
    specialization: tuple[tuple[str, Any], ...]
    first_call_s: float


_KERNEL_OBJECTS: dict[tuple[str, str], Any] = {}
_RECORDS: dict[tuple[Any, ...], CompileRecord] = {}


def available_backend() -> str:
    """The GPU backend this MLX build can run ("metal", "cuda"), else "reference"."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "reference"


def resolve_backend(backend: str | None = None, *, op: str | None = None) -> str:
    """The backend an op runs on: the argument, else ``$VQ_KERNELS_BACKEND``, else the GPU's,
    else ``"cpu"``. With ``op`` (an op's name), ``"cpu"`` becomes ``"reference"`` unless the
    op has native CPU code (:data:`CPU_OPS`)."""
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice == "auto":
        gpu = available_backend()
        choice = "cpu" if gpu == "reference" else gpu
    elif choice not in BACKENDS:
        raise ValueError(f"unknown vq_kernels backend {choice!r}; expected one of {BACKENDS}")
    elif choice in ("metal", "cuda") and available_backend() != choice:
        raise KernelError(f"vq_kernels backend {choice!r} is not available in this MLX build")
    if choice == "cpu" and op is not None and op not in CPU_OPS:
        return "reference"
    return choice


def explicit_choice(backend: str | None = None) -> bool:
    """Whether the backend was asked for (the argument, or ``$VQ_KERNELS_BACKEND`` other than
    "auto") rather than picked by default."""
    return backend is not None or os.environ.get(ENV_VAR, "auto") not in ("", "auto")


def _kernel_object(name: str, backend: str) -> Any:
    key = (name, backend)
    if key not in _KERNEL_OBJECTS:
        spec = _sources.SPECS[name]
        make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        _KERNEL_OBJECTS[key] = make(
            name=f"vq_{name}",
            input_names=spec.input_names,
            output_names=spec.output_names,
            source=_sources.compact(_sources.body(name, backend)),
            header=_sources.compact(_sources.header(backend)),
        )
    return _KERNEL_OBJECTS[key]


def launch(
    name: str,
    backend: str,
    inputs: Sequence[mx.array],
    *,
    template: Sequence[tuple[str, int]],
    grid: tuple[int, int, int],
    threadgroup: tuple[int, int, int],
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[mx.Dtype],
) -> list[mx.array]:
    """Run kernel ``name`` on ``backend`` ("metal" or "cuda"); grid counts threads, as in MLX.

    The first call of each specialization is evaluated at once so that its compile time is
    recorded and a compile error surfaces here, as a :class:`KernelError`.
    """
    if backend not in ("metal", "cuda"):
        raise KernelError(f"vq kernel {name!r} runs on metal or cuda, not {backend!r}")
    key = (name, backend, tuple(template), tuple(str(a.dtype) for a in inputs))
    first = key not in _RECORDS
    try:
        start = time.perf_counter()
        outs = _kernel_object(name, backend)(
            inputs=list(inputs),
            template=list(template),
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[tuple(s) for s in output_shapes],
            output_dtypes=list(output_dtypes),
        )
        if first:
            mx.eval(outs)
            seconds = time.perf_counter() - start
            spec = (*tuple(template), ("dtypes", key[3]))
            _RECORDS[key] = CompileRecord(name, backend, spec, seconds)
    except Exception as exc:
        raise KernelError(f"vq kernel {name!r} failed on the {backend} backend: {exc}") from exc
    return list(outs)


def compile_report() -> list[CompileRecord]:
    """One record per kernel specialization compiled so far in this process, oldest first."""
    return list(_RECORDS.values())


def params(*values: int) -> mx.array:
    """Runtime integer parameters of a kernel, as an int32 vector."""
    return mx.array(list(values), dtype=mx.int32)

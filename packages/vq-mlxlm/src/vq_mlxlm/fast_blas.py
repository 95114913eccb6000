"""Give MLX's Linux CPU backend a fast BLAS.

The ``mlx[cpu]`` wheel's ``libmlx.so`` leaves ``cblas_sgemm`` (and the LAPACK symbols) undefined
and lists a bundled netlib *reference* BLAS as a dependency; a float32 matmul there runs at a
few GFLOP/s. The dynamic linker resolves those symbols in the *global* scope first (the
executable, ``LD_PRELOAD`` and every library opened with ``RTLD_GLOBAL``) and only then in
``libmlx.so``'s own dependencies. So a library with un-prefixed ``cblas_sgemm`` loaded with
``RTLD_GLOBAL`` before the first ``import mlx.core`` replaces the reference BLAS. Python opens
extensions with ``RTLD_NOW``, so once ``mlx.core`` is imported the choice is fixed.

Candidates, in order (first that loads wins):

1. ``VQ_BLAS``: an explicit library path, or ``"reference"`` to keep MLX's own BLAS;
2. the system OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``);
3. Intel MKL from the ``mkl`` PyPI wheel (x86_64; about 300 MB of wheels);
4. ``ngsolve-openblas`` (PyPI, DYNAMIC_ARCH build; needs the system ``libgfortran.so.5``).

PyPI's ``scipy-openblas32/64`` (and numpy's bundled copy) export ``scipy_``-prefixed symbols,
so they cannot stand in. ``cmeel-openblas`` is left out: its build targets one CPU (SKYLAKEX,
AVX-512) and would crash with an illegal instruction elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FIX = "apt-get install libopenblas0-pthread  (or: pip install mkl)"
REFERENCE = "MLX's bundled reference BLAS (slow)"

_chosen: str | None = None
_handles: list[ctypes.CDLL] = []  # keep loaded libraries alive


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_sgemm_owner() -> str | None:
    """The file that ``cblas_sgemm`` resolves to in the process's global scope, if any."""
    try:
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None
    info = _DlInfo()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.dli_fname:
        return os.fsdecode(info.dli_fname)
    return "unknown library"


def _wheel_files(dist: str, prefix: str) -> Iterator[str]:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return
    for f in files:
        if Path(f.name).name.startswith(prefix) and ".so" in f.name:
            yield str(f.locate())


def _candidates() -> Iterator[tuple[str, str]]:
    """``(description, library path or name)`` in order of preference."""
    explicit = os.environ.get("VQ_BLAS")
    if explicit:
        yield f"VQ_BLAS={explicit}", explicit
        return
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas")):
        if name:
            yield "system OpenBLAS", name
    for path in sorted(_wheel_files("mkl", "libmkl_rt.so")):
        yield "Intel MKL (pip mkl)", path
    for path in _wheel_files("ngsolve-openblas", "libopenblas"):
        yield "OpenBLAS (pip ngsolve-openblas)", path


def _first_loadable() -> str | None:
    """``"description path"`` of the first candidate that loads (privately, not global)."""
    for what, path in _candidates():
        try:
            if hasattr(ctypes.CDLL(path, mode=os.RTLD_LOCAL), "cblas_sgemm"):
                return f"{what} {path}"
        except OSError:
            continue
    return None


def _describe(lib: ctypes.CDLL, what: str, path: str) -> str:
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f"{what}: {lib.openblas_get_config().decode()} ({path})"
    except AttributeError:
        return f"{what} ({path})"


def enable_fast_blas() -> str:
    """Load the fastest BLAS found for MLX's CPU backend; return which BLAS MLX uses.

    Call before anything imports ``mlx.core``. Idempotent. Does nothing on macOS (MLX uses
    Accelerate there). Warns once when only the reference BLAS is available, with the fix.
    """
    global _chosen
    if _chosen is not None:
        return _chosen
    if sys.platform == "darwin":
        _chosen = "Apple Accelerate (macOS)"
        return _chosen

    owner = _global_sgemm_owner()
    if "mlx.core" in sys.modules or owner is not None:
        # Too late to choose (or someone chose already): report what MLX is bound to.
        _chosen = f"already loaded: {owner}" if owner else REFERENCE
        if not owner and (found := _first_loadable()):
            warnings.warn(
                f"{found} is installed but mlx.core was imported before "
                f"vq_mlxlm.fast_blas.enable_fast_blas(); MLX keeps its slow reference BLAS. "
                f"Call it before importing mlx, or run with LD_PRELOAD={found.split()[-1]}",
                RuntimeWarning,
                stacklevel=2,
            )
            log.info("BLAS for MLX: %s", _chosen)
            return _chosen
    elif os.environ.get("VQ_BLAS", "").lower() == "reference":
        _chosen = REFERENCE
    else:
        _chosen = REFERENCE
        for what, path in _candidates():
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                log.debug("BLAS candidate %s (%s) did not load: %s", what, path, err)
                continue
            if not hasattr(lib, "cblas_sgemm"):
                continue
            _handles.append(lib)
            _chosen = _describe(lib, what, path)
            break

    if _chosen == REFERENCE and sys.platform.startswith("linux"):
        warnings.warn(
            f"MLX's CPU backend is using its reference BLAS (float32 matmul ~30x slower); "
            f"fix: {FIX}",
            RuntimeWarning,
            stacklevel=2,
        )
    log.info("BLAS for MLX: %s", _chosen)
    return _chosen


def measure_gflops(n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an ``n x n`` float32 matmul on MLX's CPU (imports ``mlx.core``)."""
    import time

    import mlx.core as mx

    with mx.stream(mx.cpu):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e9

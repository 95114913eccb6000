"""Native CPU code: compiled from ``vq_kernels/cpu/*.cpp`` with the system C++ compiler at
first use, cached on disk, loaded with ctypes.

The library of a source file is built once per (source, compiler, flags, CPU features)
into ``$VQ_KERNELS_CACHE`` (default ``~/.cache/vq-kernels``) under a name holding a hash
of those, written to a temporary file and renamed into place, so processes that build it
at once do not see each other's half-written files. Compiling prints one line to stderr.
The compiler is ``$CXX``, else ``c++``, else ``g++``; flags ``-O3 -march=native``.

When the library cannot be built (no compiler, a compile error) :func:`library` raises
:class:`~vq_kernels.KernelError` if the native backend was asked for (``backend="cpu"``
or ``VQ_KERNELS_BACKEND=cpu``); when "cpu" was only the default choice it warns once on
stderr, naming the reason, and returns None: the op's pure-MLX reference runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vq_kernels._backend import KernelError

SOURCE_DIR = Path(__file__).with_name("cpu")
CACHE_VAR = "VQ_KERNELS_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")

_LOADED: dict[str, ctypes.CDLL] = {}
_FAILED: dict[str, str] = {}  # source name -> why it could not be built (warned once)


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``c++``, else ``g++`` on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    return shutil.which("c++") or shutil.which("g++")


def cache_dir() -> Path:
    """Where built libraries live: ``$VQ_KERNELS_CACHE``, else ``~/.cache/vq-kernels``."""
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "vq-kernels")


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, its CPU flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library_path(name: str, cxx: str) -> Path:
    """The cached library of ``cpu/<name>.cpp`` built with ``cxx``."""
    source = (SOURCE_DIR / f"{name}.cpp").read_bytes()
    key = hashlib.sha256()
    for part in (source, cxx.encode(), " ".join(FLAGS).encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"


def build(name: str) -> Path:
    """Compile ``cpu/<name>.cpp`` unless its library is cached; returns the library's path.

    Raises KernelError naming the problem (no compiler, the compiler's error output).
    """
    cxx = compiler()
    if cxx is None:
        raise KernelError("no C++ compiler found (set $CXX, or install c++ / g++)")
    path = library_path(name, cxx)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, str(SOURCE_DIR / f"{name}.cpp"), "-o", tmp]
    print(f"vq-kernels: compiling {name}.cpp with {cxx} (first use) -> {path}", file=sys.stderr)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelError(f"compiling {name}.cpp failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library(name: str, *, explicit: bool) -> ctypes.CDLL | None:
    """The loaded library of ``cpu/<name>.cpp``, built on first use.

    ``explicit``: the native backend was asked for, so a failure raises KernelError;
    otherwise a failure warns once on stderr and returns None (the reference runs).
    """
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED and not explicit:
        return None
    try:
        lib = ctypes.CDLL(str(build(name)))
    except (KernelError, OSError) as exc:
        reason = str(exc)
        if explicit:
            raise KernelError(f"vq-kernels' native CPU code is unavailable: {reason}") from exc
        if name not in _FAILED:
            print(
                f"vq-kernels: native CPU code {name}.cpp is unavailable ({reason}); "
                "the pure-MLX reference runs instead",
                file=sys.stderr,
            )
        _FAILED[name] = reason
        return None
    _LOADED[name] = lib
    return lib

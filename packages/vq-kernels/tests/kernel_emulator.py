"""Run vq-kernels' kernel bodies on the CPU, as a stand-in for ``vq_kernels._backend.launch``.

Each body is compiled by g++ with ``emu/prelude_emu.h`` (one fiber per GPU thread; barriers
and warp shuffles are thread-group rendezvous) into a small shared library per
specialization, and launched over the whole grid, one thread group after another. The
ops' Python wrappers run unchanged on top (:func:`emulate` patches their ``launch`` and
backend choice), so a test exercises the wrapper's grid, template values and shapes and the
body's indexing, reductions and split merge. What it cannot show: CUDA/Metal compiler
behaviour, the memory model across thread groups, timing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import pytest

from vq_kernels import _sources

PRELUDE = Path(__file__).with_name("emu") / "prelude_emu.h"
_TYPES = {
    "float32": "float",
    "float16": "vq_half",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int32": "int32_t",
    "bool": "bool",
}
_BUILD = Path(tempfile.mkdtemp(prefix="vq_emu_"))
LAUNCHED: list[str] = []  # kernel names, in launch order


def compiler() -> str:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no g++ or clang++ on PATH")
    return cxx


def _source(
    name: str,
    template: tuple[tuple[str, int], ...],
    dtypes: tuple[str, ...],
    out_dtypes: tuple[str, ...],
) -> str:
    spec = _sources.SPECS[name]
    body = _sources.body(name, "cuda")
    lines = [f'#include "{PRELUDE}"', _sources.read("common.h"), "namespace vq_args {"]
    for (n, _), t in zip(spec.inputs, dtypes, strict=True):
        lines.append(f"const {_TYPES[t]}* {n};")
        lines.append(f"VqShape {n}_shape;")
    for (n, _), t in zip(spec.outputs, out_dtypes, strict=True):  # typed as launched, as MLX does
        lines.append(f"{_TYPES[t]}* {n};")
    lines.append("}  // namespace vq_args")
    lines.append("static void vq_kernel() {\n  using namespace vq_args;")
    lines += [f"  constexpr int {n} = {v};" for n, v in template]
    lines.append(body + "\n}")
    sets = [f"    case {i}: vq_args::{n} = (decltype(vq_args::{n}))p; break;" for i, n in
            enumerate(spec.input_names + spec.output_names)]  # fmt: skip
    shapes = [f"    case {i}: s = &vq_args::{n}_shape; break;" for i, n in
              enumerate(spec.input_names)]  # fmt: skip
    lines.append(
        'extern "C" void vq_set(int i, void* p, const int* shape) {\n'
        "  switch (i) {\n" + "\n".join(sets) + "\n  }\n"
        "  VqShape* s = nullptr;\n  switch (i) {\n" + "\n".join(shapes) + "\n  }\n"
        "  if (s) for (int k = 0; k < 8; ++k) s->v[k] = shape[k];\n}\n"
        'extern "C" void vq_launch(int bx, int by, int bz, int tpb) {\n'
        "  vq_emu::body = vq_kernel;\n  vq_emu::ngx = bx;\n  vq_emu::tpb = tpb;\n"
        "  for (int z = 0; z < bz; ++z) for (int y = 0; y < by; ++y)"
        " for (int x = 0; x < bx; ++x) {\n"
        "    vq_emu::gx = x; vq_emu::gy = y; vq_emu::gz = z;\n"
        "    vq_emu::run_group(tpb);\n  }\n}\n"
    )
    return "\n".join(lines)


@functools.cache
def _library(
    name: str,
    template: tuple[tuple[str, int], ...],
    dtypes: tuple[str, ...],
    out_dtypes: tuple[str, ...],
):
    src = _source(name, template, dtypes, out_dtypes)
    tag = hashlib.sha1(src.encode()).hexdigest()[:16]
    lib = _BUILD / f"{name}_{tag}.so"
    if not lib.exists():
        cpp = _BUILD / f"{name}_{tag}.cpp"
        cpp.write_text(src)
        cmd = [compiler(), "-std=c++17", "-O0", "-shared", "-fPIC", "-w", str(cpp), "-o", str(lib)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"emulated {name} failed to compile:\n{res.stderr}")
    so = ctypes.CDLL(str(lib))
    so.vq_set.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    so.vq_launch.argtypes = [ctypes.c_int] * 4
    return so


def _dtype_name(d: mx.Dtype) -> str:
    return str(d).rsplit(".", 1)[-1]


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
    """``vq_kernels._backend.launch`` on the CPU (same arguments; ``backend`` is ignored)."""
    LAUNCHED.append(name)
    mx.eval(list(inputs))
    so = _library(
        name,
        tuple((n, int(v)) for n, v in template),
        tuple(_dtype_name(a.dtype) for a in inputs),
        tuple(_dtype_name(d) for d in output_dtypes),
    )
    keep = []
    for i, a in enumerate(inputs):
        buf = ctypes.create_string_buffer(bytes(memoryview(a)), max(a.nbytes, 1))
        shape = (ctypes.c_int * 8)(*(list(a.shape) + [0] * (8 - a.ndim)))
        keep.append(buf)
        so.vq_set(i, ctypes.cast(buf, ctypes.c_void_p), shape)
    outs = []
    for j, (shape, dt) in enumerate(zip(output_shapes, output_dtypes, strict=True)):
        n = 1
        for s in shape:
            n *= s
        size = max(n * dt.size, 1)
        buf = ctypes.create_string_buffer(b"\xff" * size, size)  # poisoned: NaN / all ones
        outs.append((buf, tuple(shape), dt, n))
        so.vq_set(len(inputs) + j, ctypes.cast(buf, ctypes.c_void_p), None)
    bx, by, bz = (-(-g // t) for g, t in zip(grid, threadgroup, strict=True))
    if threadgroup[1] != 1 or threadgroup[2] != 1:
        raise ValueError("the emulator runs one-dimensional thread groups only")
    so.vq_launch(bx, by, bz, threadgroup[0])
    result = []
    for buf, shape, dt, n in outs:
        raw = mx.array(memoryview(buf).cast("B")[: n * dt.size])
        result.append(raw.view(dt).reshape(shape) if n else mx.zeros(shape, dt))
    return result


def emulate(monkeypatch: pytest.MonkeyPatch, backend: str = "cuda") -> list[str]:
    """Route every vq_kernels op through :func:`launch` as if MLX ran on ``backend``.

    Returns the list the emulator appends each launched kernel's name to (emptied here).
    """
    compiler()
    LAUNCHED.clear()
    import vq_kernels._attention as attention
    import vq_kernels.affine_attention as affine_attention
    import vq_kernels.codebook as codebook
    import vq_kernels.codebook_attention as codebook_attention
    import vq_kernels.packing as packing
    import vq_kernels.pq_attention as pq_attention
    import vq_kernels.sign as sign

    mods = (attention, affine_attention, codebook, codebook_attention, packing, pq_attention)
    for mod in (*mods, sign):
        if hasattr(mod, "launch"):
            monkeypatch.setattr(mod, "launch", launch)
        if hasattr(mod, "resolve_backend"):
            monkeypatch.setattr(
                mod,
                "resolve_backend",
                lambda b=None, op=None: "reference" if b == "reference" else backend,
            )
    return LAUNCHED

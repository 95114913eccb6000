"""Kernel sources: one body per kernel, a prelude per backend, and the kernel signatures.

Every body under ``sources/`` is written once in the subset Metal and CUDA share and uses only
the ``vq_*`` vocabulary of ``prelude_metal.h`` / ``prelude_cuda.cuh``. MLX generates each
kernel's signature from :class:`KernelSpec`'s input and output names; the same specs let the
offline tests wrap a body in a close stand-in of that signature and run a real compiler on it.
Files are read lazily, on first use, so importing ``vq_kernels`` reads nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

BACKEND_FILES = {"metal": "prelude_metal.h", "cuda": "prelude_cuda.cuh"}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's name, its typed inputs and outputs, and one example specialization.

    ``inputs``/``outputs`` are ``(name, dtype)`` pairs with dtypes spelled as in ``mlx.core``
    (``"float32"``, ``"uint32"``...); ``template`` holds compile-time ints with example values
    (the real values are chosen per call).
    """

    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    template: tuple[tuple[str, int], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [n for n, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.outputs]


_P = ("params", "int32")
_ATTN_OUT = (("pm", "float32"), ("pl", "float32"), ("pacc", "float32"))
# The decode tail's inputs (DecodeTail.inputs, the tail_*.inc fragments), in this order.
_TAIL_IN = (
    ("qk", "float32"),
    ("mvt", "float32"),
    ("ek", "float16"),
    ("ev", "float16"),
    ("kmu", "float32"),
    ("vmu", "float32"),
    ("fin", "bool"),
)

SPECS: dict[str, KernelSpec] = {
    s.name: s
    for s in (
        KernelSpec("pack_bits", (("codes", "uint32"), _P), (("words", "uint32"),), (("BITS", 3),)),
        KernelSpec(
            "unpack_bits", (("words", "uint32"), _P), (("codes", "uint32"),), (("BITS", 3),)
        ),
        KernelSpec(
            "codebook_quantize",
            (("y", "float32"), ("centroids", "float32"), _P),
            (("packed", "uint32"), ("norm", "float16")),
            (("D", 128), ("BITS", 3)),
        ),
        KernelSpec(
            "codebook_dequantize",
            (("packed", "uint32"), ("norm", "float16"), ("centroids", "float32"), _P),
            (("out", "float32"),),
            (("D", 128), ("BITS", 3)),
        ),
        KernelSpec(
            "codebook_attn",
            (
                ("q", "float32"),
                ("kw", "uint32"),
                ("kn", "float16"),
                ("kc", "float32"),
                ("vw", "uint32"),
                ("vn", "float16"),
                ("vc", "float32"),
                ("kd", "float16"),
                ("q2", "float32"),
                ("k2w", "uint32"),
                ("k2n", "float16"),
                ("k2c", "float32"),
                *_TAIL_IN,
                ("lengths", "int32"),
                ("sem", "int32"),
            ),
            (("out", "float32"), ("lse", "float32"), *_ATTN_OUT),
            (
                ("D", 128),
                ("KB", 4),
                ("VB", 4),
                ("G", 4),
                ("GT", 4),
                ("NT", 4),
                ("SCALE", 1035098454),
                ("FUSED", 1),
                ("MAX_SPLITS", 256),
                ("KDIV", 0),
                ("KUNIT", 0),
                ("K2", 0),
                ("K2SCALE", 0),
                ("TAIL", 1),
                ("ROT", 1),
                ("CEN", 1),
                ("FIN", 1),
                ("MMA", 1),
                ("PF", 1),
            ),
        ),
        KernelSpec(
            "affine_attn",
            (
                ("q", "float32"),
                ("kw", "uint32"),
                ("ks", "float16"),
                ("kb", "float16"),
                ("vw", "uint32"),
                ("vs", "float16"),
                ("vb", "float16"),
                *_TAIL_IN,
                ("lengths", "int32"),
                ("sem", "int32"),
            ),
            (("out", "float32"), ("lse", "float32"), *_ATTN_OUT),
            (
                ("D", 128),
                ("KB", 4),
                ("VB", 4),
                ("KGS", 64),
                ("VGS", 64),
                ("KCH", 0),
                ("G", 4),
                ("GT", 4),
                ("NT", 4),
                ("SCALE", 1035098454),
                ("FUSED", 1),
                ("MAX_SPLITS", 256),
                ("TAIL", 1),
                ("ROT", 0),
                ("CEN", 1),
                ("FIN", 1),
            ),
        ),
        KernelSpec(
            "pq_attn_partial",
            (
                ("q", "float32"),
                ("kcodes", "uint8"),
                ("kcent", "float32"),
                ("vcodes", "uint8"),
                ("vcent", "float32"),
                _P,
            ),
            _ATTN_OUT,
            (("D", 128), ("M", 16), ("KC", 256), ("G", 4), ("GT", 2)),
        ),
        KernelSpec(
            "attn_reduce",
            (("pm", "float32"), ("pl", "float32"), ("pacc", "float32"), _P),
            (("out", "float32"), ("lse", "float32")),
            (("D", 128),),
        ),
        KernelSpec("sign_dot_planes", (("q", "uint32"), ("k", "uint32"), _P), (("out", "int32"),)),
    )
}


@functools.cache
def read(name: str) -> str:
    """The text of ``sources/<name>``."""
    return resources.files("vq_kernels").joinpath("sources", name).read_text()


def header(backend: str) -> str:
    """Prelude for ``backend`` ("metal" or "cuda") followed by the shared helpers."""
    return read(BACKEND_FILES[backend]) + "\n" + read("common.h") + "\n"


def body(name: str, backend: str) -> str:
    """Body of kernel ``name``, led by the backend's thread-id definitions; a line
    ``// @include NAME.inc`` is replaced by that fragment (shared by several bodies)."""
    ids = read("ids_metal.body") if backend == "metal" else "  VQ_IDS\n"
    return ids + _expand(read(f"{name}.body"))


def compact(text: str) -> str:
    """``text`` without ``//`` comments (outside string literals) and without each line's
    leading and trailing blanks, one output line per input line (compiler messages keep
    their line numbers). What MLX is given: it hashes a custom kernel's whole source on
    every launch (``CustomKernel::eval_gpu`` in MLX 0.32), ~35 KB for ``codebook_attn``
    with its comments, so the source's size is host time on every decode step."""
    lines = []
    for line in text.split("\n"):
        quoted, cut = False, len(line)
        for i, ch in enumerate(line):
            if ch == '"' and (i == 0 or line[i - 1] != "\\"):
                quoted = not quoted
            elif not quoted and line.startswith("//", i):
                cut = i
                break
        lines.append(line[:cut].strip())
    return "\n".join(lines)


def _expand(text: str) -> str:
    lines = []
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words[:2] == ["//", "@include"] and len(words) == 3:
            lines.append(read(words[2]))
        else:
            lines.append(line)
    return "".join(lines)


_CUDA_TYPES = {
    "float32": "float",
    "float16": "__half",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int32": "int32_t",
    "bool": "bool",
}
_METAL_TYPES = {
    "float32": "float",
    "float16": "half",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int32": "int32_t",
    "bool": "bool",
}
_CUDA_SHAPE = (  # stands in for MLX's Shape (cuda::std::array<int32_t, 8>, passed by value)
    "struct VqShape {\n  int v[8];\n  __device__ int operator[](int i) const { return v[i]; }\n};\n"
)
_METAL_ATTRS = {
    "threadgroups_per_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "threadgroup_position_in_grid": "uint3",
    "thread_position_in_grid": "uint3",
}


def standin_source(spec: KernelSpec, backend: str) -> str:
    """A whole translation unit wrapping ``spec``'s body the way MLX does, for offline compilers.

    CUDA: MLX emits ``__global__ void name(const T* in..., T* out...)`` with the template ints as
    ``constexpr int`` at the top, and an input's shape (``name_shape``, 8 ints by value) after
    it when the body mentions it; Metal: a ``[[kernel]]`` function with ``[[buffer(i)]]``
    arguments (a shape as ``constant int*``) and the thread-position attributes the body
    mentions. Body and prelude are :func:`compact`, as MLX gets them.
    """
    consts = "".join(f"  constexpr int {n} = {v};\n" for n, v in spec.template)
    src = compact(body(spec.name, backend))
    shaped = {n for n, _ in spec.inputs if f"{n}_shape" in src}
    if backend == "cuda":
        args = []
        for n, t in spec.inputs:
            args.append(f"const {_CUDA_TYPES[t]}* {n}")
            if n in shaped:
                args.append(f"const __grid_constant__ VqShape {n}_shape")
        args += [f"{_CUDA_TYPES[t]}* {n}" for n, t in spec.outputs]
        sig = f'extern "C" __global__ void {spec.name}(\n    ' + ",\n    ".join(args) + ") {\n"
        return (
            "#include <cstdint>\n"
            + compact(header("cuda"))
            + _CUDA_SHAPE
            + sig
            + consts
            + src
            + "\n}\n"
        )
    args = []
    for n, t in spec.inputs:
        args.append(f"const device {_METAL_TYPES[t]}* {n} [[buffer({len(args)})]]")
        if n in shaped:
            args.append(f"const constant int* {n}_shape [[buffer({len(args)})]]")
    args += [
        f"device {_METAL_TYPES[t]}* {n} [[buffer({len(args) + i})]]"
        for i, (n, t) in enumerate(spec.outputs)
    ]
    args += [f"{t} {a} [[{a}]]" for a, t in _METAL_ATTRS.items() if a in src]
    sig = f"[[kernel]] void {spec.name}(\n    " + ",\n    ".join(args) + ") {\n"
    return compact(header("metal")) + sig + consts + src + "\n}\n"

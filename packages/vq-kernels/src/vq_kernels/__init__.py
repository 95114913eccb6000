"""vq-kernels: Metal and CUDA kernel sources for KV-cache codes, their JIT loader, and a
pure-MLX reference for every op.

Importing this package compiles nothing and touches no GPU: each op picks its backend on
call (``backend=`` argument, else ``$VQ_KERNELS_BACKEND``, else the GPU MLX was built for,
else ``"cpu"``: native CPU code for the ops in ``CPU_OPS``, the reference for the rest) and
compiles its kernel on first use. See :func:`compile_report`.
"""

from vq_kernels._attention import DecodeTail
from vq_kernels._backend import (
    BACKENDS,
    CPU_OPS,
    ENV_VAR,
    CompileRecord,
    KernelError,
    available_backend,
    compile_report,
    resolve_backend,
)
from vq_kernels.affine_attention import affine_decode_attention
from vq_kernels.affine_attention import format_supported as affine_format_supported
from vq_kernels.affine_attention import (
    kernel_format_supported as affine_kernel_format_supported,
)
from vq_kernels.codebook import (
    codebook_dequantize,
    codebook_dequantize_reference,
    codebook_quantize,
    codebook_quantize_reference,
)
from vq_kernels.codebook_attention import (
    KeyTerm,
    codebook_decode_attention,
    codebook_decode_attention_reference,
)
from vq_kernels.packing import (
    n_words,
    pack_bits,
    pack_bits_reference,
    unpack_bits,
    unpack_bits_reference,
)
from vq_kernels.pq_attention import pq_decode_attention, pq_decode_attention_reference
from vq_kernels.sign import (
    sign_dot_planes,
    sign_dot_planes_reference,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CPU_OPS",
    "ENV_VAR",
    "CompileRecord",
    "DecodeTail",
    "KernelError",
    "KeyTerm",
    "affine_decode_attention",
    "affine_format_supported",
    "affine_kernel_format_supported",
    "available_backend",
    "codebook_decode_attention",
    "codebook_decode_attention_reference",
    "codebook_dequantize",
    "codebook_dequantize_reference",
    "codebook_quantize",
    "codebook_quantize_reference",
    "compile_report",
    "n_words",
    "pack_bits",
    "pack_bits_reference",
    "pq_decode_attention",
    "pq_decode_attention_reference",
    "resolve_backend",
    "sign_dot_planes",
    "sign_dot_planes_reference",
    "unpack_bits",
    "unpack_bits_reference",
]

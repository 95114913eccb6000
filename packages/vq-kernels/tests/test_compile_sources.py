"""Offline compiler checks of every kernel source, wrapped as MLX wraps it.

CUDA: each body plus the CUDA prelude is compiled by ``nvcc`` for sm_90 inside a stand-in of
the signature MLX generates. Metal: each body plus the Metal prelude is syntax-checked as C++
(``g++``/``clang++ -fsyntax-only``) with a shim that spells Metal's keywords and builtins.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vq_kernels import _sources

SHIM = Path(__file__).with_name("metal_shim.h")
NAMES = sorted(_sources.SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_source_compiles_for_sm90(name: str, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    src = tmp_path / f"{name}.cu"
    src.write_text(_sources.standin_source(_sources.SPECS[name], "cuda"))
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", NAMES)
def test_metal_source_syntax(name: str, tmp_path: Path) -> None:
    cxx = shutil.which("clang++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no clang++ or g++ on PATH")
    text = _sources.standin_source(_sources.SPECS[name], "metal")
    assert "#include <metal_stdlib>" in text
    src = tmp_path / f"{name}.cpp"
    src.write_text(text.replace("#include <metal_stdlib>", f'#include "{SHIM}"'))
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-Wno-unknown-pragmas", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_compact_drops_comments_and_blanks_but_keeps_lines_and_strings() -> None:
    text = '  int a = 1;  // one\n// whole line\n  asm("x // y" : "=f"(z));\n#define M \\\n  2\n'
    out = _sources.compact(text)
    assert out == 'int a = 1;\n\nasm("x // y" : "=f"(z));\n#define M \\\n2\n'
    full = _sources.header("cuda") + _sources.body("codebook_attn", "cuda")
    small = _sources.compact(full)
    assert small.count("\n") == full.count("\n")  # compiler line numbers hold
    assert not any(line.startswith("//") or line != line.strip() for line in small.split("\n"))
    assert len(small) < 0.8 * len(full)

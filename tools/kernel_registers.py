"""Registers, spills and shared memory of vq-kernels' CUDA bodies, from ``nvcc -Xptxas -v``.

Each kernel is wrapped as MLX wraps it (see ``vq_kernels._sources.standin_source``) and
compiled for sm_90 with the template values given, so the report is the compiler's own for
that specialization (MLX compiles the same text through NVRTC, which may differ slightly).

    PYTHONPATH=packages/vq-kernels/src python tools/kernel_registers.py \
        codebook_attn:KB=4,VB=4,NT=4 codebook_attn:KB=2,VB=2,NT=8
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vq_kernels import _sources


def report(name: str, overrides: dict[str, int]) -> str:
    spec = _sources.SPECS[name]
    unknown = set(overrides) - {n for n, _ in spec.template}
    if unknown:
        raise SystemExit(f"{name} has no template parameter(s) {sorted(unknown)}")
    template = tuple((n, overrides.get(n, v)) for n, v in spec.template)
    spec = dataclasses.replace(spec, template=template)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.cu"
        src.write_text(_sources.standin_source(spec, "cuda"))
        cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-Xptxas", "-v", "-c", str(src)]
        cmd += ["-o", str(Path(tmp) / "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if re.search(r"registers|spill|stack", ln)]
    info = " | ".join(ln.split("info    : ")[-1].strip() for ln in lines)
    return f"{name} {dict(template)}: {info}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernels", nargs="*", help="name[:K=V,...]; default: every kernel")
    args = ap.parse_args()
    for item in args.kernels or sorted(_sources.SPECS):
        name, _, kv = item.partition(":")
        overrides = {k: int(v) for k, v in (p.split("=") for p in kv.split(",") if p)}
        print(report(name, overrides))


if __name__ == "__main__":
    main()

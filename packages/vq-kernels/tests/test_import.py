"""Importing vq_kernels pulls in no heavy neighbour and compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = """
import json, sys
import vq_kernels
from vq_kernels import _backend, _sources
print(json.dumps({
    "modules": sorted(m for m in ("mlx_lm", "vq_core", "vq_algorithms", "vq_calibrate",
                                  "vq_mlxlm", "numpy") if m in sys.modules),
    "kernel_objects": len(_backend._KERNEL_OBJECTS),
    "records": len(vq_kernels.compile_report()),
    "sources_read": _sources.read.cache_info().currsize,
}))
"""


def test_import_is_light_and_compiles_nothing() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"modules": [], "kernel_objects": 0, "records": 0, "sources_read": 0}

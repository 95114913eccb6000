import json
import subprocess
import sys

HEAVY = ["mlx_lm", "vq_calibrate", "vq_mlxlm", "numpy", "safetensors"]


def test_import_pulls_in_no_heavier_neighbour_and_compiles_nothing():
    code = (
        "import sys, json, vq_algorithms, vq_kernels; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in %r); "
        "compiled = getattr(vq_kernels, 'compile_report', lambda: {})(); "
        "print(json.dumps([heavy, len(compiled)]))"
    ) % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [[], 0]

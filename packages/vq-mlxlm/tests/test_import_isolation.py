import json
import subprocess
import sys


def test_import_pulls_in_no_calibration_code_and_compiles_nothing():
    code = (
        "import sys, json, vq_mlxlm, vq_kernels; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ['vq_calibrate', 'safetensors']); "
        "compiled = getattr(vq_kernels, 'compile_report', lambda: {})(); "
        "print(json.dumps([heavy, len(compiled)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], 0]

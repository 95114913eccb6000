import json
import subprocess
import sys


def test_import_pulls_in_no_model_runtime_and_compiles_nothing():
    code = (
        "import sys, json, vq_calibrate, vq_kernels; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ['mlx_lm', 'vq_mlxlm', "
        "'transformers']); "
        "print(json.dumps([heavy, len(vq_kernels.compile_report())]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], 0]

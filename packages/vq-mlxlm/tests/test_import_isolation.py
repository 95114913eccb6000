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


def test_import_has_no_side_effects():
    """No MLX, no BLAS loaded, no mlx-lm module rewritten: only names defined."""
    code = (
        "import sys, json\n"
        "import mlx_lm.models.base as base, mlx_lm.models.llama as llama\n"
        "before = llama.scaled_dot_product_attention\n"
        "mlx_loaded = 'mlx.core' in sys.modules\n"
        "import vq_mlxlm, vq_mlxlm.cli\n"
        "from vq_mlxlm import fast_blas\n"
        "print(json.dumps([fast_blas._chosen, llama.scaled_dot_product_attention is before,\n"
        "                  callable(vq_mlxlm.patch)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [None, True, True]
    code = "import sys, vq_mlxlm, vq_mlxlm.cli; print('mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

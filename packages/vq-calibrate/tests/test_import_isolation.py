import json
import subprocess
import sys


def test_import_pulls_in_no_model_runtime_no_methods_and_no_kernels():
    code = (
        "import sys, json, vq_calibrate; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ['mlx_lm', 'vq_mlxlm', "
        "'vq_algorithms', 'vq_kernels', 'transformers', 'safetensors']); "
        "print(json.dumps(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_names_that_moved_to_vq_mlxlm_say_where():
    import pytest

    import vq_calibrate

    with pytest.raises(ImportError, match=r"vq_mlxlm\.calibration\.calibrate"):
        from vq_calibrate import calibrate  # noqa: F401
    with pytest.raises(ImportError, match=r"vq_mlxlm\.calibration\.calibration_text"):
        vq_calibrate.calibration_text  # noqa: B018

import json
import subprocess
import sys

HEAVY = ["mlx_lm", "vq_kernels", "vq_algorithms", "vq_calibrate", "vq_mlxlm", "numpy"]


def test_import_pulls_in_no_heavier_neighbour():
    code = (
        "import sys, json, mlx.core as mx; import vq_core; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []

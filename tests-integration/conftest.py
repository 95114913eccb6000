import os
import sys
from pathlib import Path

from vq_mlxlm.fast_blas import enable_fast_blas

# Full float32 matmuls: MLX runs them at TF32-class precision by default on CUDA GPUs and on
# Apple M5 (MLX_ENABLE_TF32 defaults to 1; relative error ~3e-4 measured on an H200), and
# these tests compare fp32 paths to each other. MLX's own test harness pins the same flag.
os.environ["MLX_ENABLE_TF32"] = "0"

enable_fast_blas()  # explicit (importing vq_mlxlm does not); before anything imports mlx.core

sys.path.insert(0, str(Path(__file__).parent))

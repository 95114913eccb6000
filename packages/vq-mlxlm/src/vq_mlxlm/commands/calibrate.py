"""``vq calibrate``: train a calibrated method's artifact on a model and save it.

``vq calibrate --model default --method spectral --out artifacts/`` writes
``artifacts/spectral.safetensors``; ``--method ratequant --bits 2.5`` writes a per-layer bit
allocation over ``--base-method``; ``--method comm_vq`` trains RoPE-commuting codebooks by EM on
pre-RoPE keys (``--table-bits``, ``--head-samples``). Calibration text defaults to the first half of Python's
reference manual topics (:func:`vq_calibrate.calibration_text`); evaluation uses the other half.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def calibrate(args) -> int:
    try:
        from vq_calibrate import calibrate as run
    except ImportError as e:
        raise ImportError(
            "vq calibrate needs vq-calibrate: pip install 'vq-mlxlm[calibrate]'"
        ) from e
    text = Path(args.text).read_text() if args.text else None
    path = run(
        args.model,
        args.method,
        args.bits,
        text=text,
        out=args.out,
        progress=not args.quiet,
        n_sequences=args.sequences,
        seq_len=args.seq_len,
        base_method=args.base_method,
        seed=args.seed,
        table_bits=args.table_bits,
        head_samples=args.head_samples,
    )
    print(json.dumps({"method": args.method, "artifact": str(path)}), file=sys.stdout)
    return 0

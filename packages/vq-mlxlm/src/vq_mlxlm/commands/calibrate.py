"""``vq calibrate``: train a calibrated method's artifact on a model and save it.

``vq calibrate --model default --method spectral --out artifacts/`` writes
``artifacts/spectral.safetensors``; ``--method ratequant --bits 2.5`` writes a per-layer bit
allocation over ``--base-method``; ``--method comm_vq`` trains RoPE-commuting codebooks by EM
on pre-RoPE keys (``--table-bits``, ``--head-samples``). Calibration text defaults to the
first half of Python's reference manual topics (:func:`vq_mlxlm.calibration.calibration_text`);
evaluation uses the other half. Every flag is checked (widths the trainer can produce, the
output directory, the text) before the model loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vq_mlxlm.commands.flags import FlagError, check_input_file, check_model
from vq_mlxlm.commands.generate import load_checked

# vq_mlxlm.calibration.calibrate argument -> flag, where the names differ
_FLAGS = {"n_sequences": "--sequences"}


def _flag(err: Exception) -> str:
    """The flag behind a ``name=value is not allowed`` error of the calibration options."""
    name = str(err).split("=", 1)[0]
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def calibrate(args) -> int:
    from vq_core import ConfigError, UnknownMethodError
    from vq_mlxlm.calibration import calibrate as run
    from vq_mlxlm.calibration import check_model_options, check_options

    options = dict(
        n_sequences=args.sequences,
        seq_len=args.seq_len,
        base_method=args.base_method,
        seed=args.seed,
        table_bits=args.table_bits,
        head_samples=args.head_samples,
    )
    try:
        check_options(args.method, args.bits, out=args.out, **options)
    except UnknownMethodError as e:
        raise FlagError("--base-method", str(e)) from None
    except ConfigError as e:
        raise FlagError(_flag(e), str(e)) from None
    check_input_file("--text", args.text)
    try:
        text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    except UnicodeDecodeError as e:
        raise FlagError("--text", f"{args.text} is not UTF-8 text ({e.reason})") from None
    shape = check_model(args.model)
    try:
        check_model_options(args.method, args.bits, shape.layers, shape.head_dim, args.table_bits)
    except ConfigError as e:
        raise FlagError("--bits", str(e)) from None
    loaded = load_checked(args.model)
    path = run(loaded, args.method, args.bits, text=text, out=args.out,
               progress=not args.quiet, **options)  # fmt: skip
    print(json.dumps({"method": args.method, "artifact": str(path)}), file=sys.stdout)
    return 0

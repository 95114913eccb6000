"""``vq methods``: every registered method, its family, calibration need and bit options,
then the supported and refused mlx-lm architectures."""

from __future__ import annotations

import json

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import available, create, get

HEAD_DIM = 128


def method_table(head_dim: int = HEAD_DIM) -> list[dict]:
    rows = []
    for name in available():
        cls = get(name)
        # Bits per element follow from the config alone, so a calibrated method's untrained
        # neighbour gives its accounting.
        untrained = {"untrained": True} if cls.needs_calibration else {}
        bpe = {}
        for bits in cls.config_class.allowed_bits:
            try:
                quant = create(name, head_dim=head_dim, bits=bits, **untrained)
                bpe[bits] = round(quant.bits_per_element, 4)
            except ValueError:  # this width does not exist at this head_dim
                bpe[bits] = None
        rows.append(
            {
                "method": name,
                "family": cls.family,
                "needs_calibration": cls.needs_calibration,
                "bits": list(cls.config_class.allowed_bits),
                "bits_per_element": bpe,
                "values": cls.default_value_method or name,
            }
        )
    return rows


def methods(args) -> int:
    from vq_mlxlm.architectures import markdown_table

    rows = method_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'method':<16} {'family':<46} {'calib':<5} bits -> bits/element (head_dim {HEAD_DIM})")
    for r in rows:
        bpe = ", ".join(f"{b}->{v}" for b, v in r["bits_per_element"].items())
        calib = "yes" if r["needs_calibration"] else "no"
        print(f"{r['method']:<16} {r['family']:<46} {calib:<5} {bpe}")
    print("\narchitectures (vq_mlxlm.architectures; each model type is tested):")
    print(markdown_table())
    return 0

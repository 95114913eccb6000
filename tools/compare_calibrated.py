"""Calibrated methods against their zero-calibration neighbours on held-out text.

    uv run python tools/compare_calibrated.py --artifacts DIR [--sequences 4] [--json]

Evaluation text is :func:`vq_calibrate.evaluation_text` (the second half of Python's
reference topics; calibration used the first half). Each sequence of ``--seq-len`` tokens is
fed as a ``--prefix`` chunk and then ``--chunk``-token chunks, so every evaluated position
attends over compressed history. Rows: perplexity of the evaluated positions, KL divergence
and top-1 agreement against the fp16 cache, and the key/value bits per element.
"""

# ruff: noqa: I001  (vq_mlxlm must load a fast BLAS before mlx.core is imported)
from __future__ import annotations

import argparse
import json
import math
import time

import vq_mlxlm  # noqa: F401
import mlx.core as mx

from vq_calibrate import evaluation_text, load_allocation
from vq_calibrate.capture import fresh_caches
from vq_calibrate.ratequant import chunked_logits
from vq_calibrate.text import token_sequences
from vq_core import CompressedKVCache, VQError, create
from vq_mlxlm.default_model import load_model
from vq_mlxlm.patch import _head_dim
from vq_mlxlm.routing import route


def builder(method: str, bits, artifact: str | None = None):
    """Per-layer caches: ``method`` for keys and values, ``bits`` an int or a per-layer list."""

    def build(model):
        caches = fresh_caches(model)
        for i, layer in enumerate(model.layers):
            b = bits[i] if isinstance(bits, list) else bits
            ka = {"artifact": artifact, "layer": i, "kind": "k"} if artifact else {}
            va = {**ka, "kind": "v"} if artifact else {}
            d = _head_dim(model, layer)
            k = create(method, head_dim=d, bits=b, seed=1000 * i, **ka)
            v = create(method, head_dim=d, bits=b, seed=1000 * i + 1, **va)
            caches[i] = CompressedKVCache(k, v)
        per_layer = [(c.key_quantizer.bits_per_element + c.value_quantizer.bits_per_element) / 2
                     for c in caches]  # fmt: skip
        return caches, sum(per_layer) / len(per_layer)

    return build


def evaluate(model, seqs, build, refs, prefix, chunk):
    nll, kl, agree, n = 0.0, 0.0, 0.0, 0
    bpe = 16.0
    for seq, ref in zip(seqs, refs, strict=True):
        if build is None:
            caches = fresh_caches(model)
        else:
            caches, bpe = build(model)
        logits = chunked_logits(model, seq, caches, prefix, chunk)[:-1]
        targets = mx.array(seq[prefix + 1 :])
        lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = ref[:-1] - mx.logsumexp(ref[:-1], axis=-1, keepdims=True)
        nll += -mx.take_along_axis(lq, targets[:, None], axis=-1).sum().item()
        kl += (mx.exp(lp) * (lp - lq)).sum().item()
        agree += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
        n += len(targets)
    return {"ppl": math.exp(nll / n), "kl": kl / n, "top1": agree / n, "bpe": bpe}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    route()
    model, tok = load_model("default")
    seqs = token_sequences(tok.encode(evaluation_text()), a.sequences, a.seq_len)
    refs = [model(mx.array([s]), cache=fresh_caches(model))[0, a.prefix :].astype(mx.float32)
            for s in seqs]  # fmt: skip
    b, art = a.bits, a.artifacts
    rows = [
        ("fp16", None),
        (f"turboquant_mse b={b}", builder("turboquant_mse", b)),
        (f"spectral b={b} (calibrated)", builder("spectral", b, art)),
        (f"spectral b={b} (untrained)", builder("spectral", b)),
        (f"turboquant_rvq b={b}", builder("turboquant_rvq", b)),
        (f"vecinfer b={b} (calibrated)", builder("vecinfer", b, art)),
        (f"vecinfer b={b} (untrained)", builder("vecinfer", b)),
    ]
    try:
        alloc = load_allocation(art)
        n = len(alloc)
        uniform = [3 if i < sum(alloc) - 2 * n else 2 for i in range(n)]
        mean = sum(alloc) / n
        rows += [
            (f"turboquant_mse uniform mean {mean} {uniform}", builder("turboquant_mse", uniform)),
            (f"turboquant_mse ratequant mean {mean} {alloc}", builder("turboquant_mse", alloc)),
        ]
    except Exception as e:  # no ratequant artifact
        print(f"ratequant skipped: {e}")
    out = []
    for name, build in rows:
        t = time.time()
        try:
            r = evaluate(model, seqs, build, refs, a.prefix, a.chunk)
        except VQError as e:  # e.g. an artifact not calibrated yet
            print(f"{name}: skipped ({e})", flush=True)
            continue
        r |= {"config": name, "seconds": round(time.time() - t, 1)}
        out.append(r)
        print(json.dumps(r) if a.json else
              f"{name:60s} bpe {r['bpe']:.3f}  ppl {r['ppl']:.3f}  kl {r['kl']:.4f}  "
              f"top1 {r['top1']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

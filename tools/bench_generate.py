"""Prefill and decode tokens/s and peak memory with the exact cache and vq caches, side by
side (not a test).

    uv run python tools/bench_generate.py [--model default] [--prompt-tokens 4096 8192]
        [--configs turboquant_mse:4 rabitq:4] [--max-tokens 32]

A config ``method:bits+nocompile`` decodes with mlx-lm's forward on every step instead of
``vq_mlxlm.compiled_decode``'s compiled steps (an A/B in one run).

The prompt is real English text (the Python reference manual that ships with Python,
``pydoc_data.topics``); mlx-lm's ``stream_generate`` prefills it in 2,048-token chunks and
decodes ``--max-tokens`` tokens. Every configuration runs on the same tokens in the same
process; the exact cache runs first twice (the first run warms up) and its second figures
are the baseline every ratio divides by. ``peak`` is ``mx.get_peak_memory()`` over the
memory held before the run (``mx.reset_peak_memory()`` first), in MiB.
"""

# ruff: noqa: I001, E402  (a fast BLAS must be loaded before mlx.core is imported)
from __future__ import annotations

import argparse
import platform

import vq_mlxlm

vq_mlxlm.enable_fast_blas()  # before mlx.core is imported (MLX's Linux CPU backend)

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from pydoc_data.topics import topics

from vq_mlxlm.default_model import load_model


def run(model, tokenizer, prompt: list[int], max_tokens: int):
    """(prefill tok/s, decode tok/s, peak MiB over what was held before)."""
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    last = None
    for resp in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache
    ):
        last = resp
    peak = (mx.get_peak_memory() - held) / 2**20
    return last.prompt_tps, last.generation_tps, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4", "rabitq:4"])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    blas = vq_mlxlm.enable_fast_blas()
    print(
        f"machine: {platform.machine()} {platform.system()}, MLX {mx.__version__}, "
        f"device {mx.default_device()}, BLAS: {blas}"
    )
    model, tokenizer = load_model(args.model)
    ids = tokenizer.encode(" ".join(topics[k] for k in sorted(topics)))
    print(
        f"{'prompt':>7} {'cache':<24} {'prefill tok/s':>13} {'ratio':>6} "
        f"{'decode tok/s':>12} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}"
    )
    for n in args.prompt_tokens:

        def line(label, p, d, peak, base, n=n):
            bp, bd, bpeak = base
            print(
                f"{n:>7} {label:<24} {p:>13.1f} {p / bp:>6.2f} {d:>12.2f} {d / bd:>6.2f} "
                f"{peak:>9.0f} {peak / bpeak:>6.2f}",
                flush=True,
            )

        vq_mlxlm.unpatch(model)
        first = run(model, tokenizer, ids[:n], args.max_tokens)
        base = run(model, tokenizer, ids[:n], args.max_tokens)
        line("exact (1st, warm-up)", *first, base)
        line("exact (baseline)", *base, base)
        for cfg in args.configs:
            spec, _, variant = cfg.partition("+")
            if variant not in ("", "nocompile"):
                raise SystemExit(
                    f"unknown config variant {variant!r} in {cfg!r} (known: nocompile)"
                )
            method, bits = spec.split(":")
            vq_mlxlm.patch(model, method, int(bits), compiled_decode=variant != "nocompile")
            line(cfg, *run(model, tokenizer, ids[:n], args.max_tokens), base)
            vq_mlxlm.unpatch(model)


if __name__ == "__main__":
    main()

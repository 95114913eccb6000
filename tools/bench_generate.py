"""Prefill and decode tokens/s with the exact cache and vq caches, side by side (not a test).

    uv run python tools/bench_generate.py [--model default] [--prompt-tokens 1024 4096]
        [--configs turboquant_mse:4 turboquant_mse:3] [--max-tokens 32]

The prompt is real English text (the Python reference manual that ships with Python,
``pydoc_data.topics``); every configuration runs on the same tokens in the same process, and
the ratio column divides by the exact cache's figure from the same run.
"""

# ruff: noqa: I001  (vq_mlxlm must load a fast BLAS before mlx.core is imported)
from __future__ import annotations

import argparse
import platform

import vq_mlxlm
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from pydoc_data.topics import topics

from vq_mlxlm.default_model import load_model


def run(model, tokenizer, prompt: list[int], max_tokens: int):
    cache = make_prompt_cache(model)
    last = None
    for resp in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache
    ):
        last = resp
    return last.prompt_tps, last.generation_tps, sum(c.nbytes for c in cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--configs", nargs="+", default=["turboquant_mse:4", "turboquant_mse:3"])
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
        f"{'prompt':>7} {'cache':<22} {'prefill tok/s':>13} {'ratio':>6} "
        f"{'decode tok/s':>12} {'ratio':>6}"
    )
    for n in args.prompt_tokens:
        vq_mlxlm.unpatch(model)
        base_p, base_d, _ = run(model, tokenizer, ids[:n], args.max_tokens)
        print(
            f"{n:>7} {'exact (mlx-lm KVCache)':<22} {base_p:>13.1f} {1:>6.2f} {base_d:>12.1f} "
            f"{1:>6.2f}"
        )
        for cfg in args.configs:
            method, bits = cfg.split(":")
            vq_mlxlm.patch(model, method, int(bits))
            p, d, _ = run(model, tokenizer, ids[:n], args.max_tokens)
            print(
                f"{n:>7} {cfg:<22} {p:>13.1f} {p / base_p:>6.2f} {d:>12.1f} {d / base_d:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

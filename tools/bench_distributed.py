"""Compressed caches under mlx-lm's distributed inference: per-rank KV bytes, decode tok/s
and greedy-token agreement with one process (not a test).

Run it under ``vq launch`` (``mlx.launch`` with an exit status), the same on every rank:

    # CPU, loopback ring (the default model: 9 query / 3 KV heads, 30 layers)
    uv run vq launch --backend ring -n 3 -- python tools/bench_distributed.py \\
        --model default --parallel tensor --contexts 4096 16384 --budget-gib 0.05
    # 2 GPUs, NCCL, the Llama-3-8B shape of tools/bench_model_decode.py (random 4-bit weights)
    uv run vq launch --backend nccl -n 2 -- python tools/bench_distributed.py \\
        --model llama3-8b --parallel tensor --contexts 32768 131072 --budget-gib 16 \\
        --json gpu2.json

and once with ``-n 1`` (or plain ``python``) for the one-process figures. Every line prints
as soon as it is measured; a watchdog (``--rank-timeout``) stops a rank whose peers stop
answering. Per config (``exact`` = mlx-lm's own ``KVCache`` in the model's dtype: float16
on a GPU, float32 on the CPU; or ``method:bits``):

* agreement: ``--agree-tokens`` greedy tokens after a ``--agree-prompt``-token random prompt,
  sharded, against the same config on rank 0's own unsharded copy of the model (rank 0 holds
  the model twice for this; ``--agree-tokens 0`` skips it);
* per context: caches filled with random keys/values (``update_and_fetch`` in 4,096-token
  chunks; each rank its own heads/layers), every rank's ``nbytes``, then ``--steps`` timed
  decode steps (rank 0's clock; the ranks step in lockstep);
* with ``--budget-gib``: the longest context whose cache fits that many GiB per rank, from the
  measured bytes (the slope between the two largest contexts, or bytes/token with one).
"""

# ruff: noqa: E402  (vq_mlxlm must load a fast BLAS before mlx.core is imported)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import vq_mlxlm

vq_mlxlm.enable_fast_blas()  # before mlx.core is imported (MLX's Linux CPU backend)
import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from bench_model_decode import build, decode_tps, fill

from vq_mlxlm import distributed
from vq_mlxlm.distributed import layout
from vq_mlxlm.model_shape import layer_head_dim

GIB = 1024**3


def load(name: str, layers: int, hidden: int):
    if name == "llama3-8b":
        mx.random.seed(0)  # the same random weights in every process
        return build(layers, hidden)[0]
    from vq_mlxlm.default_model import load_model

    return load_model(name)[0]


def configure(model, cfg: str):
    vq_mlxlm.unpatch(model)
    if cfg != "exact":
        method, bits = cfg.split(":")
        vq_mlxlm.patch(model, method, int(bits))
    return model


def greedy(model, prompt: mx.array, n: int) -> list[int]:
    cache = make_prompt_cache(model)
    out = [t for t, _ in generate_step(prompt, model, prompt_cache=cache, max_tokens=n)]
    mx.synchronize(generation_stream)  # its last, unused step's collectives finish here
    return out


def gather(group, values: list[int]) -> list[list[int]]:
    mx.synchronize()
    mine = mx.array([values], dtype=mx.int64)
    return mx.distributed.all_gather(mine, group=group, stream=mx.cpu).tolist()


def fits(budget: float, points: list[tuple[int, int]]) -> int:
    """Longest context whose per-rank bytes stay within ``budget`` (linear in tokens)."""
    (n0, b0), (n1, b1) = (points[-2], points[-1]) if len(points) > 1 else ((0, 0), points[-1])
    per_token = (b1 - b0) / (n1 - n0)
    return int(n1 + (budget - b1) / per_token) if per_token > 0 else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default', a .gguf/dir, or llama3-8b")
    ap.add_argument("--parallel", default="tensor", choices=distributed.PARALLEL)
    ap.add_argument("--tensor-size", type=int, default=2)
    ap.add_argument("--configs", nargs="+",
                    default=["exact", "turboquant_mse:4", "turboquant_mse:2"])  # fmt: skip
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--agree-tokens", type=int, default=16)
    ap.add_argument("--agree-prompt", type=int, default=256)
    ap.add_argument("--budget-gib", type=float, default=None, help="per-rank KV budget")
    ap.add_argument("--layers", type=int, default=32, help="llama3-8b: fewer for a smoke test")
    ap.add_argument("--hidden", type=int, default=4096, help="llama3-8b: smaller for a smoke test")
    ap.add_argument("--rank-timeout", type=float, default=600.0)
    ap.add_argument("--json", default=None, help="rank 0 writes every cell here")
    args = ap.parse_args()

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    lead = rank == 0

    def say(text: str) -> None:
        if lead:
            print(text, flush=True)

    cells: list[dict] = []

    def record(**cell) -> None:
        cells.append(cell)
        if lead and args.json:
            meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "ranks": size,
                    "parallel": args.parallel, "model": args.model}  # fmt: skip
            Path(args.json).write_text(json.dumps({**meta, "cells": cells}, indent=1))

    model = load(args.model, args.layers, args.hidden)
    if size > 1:
        model = distributed.shard(model, group, args.parallel, tensor_size=args.tensor_size)
    spread = layout(model)
    dtype = (
        model.model.embed_tokens.scales.dtype
        if hasattr(model.model.embed_tokens, "scales")
        else model.model.embed_tokens.weight.dtype
    )
    say(f"device {mx.default_device()}, MLX {mx.__version__}, {size} rank(s), "
        f"{args.parallel}: rank 0 holds {spread.describe()}; exact cache in {dtype}")  # fmt: skip
    reference = load(args.model, args.layers, args.hidden) if lead and size > 1 else None
    head_dim = layer_head_dim(model, model.layers[0])
    mx.random.seed(1)
    prompt = mx.random.randint(0, model.args.vocab_size, (args.agree_prompt,))

    with distributed.Watchdog(args.rank_timeout, rank, "bench_distributed") as dog:
        for cfg in args.configs:
            dog.beat(f"{cfg}: agreement")
            configure(model, cfg)
            if args.agree_tokens:
                got = greedy(model, prompt, args.agree_tokens)
                if reference is not None:
                    want = greedy(configure(reference, cfg), prompt, args.agree_tokens)
                    same = sum(a == b for a, b in zip(got, want, strict=True))
                    first = next(
                        (i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None
                    )
                    say(f"agree  {cfg:<18} {same}/{len(want)} greedy tokens equal to one "
                        f"process (first difference: {first})")  # fmt: skip
                    record(kind="agreement", cache=cfg, equal=same, tokens=len(want),
                           first_difference=first, sharded=got, single=want)  # fmt: skip
                else:
                    record(kind="tokens", cache=cfg, tokens=got)
                    say(f"tokens {cfg:<18} {got}")
            points = []
            for n in args.contexts:
                dog.beat(f"{cfg}: decode at {n} tokens")
                cache = make_prompt_cache(model)
                fill(cache, n, spread.local_kv_heads, head_dim, dtype)
                per_rank = [row[0] for row in gather(group, [sum(c.nbytes for c in cache)])]
                tps = decode_tps(model, cache, args.steps)
                points.append((n, max(per_rank)))
                say(f"decode {cfg:<18} {n:>7} tokens  {tps:8.2f} tok/s  KV per rank "
                    f"{[round(b / 2**20, 2) for b in per_rank]} MiB (total "
                    f"{sum(per_rank) / 2**20:.2f} MiB)")  # fmt: skip
                record(kind="decode", cache=cfg, context=n, tok_s=tps, kv_bytes=per_rank)
                del cache
                mx.clear_cache()
            if args.budget_gib and points:
                longest = fits(args.budget_gib * GIB, points)
                say(f"budget {cfg:<18} {args.budget_gib:g} GiB per rank holds {longest:,} tokens")
                record(kind="budget", cache=cfg, budget_gib=args.budget_gib, tokens=longest)
        gather(group, [0])  # every rank ends together
    configure(model, "exact")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    if mx.distributed.init().rank() == 0:
        print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)

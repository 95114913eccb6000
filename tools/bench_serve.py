"""Concurrent sessions through mlx-lm's BatchGenerator: mlx-lm's fp16 batch cache against vq
caches, side by side in one run (not a test).

For each cache config and each ``--concurrency`` c, c sessions with ``--prompt``-token random
prompts are inserted at once and each generates ``--gen`` tokens (no stop tokens, greedy).
Printed per cell as it finishes:

* ``gen tok/s``: aggregate generation throughput, mlx-lm's own counters
  (``BatchGenerator.stats()``: generated tokens / time in decode steps);
* ``TTFT``: seconds from the insert to each session's first generated token (mean, max);
* ``KV/session``: the largest ``prompt_cache_nbytes`` seen (bytes every cache really holds,
  padding and step capacity included) divided by c, and bytes per held token at that point.

Then, per config, one ``--session``-token session's cache is filled with random keys/values
(``update_and_fetch``) and its ``nbytes`` measured: how many such sessions fit in
``--budget-gib`` of KV memory, and the ratio to fp16's count.

Models: ``--model default`` (the embedded SmolLM2-135M, the CPU run) or ``--model llama3-8b``
(tools/bench_model_decode.py's random-weight Llama-3-8B shape, the GPU run).

    python tools/bench_serve.py --model default --concurrency 1 4 8 16 --prompt 2048
    python tools/bench_serve.py --model llama3-8b --concurrency 1 4 8 16 --prompt 2048 \\
        --budget-gib 64 --json serve.json
"""

# ruff: noqa: I001  (vq_mlxlm must load a fast BLAS before mlx.core is imported)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import vq_mlxlm
import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from bench_model_decode import build, fill

GIB = 1024**3


def load(name: str, layers: int, hidden: int):
    if name == "default":
        from vq_mlxlm.default_model import load_default_model

        return load_default_model()[0]
    if name == "llama3-8b":
        return build(layers, hidden)[0]
    raise SystemExit(f"--model {name!r} is not allowed; expected default or llama3-8b")


def configure(model, cfg: str):
    vq_mlxlm.unpatch(model)
    if cfg != "fp16":
        method, bits = cfg.split(":")
        vq_mlxlm.patch(model, method, int(bits))
    return model


def held_tokens(gen: BatchGenerator) -> int:
    """Tokens the running sessions hold (the first layer's per-row counts)."""
    total = 0
    for batch in (gen._prompt_batch, gen._generation_batch):
        if batch.prompt_cache:
            c = batch.prompt_cache[0]
            lengths = c.lengths() if hasattr(c, "lengths") else c.offset.tolist()
            total += sum(max(n, 0) for n in lengths)
    return total


def serve_cell(model, c: int, prompt: int, gen_tokens: int, timeout: float) -> dict:
    vocab = model.args.vocab_size
    prompts = mx.random.randint(0, vocab, (c, prompt)).tolist()
    gen = BatchGenerator(
        model,
        max_tokens=gen_tokens,
        completion_batch_size=max(c, 1),
        prefill_batch_size=min(c, 8),
    )
    t0 = time.perf_counter()
    uids = gen.insert(prompts)
    first: dict[int, float] = {}
    peak = (0, 0)
    done = 0
    with gen.stats() as stats:
        while done < c:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"cell ran past {timeout:.0f} s")
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                first.setdefault(r.uid, now - t0)
                done += r.finish_reason is not None
            held = gen.prompt_cache_nbytes
            if held > peak[0]:
                peak = (held, held_tokens(gen))
    gen.close()
    ttft = [first[u] for u in uids]
    return {
        "gen_tps": stats.generation_tokens / max(stats.decode_time, 1e-9),
        "ttft_mean": sum(ttft) / c,
        "ttft_max": max(ttft),
        "kv_per_session": peak[0] / c,
        "bytes_per_token": peak[0] / max(peak[1], 1),
    }


def session_bytes(model, tokens: int, dtype=None) -> int:
    """Measured ``nbytes`` of one ``tokens``-token session's caches (random keys/values in
    ``dtype``, default the model's)."""
    cache = make_prompt_cache(model)
    args = model.args
    kv = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = dtype or model.layers[0].input_layernorm.weight.dtype
    fill(cache, tokens, kv, head_dim, dtype)
    return sum(c.nbytes for c in cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default | llama3-8b")
    ap.add_argument("--layers", type=int, default=32, help="llama3-8b: fewer for a smoke test")
    ap.add_argument("--hidden", type=int, default=4096, help="llama3-8b: smaller for a smoke test")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens per session")
    ap.add_argument("--gen", type=int, default=64, help="tokens each session generates")
    ap.add_argument(
        "--configs", nargs="+", default=["fp16", "turboquant_mse:4", "turboquant_mse:2"]
    )
    ap.add_argument("--session", type=int, default=8192, help="session length for the fit count")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="KV memory for the fit count")
    ap.add_argument(
        "--fit-dtype",
        choices=["float16", "bfloat16", "float32"],
        help="keys/values dtype of the fit count's session (default: the model's; float16 on "
        "the CPU measures what a GPU's fp16 model would hold)",
    )
    ap.add_argument("--cell-timeout", type=float, default=900.0, help="seconds per cell")
    ap.add_argument("--json", help="write every cell here (after each one)")
    args = ap.parse_args()
    model = load(args.model, args.layers, args.hidden)
    print(f"device {mx.default_device()}, MLX {mx.__version__}, model {args.model}", flush=True)
    print(f"{args.prompt}-token prompts, {args.gen} generated tokens per session", flush=True)
    cells = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                meta = {"device": str(mx.default_device()), "mlx": mx.__version__}
                json.dump({**meta, "args": vars(args), "cells": cells}, f, indent=1)

    for cfg in args.configs:
        configure(model, cfg)
        if args.concurrency:
            serve_cell(model, 1, min(args.prompt, 64), 4, args.cell_timeout)  # warm-up
        for c in args.concurrency:
            try:
                cell = serve_cell(model, c, args.prompt, args.gen, args.cell_timeout)
            except TimeoutError as e:
                print(f"serve {cfg:<18} c={c:<3} {e}", flush=True)
                continue
            base = next((x for x in cells if x["kind"] == "serve" and x["cache"] == "fp16"
                         and x["concurrency"] == c), None)  # fmt: skip
            base = cell if cfg == "fp16" else base
            ratio = cell["gen_tps"] / base["gen_tps"] if base else float("nan")
            cells.append({"kind": "serve", "cache": cfg, "concurrency": c, **cell, "ratio": ratio})
            save()
            print(
                f"serve {cfg:<18} c={c:<3} gen {cell['gen_tps']:9.1f} tok/s ({ratio:4.2f}x fp16)  "
                f"TTFT {cell['ttft_mean']:7.2f} s (max {cell['ttft_max']:7.2f})  "
                f"KV/session {cell['kv_per_session'] / 2**20:8.2f} MiB "
                f"({cell['bytes_per_token']:,.0f} B/token)",
                flush=True,
            )
            mx.clear_cache()
        fit_dtype = getattr(mx, args.fit_dtype) if args.fit_dtype else None
        held = session_bytes(model, args.session, fit_dtype)
        fits = int(args.budget_gib * GIB // held)
        base = next((x for x in cells if x["kind"] == "fit" and x["cache"] == "fp16"), None)
        ratio = 1.0 if cfg == "fp16" else (fits / base["sessions"] if base else float("nan"))
        cells.append({"kind": "fit", "cache": cfg, "session_bytes": held, "sessions": fits,
                      "ratio": ratio, "session_tokens": args.session})  # fmt: skip
        save()
        print(
            f"fit   {cfg:<18} {model.args.num_hidden_layers} layers, one {args.session}-token session {held / 2**20:9.2f} MiB "
            f"({held / args.session:,.0f} B/token): {fits} sessions in {args.budget_gib:g} GiB "
            f"({ratio:4.2f}x fp16)",
            flush=True,
        )
        mx.clear_cache()
    configure(model, "fp16")


if __name__ == "__main__":
    main()

"""``vq generate``: text from a model whose KV cache is compressed, with measured bytes."""

from __future__ import annotations

import json
import sys
import time

from vq_mlxlm.commands.flags import FlagError, cache_options, check_cache_flags
from vq_mlxlm.model_shape import model_kv_shape


def load_checked(model: str):
    """``load_model(model)``; a model that cannot be read is a FlagError naming ``--model``."""
    from vq_mlxlm.default_model import load_model

    try:
        return load_model(model)
    except (RuntimeError, FileNotFoundError) as e:
        raise FlagError("--model", f"{model} cannot be loaded ({e})") from None


def load_patched(args):
    """Check the cache flags (FlagError before anything loads), load ``args.model`` and
    patch it; prints progress to stderr."""
    from vq_mlxlm.patch import patch

    check_cache_flags(args)
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_checked(args.model)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    patch(model, args.method, args.bits, **cache_options(args))
    return model, tokenizer


def format_prompt(tokenizer, prompt: str, raw: bool = False) -> str:
    if raw or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate(args) -> int:
    if not args.prompt:
        raise FlagError("--prompt", "is empty")
    model, tokenizer = load_patched(args)
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    from vq_core import CompressedKVCache

    cache = make_prompt_cache(model)
    text, last = [], None
    for resp in stream_generate(
        model,
        tokenizer,
        format_prompt(tokenizer, args.prompt, args.no_chat_template),
        max_tokens=args.max_tokens,
        prompt_cache=cache,
    ):
        text.append(resp.text)
        if not args.json:
            print(resp.text, end="", flush=True)
        last = resp
    shape = model_kv_shape(model)
    tokens = max(c.offset for c in cache)
    cache_bytes = sum(c.nbytes for c in cache)
    used = sum(c.used_nbytes if isinstance(c, CompressedKVCache) else c.nbytes for c in cache)
    fp16 = sum(2 * c.offset * shape.kv_heads * shape.head_dim * 2 for c in cache)
    ratio = fp16 / used if used else float("nan")
    result = {
        "text": "".join(text),
        "prompt_tokens": last.prompt_tokens,
        "generated_tokens": last.generation_tokens,
        "cache_tokens": tokens,
        "cache_bytes": cache_bytes,
        "used_cache_bytes": used,
        "fp16_cache_bytes": fp16,
        "ratio": round(ratio, 3),
        "compressed_layers": sum(isinstance(c, CompressedKVCache) for c in cache),
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "method": args.method,
        "bits": args.bits,
        "value_method": cache[0].value_quantizer.method
        if isinstance(cache[0], CompressedKVCache)
        else None,
        "value_bits": args.value_bits or args.bits,
        "window": args.window,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print()
        if ratio >= 1:
            size = f"{ratio:.2f}x smaller"
        else:  # a short context: most of its tokens are still in the exact partial block
            block = max(getattr(c, "block", 1) for c in cache)
            size = (
                f"{1 / ratio:.2f}x larger: up to {block - 1} newest tokens per layer stay exact, "
                f"in the model's activation dtype, until their {block}-token block is encoded"
            )
        print(
            f"[vq] cache: {used:,} bytes of codes for {tokens} tokens vs fp16 {fp16:,} bytes "
            f"({size}; {cache_bytes:,} bytes allocated in 256-token steps) | "
            f"{args.method} {args.bits}-bit keys, {result['value_method']} "
            f"{result['value_bits']}-bit values"
        )
        print(
            f"[vq] prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
            f"generation {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s"
        )
    return 0

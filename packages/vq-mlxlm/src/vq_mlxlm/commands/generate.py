"""``vq generate``: text from a model whose KV cache is compressed, with measured bytes."""

from __future__ import annotations

import json
import sys
import time

from vq_mlxlm.commands.flags import FlagError, bits_label, cache_options, check_cache_flags
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
    from vq_mlxlm.cache_memory import cache_memory

    mem = cache_memory(cache, model_kv_shape(model).kv_heads)
    tokens, ratio = mem.tokens, mem.ratio
    used = mem.compressed_used_bytes + mem.exact_kv_bytes + mem.state_bytes
    cache_bytes = mem.compressed_bytes + mem.exact_kv_bytes + mem.state_bytes
    first = next((c for c in cache if isinstance(c, CompressedKVCache)), None)
    result = {
        "text": "".join(text),
        "prompt_tokens": last.prompt_tokens,
        "generated_tokens": last.generation_tokens,
        "cache_tokens": tokens,
        "cache_bytes": cache_bytes,
        "used_cache_bytes": used,
        "fp16_cache_bytes": mem.fp16_bytes,
        "compressed_used_bytes": mem.compressed_used_bytes,
        "ratio": round(ratio, 3),
        "layers": mem.layers,
        "compressed_layers": mem.compressed_layers,
        "exact_kv_layers": mem.exact_kv_layers,
        "exact_kv_bytes": mem.exact_kv_bytes,
        "state_layers": mem.state_layers,
        "state_bytes": mem.state_bytes,
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "method": args.method,
        "bits": args.bits,
        "value_method": first.value_quantizer.method if first is not None else None,
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
            f"[vq] cache: {mem.compressed_used_bytes:,} bytes of codes for {tokens} tokens in "
            f"{mem.compressed_layers} of {mem.layers} layers vs fp16 {mem.fp16_bytes:,} bytes "
            f"({size}; {mem.compressed_bytes:,} bytes allocated in 256-token steps) | "
            f"{args.method} {bits_label(args.bits)}-bit keys, {result['value_method']} "
            f"{bits_label(result['value_bits'])}-bit values"
        )
        if mem.untouched():
            print(f"[vq] not compressed: {mem.untouched()}")
        print(
            f"[vq] prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
            f"generation {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s"
        )
    return 0

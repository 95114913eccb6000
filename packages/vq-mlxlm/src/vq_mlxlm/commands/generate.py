"""``vq generate``: text from a model whose KV cache is compressed, with measured bytes."""

from __future__ import annotations

import json
import sys
import time

from vq_mlxlm.commands.flags import FlagError, cache_options, check_cache_flags


def load_checked(model: str):
    """``load_model(model)``; a model that cannot be read is a FlagError naming ``--model``."""
    from vq_mlxlm.default_model import load_model

    try:
        return load_model(model)
    except (RuntimeError, FileNotFoundError) as e:
        raise FlagError("--model", f"{model} cannot be loaded ({e})") from None


def load_patched(args, ranks=None):
    """Check the cache flags (FlagError before anything loads), load ``args.model``, shard
    it over ``ranks`` (a :class:`~vq_mlxlm.commands.ranks.Ranks`, under ``vq launch``) and
    patch it; prints progress to stderr (rank 0 only)."""
    from vq_mlxlm.patch import patch

    say = ranks.say if ranks is not None else _say
    check_cache_flags(args)
    t0 = time.perf_counter()
    say(f"loading {args.model} ...")
    model, tokenizer = load_checked(args.model)
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    if ranks is not None:
        model = ranks.shard(model)
    patch(model, args.method, args.bits, **cache_options(args))
    return model, tokenizer


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def format_prompt(tokenizer, prompt: str, raw: bool = False) -> str:
    if raw or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate(args) -> int:
    from contextlib import nullcontext

    from vq_mlxlm.commands.generate_report import measure, print_report, report
    from vq_mlxlm.commands.ranks import join

    if not args.prompt:
        raise FlagError("--prompt", "is empty")
    ranks = join(args, "vq generate")
    model, tokenizer = load_patched(args, ranks)
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    prompt = format_prompt(tokenizer, args.prompt, args.no_chat_template)
    show = ranks is None or ranks.leader
    cache = make_prompt_cache(model)
    text, tokens, last = [], [], None
    with ranks.watching() if ranks is not None else nullcontext():
        progress = None
        if ranks is not None:
            ranks.check(model, {"prompt": prompt, "max tokens": args.max_tokens})

            def progress(done, total):
                ranks.beat(f"prefilling the prompt ({done}/{total} tokens done)")

        run = stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            prompt_cache=cache,
            prompt_progress_callback=progress,
        )
        if ranks is not None:
            run = _guarded(ranks, run)
        for resp in run:
            text.append(resp.text)
            tokens.append(resp.token)
            if show and not args.json:
                print(resp.text, end="", flush=True)
            last = resp
        mine = measure(model, cache)
        rows = [mine] if ranks is None else ranks.gather(mine)
    if not show:
        return 0
    result = report(args, cache, last, rows, ranks, model)
    result["text"], result["tokens"] = "".join(text), tokens
    if args.json:
        print(json.dumps(result))
    else:
        print_report(args, result, cache, rows)
    return 0


def _guarded(ranks, responses):
    """``responses``, with a lost peer as a RankError naming the step."""
    step = "prefilling the prompt"
    while True:
        resp = ranks.collective(step, lambda: next(responses, None))
        if resp is None:
            return
        step = f"decoding token {resp.generation_tokens + 1}"
        yield resp

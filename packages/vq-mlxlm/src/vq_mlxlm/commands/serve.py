"""``vq serve``: mlx-lm's OpenAI-compatible server, its model patched to use vq caches.

mlx-lm's server builds caches through ``make_prompt_cache(model)``, which calls
``model.make_cache()``; ``patch`` replaces that, so every request gets compressed caches.
The server's own loader is pointed at the already loaded, patched model, so nothing is
fetched from a model hub (any ``model`` a request names gets this one). vq caches merge
into :class:`~vq_core.BatchCompressedKVCache`, so mlx-lm's continuous batching serves
concurrent requests together (up to ``--decode-concurrency`` decoding, ``--prompt-concurrency``
in prefill), through :class:`~vq_mlxlm.server_batch.LoggedBatchGenerator`, which logs the KV
bytes per active session. Requests are answered by
:class:`~vq_mlxlm.server_handler.VQHandler` (a UTF-8 body check, the ``--max-tokens`` cap,
the context-length check); the mlx-lm server options in :data:`FORWARDED` are checked here,
before the model loads, and passed on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from vq_mlxlm.commands.flags import FlagError, bits_label

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(M|G|MB|GB)?$", re.IGNORECASE)

# vq serve flag -> mlx-lm server flag (the same name), with its check
FORWARDED = ("max_tokens", "temp", "top_p", "top_k", "min_p", "prompt_cache_size",
             "prompt_cache_bytes", "prefill_step_size", "decode_concurrency",
             "prompt_concurrency", "chat_template_args", "allowed_origins",
             "log_level")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server flags of ``vq serve`` (the cache flags come from the CLI's cache group)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help="tokens a request generates when it names none, and the most any request may "
        "generate: a larger max_tokens is cut to this (finish_reason 'length'; default 512)",
    )
    p.add_argument("--temp", type=float, default=0.0, help="default sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="default nucleus top-p")
    p.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    p.add_argument(
        "--prompt-cache-size", type=int, default=10, help="distinct prompt caches kept (LRU)"
    )
    p.add_argument(
        "--prompt-cache-bytes", default=None, help="most bytes of prompt caches kept (e.g. 2GB)"
    )
    p.add_argument(
        "--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk"
    )
    p.add_argument(
        "--decode-concurrency",
        type=int,
        default=32,
        help="requests decoded together in one batch (mlx-lm's continuous batching)",
    )
    p.add_argument(
        "--prompt-concurrency", type=int, default=8, help="prompts prefilled together in one batch"
    )
    p.add_argument(
        "--chat-template-args",
        default="{}",
        help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--allowed-origins", default="*", help="CORS origins, comma-separated")
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )


def check_arguments(args) -> None:
    """FlagError naming the first server flag out of range (before any model loads)."""
    checks = (
        ("port", 1 <= args.port <= 65535, "a TCP port 1-65535"),
        ("max_tokens", args.max_tokens >= 1, "an integer >= 1"),
        ("temp", args.temp >= 0, ">= 0"),
        ("top_p", 0 <= args.top_p <= 1, "in [0, 1]"),
        ("top_k", args.top_k >= 0, "an integer >= 0"),
        ("min_p", 0 <= args.min_p <= 1, "in [0, 1]"),
        ("prompt_cache_size", args.prompt_cache_size >= 0, "an integer >= 0"),
        ("prefill_step_size", args.prefill_step_size >= 1, "an integer >= 1"),
        ("decode_concurrency", args.decode_concurrency >= 1, "an integer >= 1"),
        ("prompt_concurrency", args.prompt_concurrency >= 1, "an integer >= 1"),
        (
            "prompt_cache_bytes",
            args.prompt_cache_bytes is None or _SIZE.match(args.prompt_cache_bytes),
            "a size such as 500M or 2GB",
        ),
        ("chat_template_args", _is_json_object(args.chat_template_args), "a JSON object"),
    )
    for name, ok, allowed in checks:
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise FlagError(flag, f"{getattr(args, name)!r} is not allowed; expected {allowed}")


def serve(args) -> int:
    check_arguments(args)
    from mlx_lm import server as mlx_server

    from vq_mlxlm.commands.generate import load_patched
    from vq_mlxlm.commands.ranks import join
    from vq_mlxlm.model_shape import model_kv_shape
    from vq_mlxlm.server_batch import LoggedBatchGenerator
    from vq_mlxlm.server_handler import VQHandler

    ranks = join(args, "vq serve")
    if ranks is not None and ranks.parallel == "tensor+pipeline":
        raise FlagError("--parallel", "mlx-lm's server shards over one group: tensor or pipeline")
    if args.host not in LOOPBACK and (ranks is None or ranks.leader):
        print(f"warning: serving on {args.host}, reachable beyond this machine", file=sys.stderr)
    model, tokenizer = load_patched(args, ranks)
    if ranks is not None:  # the server's own collectives then run unguarded (mlx-lm's)
        with ranks.watching():
            served = {name: getattr(args, name) for name in FORWARDED}
            ranks.check(model, {"server options": served})
    shape = model_kv_shape(model)
    LoggedBatchGenerator.fp16_bytes_per_token = shape.layers * shape.kv_heads * shape.head_dim * 4
    context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    handler = VQHandler.configured(tokenizer, context if isinstance(context, int) else None)

    def load_patched_model(*_args, **_kwargs):
        return model, tokenizer, {}

    def http_server_with_vq_handler(host, port, response_generator, **_kwargs):
        # mlx-lm's run() takes a handler_class but does not pass it on; this is where it counts
        return original[1](host, port, response_generator, handler_class=handler)

    original = (mlx_server.load, mlx_server._run_http_server, mlx_server.BatchGenerator)
    argv = sys.argv
    mlx_server.load, mlx_server._run_http_server = load_patched_model, http_server_with_vq_handler
    original_sharded = mlx_server.sharded_load  # under vq launch: the model sharded above
    mlx_server.sharded_load = load_patched_model
    mlx_server.BatchGenerator = LoggedBatchGenerator
    print(
        f"vq serve: http://{args.host}:{args.port}/v1 ({args.method} "
        f"{bits_label(args.bits)}-bit keys, "
        f"at most {args.max_tokens} tokens a request)",
        file=sys.stderr,
        flush=True,
    )
    name = "plan" if args.plan else f"{args.bits}bit"
    sys.argv = ["vq serve", "--model", f"vq-{args.method}-{name}"]
    sys.argv += ["--host", args.host, "--port", str(args.port)]
    if ranks is not None and ranks.parallel == "pipeline":
        sys.argv.append("--pipeline")
    for name in FORWARDED:
        value = getattr(args, name)
        if value is not None:
            sys.argv += ["--" + name.replace("_", "-"), str(value)]
    try:
        mlx_server.main()
    finally:
        sys.argv = argv
        mlx_server.load, mlx_server._run_http_server, mlx_server.BatchGenerator = original
        mlx_server.sharded_load = original_sharded
    return 0


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False

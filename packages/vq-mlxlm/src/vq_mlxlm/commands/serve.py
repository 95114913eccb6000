"""``vq serve``: mlx-lm's OpenAI-compatible server, its model patched to use vq caches.

mlx-lm's server builds caches through ``make_prompt_cache(model)``, which calls
``model.make_cache()``; ``patch`` replaces that, so every request gets compressed caches.
The server's own loader is pointed at the already loaded, patched model, so nothing is
fetched from a model hub. vq caches have no ``merge``, so requests run one at a time.
"""

from __future__ import annotations

import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(args) -> int:
    from mlx_lm import server as mlx_server

    from vq_mlxlm.commands.generate import load_patched

    if args.host not in LOOPBACK:
        print(f"warning: serving on {args.host}, reachable beyond this machine", file=sys.stderr)
    model, tokenizer = load_patched(args)

    def load_patched_model(*_args, **_kwargs):
        return model, tokenizer, {}

    mlx_server.load = load_patched_model
    print(
        f"vq serve: http://{args.host}:{args.port}/v1 ({args.method} {args.bits}-bit keys)",
        file=sys.stderr,
        flush=True,
    )
    argv = sys.argv
    sys.argv = [
        "vq serve",
        "--model",
        f"vq-{args.method}-{args.bits}bit",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    try:
        mlx_server.main()
    finally:
        sys.argv = argv
    return 0

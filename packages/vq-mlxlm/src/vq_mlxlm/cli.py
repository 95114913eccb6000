"""The ``vq`` command line: ``vq generate | methods | estimate | serve | eval | plan |
calibrate | launch``.

Each subcommand lives in :mod:`vq_mlxlm.commands`; this module only parses arguments.
:func:`main` loads a fast BLAS before anything imports MLX (see :mod:`vq_mlxlm.fast_blas`),
so this module imports nothing of vq at its top. vq's own errors (:class:`vq_core.VQError`:
bad flags, missing files, artifacts that do not fit) are one line ``vq <cmd>: error: ...``
and exit status 2; anything else is a bug and shows its traceback, as does every error
with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then name two sights."


def _cache_args(p: argparse.ArgumentParser) -> None:
    from vq_core.cache import DEFAULT_SINK
    from vq_mlxlm.commands.flags import SEED_LIMIT, integer

    p.add_argument("--model", default="default", help="'default', a .gguf file or a model dir")
    p.add_argument("--method", default="turboquant_mse", help="key method (see `vq methods`)")
    p.add_argument("--bits", type=int, default=4, help="key bits per element (default 4)")
    p.add_argument("--value-method", default=None, help="value method (default: paired)")
    p.add_argument("--value-bits", type=int, default=None, help="value bits (default: --bits)")
    p.add_argument("--window", type=integer(0), default=0, help="recent tokens kept exact")
    p.add_argument(
        "--sink",
        type=integer(0),
        default=DEFAULT_SINK,
        help=f"first tokens kept exact (default {DEFAULT_SINK})",
    )
    p.add_argument("--no-center", action="store_true", help="do not subtract the mean key/value")
    p.add_argument(
        "--sliding",
        choices=("compressed", "exact"),
        default="compressed",
        help="sliding-window layers: a compressed rotating cache (default) or mlx-lm's exact one",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="vq calibrate output dir (calibrated methods, or a RateQuant per-layer allocation)",
    )
    p.add_argument("--seed", type=integer(0, SEED_LIMIT), default=0)
    p.add_argument(
        "--plan",
        default=None,
        metavar="FILE",
        help="a `vq plan` file: its method, per-layer bits and window replace the cache flags",
    )


def build_parser() -> argparse.ArgumentParser:
    from vq_mlxlm.calibration.options import METHODS, CalibrationOptions
    from vq_mlxlm.commands.flags import SEED_LIMIT, Parser, integer
    from vq_mlxlm.commands.ranks import add_arguments as ranks_arguments
    from vq_mlxlm.commands.serve import add_arguments as serve_arguments

    defaults = CalibrationOptions()
    parser = Parser(prog="vq", description="KV-cache compression for MLX")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of vq's own errors too"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a compressed KV cache")
    _cache_args(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-tokens", type=integer(1), default=64)
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt raw")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    ranks_arguments(g)

    sub.add_parser(
        "launch",
        help="mlx.launch (same arguments) exiting non-zero when a rank fails, e.g. "
        "vq launch --backend ring -n 2 -- vq generate --parallel tensor",
        add_help=False,
    )

    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--json", action="store_true")

    e = sub.add_parser("estimate", help="KV-cache memory for fp16 and every method")
    e.add_argument("--model", default="default")
    e.add_argument("--context", type=integer(1), required=True, help="tokens in the cache")
    e.add_argument("--sliding", choices=("compressed", "exact"), default="compressed")
    e.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="mlx-lm's OpenAI-compatible server with vq caches")
    _cache_args(s)
    serve_arguments(s)
    ranks_arguments(s)
    v = sub.add_parser("eval", help="quality, memory and speed vs mlx-lm's own caches")
    v.add_argument("--model", default="default", help="'default', a .gguf file or a model dir")
    v.add_argument("--methods", default=None, help="a,b,... names or specs (method@bits+k=v)")
    v.add_argument("--bits", default=None, help="2,3,4 (default: each method's main widths)")
    v.add_argument("--window", type=integer(0), default=None, help="recent tokens kept exact")
    v.add_argument("--value-bits", type=int, default=None, help="value bits (default: --bits)")
    v.add_argument("--add", default=None, help="extra rows as specs, e.g. rabitq@3+window=64")
    v.add_argument("--no-baselines", action="store_true", help="skip mlx-lm's 8/4/2-bit rows")
    v.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc_data.topics)")
    size = v.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small token budget (default)")
    size.add_argument("--full", action="store_true", help="full token budget")
    v.add_argument(
        "--needle-depths",
        type=integer(1),
        default=None,
        help="needle trials per haystack length (depths spread evenly; default 3 quick, 5 full)",
    )
    v.add_argument(
        "--held-out",
        action="store_true",
        help="score the held-out half of the default text (implied by --artifacts)",
    )
    v.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    v.add_argument("--markdown", default=None, metavar="FILE", help="write the table")
    v.add_argument("--plot", default=None, metavar="FILE", help="KL vs bits PNG (matplotlib)")
    v.add_argument("--artifacts", default=None, help="vq calibrate output dir for calibrated rows")
    v.add_argument(
        "--plan",
        default=None,
        metavar="FILE",
        help="add the row of a `vq plan` file (scores the held-out half of the default text)",
    )

    pl = sub.add_parser("plan", help="choose per-layer key/value bits and window for a budget")
    pl.add_argument("--model", default="default", help="'default', a .gguf file or a model dir")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, default=None, help="mean bits per element")
    budget.add_argument("--budget-mib", type=float, default=None, help="cache MiB (measured)")
    pl.add_argument(
        "--context", type=integer(1), default=4096, help="tokens the budget is for (default 4096)"
    )
    pl.add_argument("--out", required=True, metavar="FILE", help="plan file to write (JSON)")
    pl.add_argument("--methods", default="rabitq,turboquant_mse", help="candidate key methods")
    pl.add_argument("--widths", default="2,3,4", help="candidate key and value widths")
    pl.add_argument("--windows", default="0,32,64,128", help="candidate exact windows (tokens)")
    pl.add_argument(
        "--window-fraction", type=float, default=None, help="also try a window of this fraction"
    )
    pl.add_argument("--text", default=None, help="probe text (default: calibration half)")
    pl.add_argument("--prefix", type=integer(1), default=512, help="probe's compressed prefix")
    pl.add_argument("--scored", type=integer(1), default=64, help="probe's scored tokens")
    pl.add_argument(
        "--artifacts", default=None, help="vq calibrate dir with a RateQuant sensitivity table"
    )
    pl.add_argument(
        "--probe-from", default=None, metavar="PLAN", help="reuse an earlier plan's probe tables"
    )
    pl.add_argument("--quiet", action="store_true", help="no progress lines")

    c = sub.add_parser("calibrate", help="train a calibrated method's artifact")
    c.add_argument("--model", default="default", help="'default', a .gguf file or a model dir")
    c.add_argument("--method", required=True, choices=METHODS)
    c.add_argument(
        "--bits",
        type=float,
        default=2,
        help="codebook bits (vecinfer: 1, 2, 4; comm_vq: 1-4) or average budget (ratequant, "
        "e.g. 2.5)",
    )
    c.add_argument(
        "--table-bits",
        type=integer(1, 7),
        default=defaults.table_bits,
        help="comm_vq: 2**N entries per stage table (1-6)",
    )
    c.add_argument(
        "--head-samples",
        type=integer(1),
        default=defaults.head_samples,
        help="comm_vq: tokens per layer for EM",
    )
    c.add_argument(
        "--base-method", default=defaults.base_method, help="ratequant: per-layer method"
    )
    c.add_argument(
        "--text", default=None, help="calibration text file (default: Python topics, first half)"
    )
    c.add_argument("--out", required=True, help="artifact directory")
    c.add_argument("--sequences", type=integer(1), default=defaults.n_sequences)
    c.add_argument("--seq-len", type=integer(2), default=defaults.seq_len)
    c.add_argument("--seed", type=integer(0, SEED_LIMIT), default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    from vq_mlxlm.fast_blas import enable_fast_blas

    enable_fast_blas()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # every later argument is mlx.launch's
        from vq_mlxlm.distributed.launch import main as launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)
    from vq_core import VQError
    from vq_mlxlm import commands

    try:
        return getattr(commands, args.command.replace("-", "_"))(args) or 0
    except VQError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"vq {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Flag types and the checks each ``vq`` subcommand runs before any model load or long work.

Every failure is one line on stderr, ``vq <cmd>: error: <flag> ...``, with exit status 2:
:class:`Parser` prints argparse's own errors that way (no usage block), and the checks raise
:class:`FlagError`, which ``vq_mlxlm.cli.main`` prints the same way. Checks that need the
model's KV shape read it from the GGUF metadata or ``config.json``
(:func:`~vq_mlxlm.model_shape.kv_shape`), never from loaded weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vq_core import ConfigError

SEED_LIMIT = 2**32  # seeds are 0 <= seed < 2**32 (per-layer seeds add 1000 * layer)


class FlagError(ConfigError):
    """A bad command-line flag: ``str()`` is ``"<flag>: <what is wrong>"``."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class Parser(argparse.ArgumentParser):
    """argparse, with each error as the one line ``<prog>: error: <message>``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def integer(minimum: int, limit: int | None = None):
    """An argparse ``type``: an integer with ``minimum <= value`` (``< limit``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (limit is not None and value >= limit):
            bound = f">= {minimum}" if limit is None else f"in {minimum}..{limit - 1}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected {bound}")
        return value

    return parse


def check_model(model: str):
    """The model's :class:`~vq_mlxlm.model_shape.KVShape`, or FlagError naming ``--model``."""
    from vq_mlxlm.model_shape import kv_shape

    if model != "default":
        path = Path(model).expanduser()
        if not path.exists():
            raise FlagError("--model", f"{path} does not exist (models are never downloaded)")
        if path.is_file() and path.suffix != ".gguf":
            raise FlagError("--model", f"{path} is neither a .gguf file nor a model directory")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FlagError("--model", f"{path} is not an mlx-lm model directory (no config.json)")
    try:
        return kv_shape(model)
    except FileNotFoundError as e:
        raise FlagError("--model", str(e).removeprefix("--model: ")) from None
    except (RuntimeError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlagError("--model", f"{model} is not a readable model ({detail})") from None


def check_method(flag: str, method: str):
    """The registered quantizer class of ``method``, or FlagError naming ``flag``."""
    from vq_core import UnknownMethodError, get

    try:
        return get(method)
    except UnknownMethodError as e:
        raise FlagError(flag, str(e)) from None


def check_width(flag: str, bits: int, method: str) -> None:
    allowed = check_method("--method", method).config_class.allowed_bits
    if bits not in allowed:
        raise FlagError(flag, f"{bits} is not a width of {method}; allowed: {allowed}")


def check_input_file(flag: str, path: str | None) -> None:
    if path is not None and not Path(path).expanduser().is_file():
        raise FlagError(flag, f"{path} is not a file")


def check_output_file(flag: str, path: str | None) -> None:
    """An output file must be writable where it is: its folder exists, it is no folder."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise FlagError(flag, f"{path} is a directory; expected a file to write")
    if not p.parent.is_dir():
        raise FlagError(flag, f"{path}: the folder {p.parent} does not exist")


def cache_options(args) -> dict:
    """The cache flags as ``patch()`` keywords (besides method and bits)."""
    return dict(
        value_method=args.value_method,
        value_bits=args.value_bits,
        window=args.window,
        sink=args.sink,
        center=not args.no_center,
        sliding=args.sliding,
        seed=args.seed,
        artifacts=args.artifacts,
    )


def bits_label(bits) -> str:
    """``4`` for one width; ``3.40 (per layer)`` for a plan's list of widths."""
    if isinstance(bits, list):
        return f"{sum(bits) / len(bits):.2f} (per layer)"
    return str(bits)


def check_plan(flag: str, path: str, shape):
    """The plan at ``path`` for a model of ``shape`` (a KVShape), or FlagError."""
    from vq_core import ArtifactError
    from vq_mlxlm.planner import load_plan

    fingerprint = {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}
    try:
        return load_plan(path, fingerprint)
    except ArtifactError as e:
        raise FlagError(flag, str(e)) from None


def _apply_plan(args):
    """``--plan FILE``: its method, per-layer widths, window and sink replace the cache flags."""
    from vq_core import VQError
    from vq_mlxlm.layer_caches import check_config

    if args.artifacts is not None:
        raise FlagError("--plan", "a plan holds zero-calibration settings; drop --artifacts")
    shape = check_model(args.model)
    plan = check_plan("--plan", args.plan, shape)
    kwargs = plan.patch_kwargs()
    args.method, args.bits = kwargs["method"], kwargs["bits"]
    args.value_method, args.value_bits = kwargs["value_method"], kwargs["value_bits"]
    args.window, args.sink = kwargs["window"], kwargs["sink"]
    try:
        check_config(shape, args.method, args.bits, **cache_options(args))
    except VQError as e:
        raise FlagError("--plan", str(e)) from None
    return shape


def check_cache_flags(args):
    """The flags of ``vq generate`` and ``vq serve`` (``--model``, ``--method`` ...
    ``--artifacts``), each on its own, then together as :func:`vq_mlxlm.patch` would build
    them for the model's shape (returned). With ``--plan`` the plan's settings replace the
    cache flags (``args`` is updated)."""
    from vq_core import VQError
    from vq_mlxlm.layer_caches import check_config

    if getattr(args, "plan", None) is not None:
        return _apply_plan(args)

    cls = check_method("--method", args.method)
    check_width("--bits", args.bits, args.method)
    if args.value_method is not None:
        value_cls = check_method("--value-method", args.value_method)
        if value_cls.keys_only:
            raise FlagError(
                "--value-method",
                f"{args.value_method} compresses keys only; use it as --method (its values "
                f"then go to {value_cls.default_value_method})",
            )
    if args.value_bits is not None:
        partner = args.value_method or cls.default_value_method or args.method
        check_width("--value-bits", args.value_bits, partner)
    if args.artifacts is not None and not Path(args.artifacts).exists():
        raise FlagError("--artifacts", f"{args.artifacts} does not exist")
    if cls.needs_calibration and args.artifacts is None:
        raise FlagError(
            "--artifacts",
            f"--method {args.method} is calibrated and needs its artifact: pass --artifacts "
            f"DIR from `vq calibrate --method {args.method} --out DIR`",
        )
    shape = check_model(args.model)
    try:
        check_config(shape, args.method, args.bits, **cache_options(args))
    except VQError as e:
        flag = "--artifacts" if args.artifacts is not None else "--method/--bits"
        raise FlagError(flag, str(e)) from None
    return shape

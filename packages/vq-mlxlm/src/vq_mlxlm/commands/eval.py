"""``vq eval``: quality, memory and speed of vq caches against mlx-lm's own caches.

Rows: every zero-calibration method at its main bit widths (or ``--methods``), mlx-lm's
``QuantizedKVCache`` at 8/4/2 bits and the exact ``KVCache``, all on one model, one text
and in one run (see :mod:`vq_mlxlm.evaluation`). Prints the Markdown table; ``--json``,
``--markdown`` and ``--plot`` write files.

``--artifacts DIR`` (from ``vq calibrate``) adds a row per calibrated method found in
``DIR`` at the bits it was trained for, and for a RateQuant allocation its row and the
uniform split at the same mean; without ``--text`` the run then scores the held-out half
of the default text (calibration used the other half). ``--plan FILE`` (from ``vq plan``,
which probes the calibration half) adds the plan's row and scores the held-out half too.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from vq_core import available, get
from vq_mlxlm.commands.flags import (
    FlagError,
    check_input_file,
    check_model,
    check_output_file,
    check_plan,
)
from vq_mlxlm.commands.generate import load_checked
from vq_mlxlm.evaluation import report as report_io
from vq_mlxlm.evaluation.harness import FULL, QUICK, needle_depths, run
from vq_mlxlm.evaluation.specs import MLX_LM, expand, parse_spec, zero_calibration_methods


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise FlagError("--bits", f"{text!r} is not a comma-separated list of integers") from None


def check_flags(args) -> list:
    """Every flag of ``vq eval``, and every row built as patch() would build it for the
    model's shape, before the model loads; returns the rows."""
    from vq_core import VQError
    from vq_mlxlm.layer_caches import check_config

    _ints(args.bits)
    check_input_file("--text", args.text)
    if args.held_out and args.text is not None:
        raise FlagError("--held-out", "splits the default text; it cannot be used with --text")
    for flag in ("json", "markdown", "plot"):
        check_output_file(f"--{flag}", getattr(args, flag))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FlagError("--plot", "needs matplotlib (pip install matplotlib)") from None
    if args.plan is not None and not Path(args.plan).is_file():
        raise FlagError("--plan", f"{args.plan} is not a file (write one with `vq plan`)")
    if args.artifacts is not None and not Path(args.artifacts).is_dir():
        raise FlagError("--artifacts", f"{args.artifacts} is not a directory")
    try:
        specs = grid(args)
    except (ValueError, VQError) as e:
        raise FlagError("--methods/--bits/--add", str(e)) from None
    shape = check_model(args.model)
    for spec in specs:
        if spec.kind != "vq":
            continue
        if spec.plan is not None:
            kwargs = check_plan("--plan", spec.plan, shape).patch_kwargs()
            try:
                check_config(shape, kwargs.pop("method"), kwargs.pop("bits"), **kwargs)
            except (ValueError, VQError) as e:
                raise FlagError("--plan", str(e)) from None
            continue
        if get(spec.method).needs_calibration and not spec.artifacts:
            raise FlagError(
                "--artifacts",
                f"row {spec.label}: {spec.method} is calibrated and needs its artifact; pass "
                f"--artifacts DIR from `vq calibrate --method {spec.method} --out DIR`",
            )
        try:
            check_config(
                shape,
                spec.method,
                spec.layer_bits(shape.layers),
                value_method=spec.value_method,
                value_bits=spec.value_bits,
                window=spec.window,
                sink=spec.sink,
                center=bool(spec.center),
                block=spec.block,
                artifacts=spec.artifacts,
                options=dict(spec.options),
            )
        except (ValueError, VQError) as e:
            raise FlagError(f"--methods/--bits/--add row {spec.label}", str(e)) from None
    return specs


def grid(args) -> list:
    """The rows ``args`` ask for (the exact row is added by the harness)."""
    methods = args.methods.split(",") if args.methods else zero_calibration_methods()
    specs = expand(methods, _ints(args.bits), window=args.window, value_bits=args.value_bits)
    if not args.no_baselines and MLX_LM not in methods:
        specs += expand([MLX_LM])
    specs += [parse_spec(s) for s in (args.add.split(",") if args.add else [])]
    if args.artifacts:  # calibrated rows load their artifacts from the directory
        specs = [
            replace(s, artifacts=args.artifacts)
            if s.kind == "vq" and get(s.method).needs_calibration
            else s
            for s in specs
        ]
        specs += [s for s in artifact_rows(args.artifacts) if s not in specs]
    if args.plan:
        specs.append(plan_row(args.plan))
    return specs


def plan_row(path: str):
    """The row of a ``vq plan`` file: its method, labelled with its mean key width."""
    from vq_mlxlm.evaluation.specs import CacheSpec
    from vq_mlxlm.planner import load_plan

    plan = load_plan(path)
    mean = round(sum(plan.key_bits) / len(plan.key_bits), 2)
    return CacheSpec(plan.method, mean, plan=path)


def artifact_rows(directory: str) -> list:
    """Rows for what ``directory`` holds: each calibrated method at its trained bits, and a
    RateQuant allocation next to the uniform split of the same mean."""
    from vq_core.artifacts import artifact_path, verify

    rows = []
    for name in available():
        path = artifact_path(directory, name)
        if get(name).needs_calibration and path.exists():
            bits = verify(path).get("bits", 2)
            rows.append(parse_spec(f"{name}@{int(bits)}+artifacts={directory}"))
    path = artifact_path(directory, "ratequant")
    if path.exists():
        meta = verify(path)
        mean, base = float(meta["bits"]), meta["base_method"]
        rows.append(parse_spec(f"{base}@{mean}+split=uniform"))
        rows.append(parse_spec(f"{base}@{mean}+split=ratequant+artifacts={directory}"))
    return rows


def eval(args) -> int:
    from vq_mlxlm.evaluation.text import load_text

    specs = check_flags(args)
    budget = FULL if args.full else QUICK
    if args.needle_depths:
        depths = needle_depths(args.needle_depths)
        budget = replace(budget, needle=tuple((n, depths) for n, _ in budget.needle))
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_checked(args.model)
    tuned = args.held_out or args.artifacts is not None or args.plan is not None
    held_out = tuned and args.text is None
    text = load_text(tokenizer, args.text, budget.min_text, held_out=held_out)
    print(
        f"{len(specs) + 1} rows ({budget.name}) on {text.source} ({len(text.tokens):,} tokens)",
        file=sys.stderr,
        flush=True,
    )
    result = run(model, tokenizer, text, specs, budget, model_name=args.model)
    table = report_io.markdown(result)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        report_io.write_json(result, args.json)
    if args.plot:
        try:
            report_io.write_plot(result, args.plot)
        except ImportError as err:
            print(f"vq eval: {err}", file=sys.stderr)
    print(f"vq eval: {time.perf_counter() - t0:.0f} s in all", file=sys.stderr)
    return 0

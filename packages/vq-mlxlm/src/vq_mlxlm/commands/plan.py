"""``vq plan``: choose key method, per-layer key/value widths and window for a budget.

``--bits B --context N`` targets a mean of ``B`` accounted bits per element at ``N`` tokens;
``--budget-mib M --context N`` a cache of at most ``M`` MiB (measured bytes) at ``N`` tokens.
The probe runs on the first (calibration) half of the default text, or ``--text``; ``vq eval
--plan`` scores the other half. With ``--artifacts DIR`` holding a RateQuant table (``vq
calibrate --method ratequant``), its measured per-layer sensitivities (keys and values at
one width) are used instead of the calibration-free probe's; the output says which.
``--probe-from PLAN`` reuses an earlier plan's probe tables (same model, widths, methods), so
planning for another budget skips the probe. Writes the plan (``--out``, JSON, see
:mod:`vq_mlxlm.planner.plan_file`) that ``vq generate``, ``serve`` and ``eval`` take with
``--plan``; prints what it chose, which probe it used, and the best uniform setting's KL.
"""

from __future__ import annotations

import sys
import time

from vq_mlxlm.commands.flags import (
    FlagError,
    check_input_file,
    check_model,
    check_output_file,
    check_plan,
)

WINDOW_CONTEXTS = (4096, 32768, 131072)


def _ints(flag: str, text: str, low: int = 0) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise FlagError(flag, f"{text!r} is not a comma-separated list of integers") from None
    if any(v < low for v in values):
        raise FlagError(flag, f"{text!r}: every value must be >= {low}")
    return values


def check_flags(args):
    """Every flag before the model loads; returns ``(Target, methods, widths, windows,
    calibrated, reuse)`` (``calibrated``: the RateQuant table of ``--artifacts``; ``reuse``:
    the probe tables of ``--probe-from``'s plan; each None when not given)."""
    from vq_core import get
    from vq_mlxlm.commands.flags import check_method
    from vq_mlxlm.planner import Target

    check_output_file("--out", args.out)
    check_input_file("--text", args.text)
    methods = args.methods.split(",")
    for m in methods:
        cls = check_method("--methods", m)
        if cls.needs_calibration:
            raise FlagError("--methods", f"{m} is calibrated; vq plan plans zero-calibration ones")
    widths = _ints("--widths", args.widths, 1)
    for m in methods:
        partner = get(m).default_value_method or m
        for name in {m, partner}:
            bad = [b for b in widths if b not in get(name).config_class.allowed_bits]
            if bad:
                raise FlagError("--widths", f"{bad} are not widths of {name}")
    windows = _ints("--windows", args.windows, 0)
    if args.window_fraction is not None:
        if not 0 < args.window_fraction < 1:
            raise FlagError("--window-fraction", f"{args.window_fraction} is not in (0, 1)")
        windows = sorted({*windows, round(args.window_fraction * args.context)})
    nbytes = None if args.budget_mib is None else round(args.budget_mib * 2**20)
    try:
        target = Target(args.context, bits=args.bits, nbytes=nbytes)
    except ValueError as e:
        raise FlagError("--bits/--budget-mib/--context", str(e)) from None
    if args.prefix < 64 or args.scored < 1:
        raise FlagError("--prefix/--scored", "need --prefix >= 64 and --scored >= 1")
    shape = check_model(args.model)
    calibrated = None
    if args.artifacts is not None:
        from vq_core import ArtifactError
        from vq_mlxlm.planner.search import read_calibrated

        fingerprint = {
            "layers": shape.layers,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
        }
        try:
            calibrated = read_calibrated(args.artifacts, fingerprint)
        except (ArtifactError, KeyError) as e:
            raise FlagError("--artifacts", str(e)) from None
    reuse = None
    if args.probe_from is not None:
        if calibrated is not None:
            raise FlagError("--probe-from", "cannot be combined with --artifacts")
        reuse = check_plan("--probe-from", args.probe_from, shape).report.get("sensitivity")
    return target, methods, widths, windows, calibrated, reuse


def window_cost(plan, contexts=WINDOW_CONTEXTS) -> dict[int, float]:
    """Bits per element the plan's window adds at each context (exact at 16 bits instead of
    its layers' mean compressed width)."""
    from vq_mlxlm.planner.allocate import accounted_bits

    out = {}
    k = sum(plan.key_bits) / len(plan.key_bits)
    v = sum(plan.value_bits) / len(plan.value_bits)
    for n in contexts:
        with_w = accounted_bits(k, v, n, plan.sink, plan.window, plan.block)
        without = accounted_bits(k, v, n, plan.sink, 0, plan.block)
        out[n] = with_w - without
    return out


def plan(args) -> int:
    from vq_mlxlm.commands.generate import load_checked
    from vq_mlxlm.evaluation.text import load_text
    from vq_mlxlm.planner import make_plan, save_plan

    target, methods, widths, windows, calibrated, reuse = check_flags(args)
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_checked(args.model)
    text = load_text(tokenizer, args.text, args.prefix + args.scored + 1, part="calibration")

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    result = make_plan(
        model,
        text.tokens,
        target,
        methods=methods,
        key_widths=widths,
        value_widths=widths,
        windows=windows,
        prefix=args.prefix,
        scored=args.scored,
        probe_source=text.source,
        calibrated=calibrated,
        reuse=reuse,
        progress=None if args.quiet else say,
    )
    save_plan(result, args.out)
    r = result.report
    print(f"probe: {r['probe']['kind']}, on {text.source}")
    print(f"plan: {result.label()}  KL {r['kl']:.4f} on the probe's chunk")
    print(f"  key bits   {result.key_bits}")
    print(f"  value bits {result.value_bits}")
    if r["bits_per_element"] is not None:
        print(f"  {r['bits_per_element']:.3f} bits/element at {target.context:,} tokens")
    else:
        print(f"  {r['bytes'] / 2**20:.2f} MiB measured at {target.context:,} tokens")
    bu = r["best_uniform"]
    if bu:
        verdict = "uniform kept (it measured lower)" if r["chose_uniform"] else "plan kept"
        print(f"best uniform: {bu['label']}  KL {bu['kl']:.4f}  ({verdict})")
    if result.window:
        costs = ", ".join(f"{n // 1024}k +{c:.3f}" for n, c in window_cost(result).items())
        print(f"window {result.window} tokens costs bits/element: {costs}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0

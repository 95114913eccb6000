"""The evaluation report: a Markdown table, JSON with the same fields, a rate-distortion PNG.

Columns: the row's cache spec, accounted bits per element (keys and values averaged, fp16
side data), the bytes the cache really holds after ``context`` tokens (``nbytes``), the
ratio of fp16 bytes to those bytes, perplexity and its change against the exact cache, KL
(nats/token), each with its 95% bootstrap interval in brackets (:mod:`.bootstrap`), top-1
agreement, needle retrieval, greedy continuations (the shortest run of tokens agreeing with
the exact cache's continuation, of the tokens generated; ``-`` when not run), decode
tokens/s as a ratio of the exact cache's (timed side by side) and the lowest per-layer
attention-output cosine.
"""

from __future__ import annotations

import json
from pathlib import Path

from vq_core import MissingDependencyError

PLOT_EXTRA = "plot"

COLUMNS = (
    ("method", "label", "{}"),
    ("bits/el", "bits_per_element", "{:.3f}"),
    ("cache MiB", "cache_bytes", "{:.2f}"),
    ("vs fp16", "ratio_vs_fp16", "{:.2f}x"),
    ("PPL", "ppl", "{:.3f}"),
    ("ΔPPL % [95% CI]", "delta_ppl_pct", "{:+.2f}"),
    ("KL [95% CI]", "kl", "{:.4f}"),
    ("top-1", "top1", "{:.3f}"),
    ("needle", "needle", "{}"),
    ("gen agree", "agree_len_min", "{}"),
    ("decode vs exact", "decode_ratio", "{:.2f}x"),
    ("attn cos min", "layer_cosine_min", "{:.4f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row[key]
    if key == "cache_bytes":
        value = value / 2**20
    if key == "needle":
        hits = sum(t["retrieved"] for t in row["needle_trials"])
        return f"{hits}/{len(row['needle_trials'])}"
    if key == "agree_len_min":
        gens = row.get("continuations") or []
        return f"{value}/{gens[0]['steps']}" if gens else "-"
    ci = {"delta_ppl_pct": "delta_ppl_ci", "kl": "kl_ci"}.get(key)
    if ci and row["kind"] != "exact" and ci in row:
        low, high = row[ci]
        return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"
    return fmt.format(value)


def markdown(report: dict) -> str:
    """The results table plus one line that says what was scored."""
    b = report["budget"]
    lengths = ", ".join(f"{n} tokens x {len(d)} depths" for n, d in b["needle"])
    lines = [
        f"Model `{report['model']}`, text `{report['text']['source']}` "
        f"({report['text']['tokens']:,} tokens). Scored {b['scored']} predictions after an "
        f"exact {b['prefix']}-token prefix, {b['chunk']} tokens per forward "
        f"(tokens {report['scored_range'][0]}-{report['scored_range'][1]}); bytes after "
        f"{b['prefix'] + b['scored']} tokens; needle: {lengths}; decode timed over "
        f"{b['decode_steps']} tokens at {b['prefix'] + b['scored']} tokens of context; "
        f"intervals: {100 * report.get('ci_level', 0.95):.0f}% bootstrap over blocks of "
        f"{report.get('ci_block', b['chunk'])} scored tokens"
        + (
            f"; continuations: {b['continuation_steps']} greedy tokens after prompts of "
            f"{', '.join(map(str, b['continuations']))} tokens."
            if b.get("continuation_steps")
            else "."
        ),
        "",
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def write_plot(report: dict, path: str) -> None:
    """KL against bits per element, one line per method (and per tuned setting; all
    ``vq plan`` rows of a method on one line), with the KL's bootstrap interval as error bars.

    Raises ImportError naming the extra when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError(
            f"matplotlib is not installed, so no plot was written; install it with "
            f"`pip install 'vq-mlxlm[{PLOT_EXTRA}]'` (or `uv run --with matplotlib ...`)"
        ) from err
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in report["rows"]:
        if row["kind"] == "exact":
            continue
        name = row["label"].replace(f"@{row['bits']}", "")
        if "+plan=" in name:  # one line for every plan row
            name = f"{row['method']} (vq plan)"
        kl = max(row["kl"], 1e-6)
        low, high = row.get("kl_ci", (kl, kl))
        point = (row["bits_per_element"], kl, kl - max(low, 1e-6), max(high, 1e-6) - kl)
        lines.setdefault(name, []).append(point)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.get_cmap("tab20").colors  # distinct colours (the default cycle repeats at 10)
    markers = "os^vD<>ph*"
    for i, (name, points) in enumerate(sorted(lines.items())):
        xs, ys, lo, hi = zip(*sorted(points), strict=True)
        style = dict(color=colors[i % len(colors)], marker=markers[i % len(markers)])
        if name == "mlx_lm":
            style = dict(color="black", linestyle="--", linewidth=2, marker="o")
        ax.errorbar(xs, ys, yerr=[lo, hi], label=name, capsize=2, **style)
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (keys and values, accounted)")
    ax.set_ylabel("KL(exact || cache), nats per token")
    ax.set_title(f"{report['model']}: rate-distortion ({report['budget']['name']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

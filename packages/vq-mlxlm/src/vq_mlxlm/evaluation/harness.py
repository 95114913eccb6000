"""Run the evaluation grid: every cache spec against the exact cache, on one model and text.

For each row, in this order: quality (PPL/KL/top-1, :mod:`.scoring`, with bootstrap
intervals from :mod:`.bootstrap`) and the bytes the cache holds afterwards; speed side by
side with the exact cache (:mod:`.speed`); per-layer attention cosine
(:mod:`.layer_cosine`); needle retrieval (:mod:`.needle`); greedy continuations against the
exact cache's (:mod:`.continuation`). The exact row runs first and is the reference for
all of them. Progress goes to stderr.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import asdict, dataclass

import mlx.core as mx

from vq_core import CompressedKVCache, ConfigError
from vq_mlxlm.evaluation import bootstrap, continuation, layer_cosine, needle, scoring, speed
from vq_mlxlm.evaluation.prefix import exact_kv, fill
from vq_mlxlm.evaluation.specs import EXACT, CacheSpec, accounted_bits
from vq_mlxlm.evaluation.text import EvalText
from vq_mlxlm.model_shape import model_kv_shape


@dataclass(frozen=True)
class Budget:
    """Token counts of one evaluation size (see ``QUICK`` and ``FULL``)."""

    name: str
    prefix: int  # exact tokens before the scored range (stored compressed)
    scored: int  # scored predictions, fed in chunks of ``chunk``
    chunk: int
    needle: tuple[tuple[int, tuple[float, ...]], ...]  # (prompt tokens, depths)
    prefill_tokens: int
    prefill_chunk: int
    decode_steps: int
    min_text: int = 8000  # the text must have at least this many tokens
    continuations: tuple[int, ...] = ()  # prompt lengths (<= prefix + 1) continued greedily
    continuation_steps: int = 0  # tokens generated per continuation

    @property
    def context(self) -> int:
        """Tokens in the cache when bytes are read and decode speed is timed."""
        return self.prefix + self.scored


QUICK = Budget(
    "quick",
    prefix=1152,
    scored=384,
    chunk=32,
    needle=((2048, (0.1, 0.5, 0.9)),),
    prefill_tokens=128,
    prefill_chunk=64,
    decode_steps=8,
)
FULL = Budget(
    "full",
    prefix=2048,
    scored=2048,
    chunk=32,
    needle=tuple((n, (0.1, 0.3, 0.5, 0.7, 0.9)) for n in (2048, 4096, 8192)),
    prefill_tokens=1024,
    prefill_chunk=256,
    decode_steps=32,
    continuations=(1024, 2048),
    continuation_steps=256,
)


def needle_depths(count: int) -> tuple[float, ...]:
    """``count`` depths spread evenly over ``(0, 1)``: ``(i + 0.5) / count``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"needle depths: expected a positive integer, got {count!r}")
    return tuple(round((i + 0.5) / count, 4) for i in range(count))


class Progress:
    """A one-line progress bar on stderr (one line per step when stderr is not a TTY)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()

    def show(self, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        filled = int(24 * self.done / max(self.total, 1))
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = (
            f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} {label} "
            f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left"
        )
        end = "\r" if self.tty else "\n"
        print(f"{line:<100}", end=end, file=self.stream, flush=True)

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def run(
    model,
    tokenizer,
    text: EvalText,
    specs: list[CacheSpec],
    budget: Budget = QUICK,
    model_name: str = "",
) -> dict:
    """Evaluate ``specs`` (an exact row is put first); returns the report dict."""
    b, tokens = budget, text.tokens
    decode_end = b.context + 1 + b.decode_steps
    if len(tokens) < max(b.min_text, decode_end):
        raise ConfigError(f"text has {len(tokens):,} tokens; --{b.name} needs {b.min_text:,}")
    specs = [CacheSpec(EXACT)] + [s for s in specs if s.kind != EXACT]
    progress = Progress(2 + 5 * len(specs))
    t0 = time.perf_counter()

    progress.show("exact prefix")
    prefix_kv = exact_kv(model, mx.array(tokens[: b.prefix])[None])
    chunk = mx.array(tokens[b.prefix : b.prefix + b.chunk])[None]
    records = layer_cosine.capture(model, prefix_kv, chunk)
    progress.step("needle haystacks")
    longest = max(n for n, _ in b.needle)
    hay_start = decode_end if len(tokens) - decode_end >= longest else 0
    groups = needle.build(model, tokenizer, tokens[hay_start:], b.needle)
    progress.step("rows")

    shared = _Shared(model, tokenizer, tokens, b, prefix_kv, records, groups)
    rows = [shared.row(spec, progress) for spec in specs]
    progress.close()
    exact = rows[0]
    for row in rows:
        row["delta_ppl_pct"] = 100 * (row["ppl"] / exact["ppl"] - 1)
        row["needle_vs_exact"] = row["needle"] - exact["needle"]
        per_token = row.pop("_per_token")
        if row is not exact:
            exact_nll = exact["_exact_nll"]
            dp = bootstrap.delta_ppl_interval(per_token.nll, exact_nll, b.chunk)
            kl = bootstrap.mean_interval(per_token.kl, b.chunk)
            row["delta_ppl_ci"] = [_sig(dp.low), _sig(dp.high)]
            row["kl_ci"] = [_sig(kl.low), _sig(kl.high)]
        else:
            row["delta_ppl_ci"], row["kl_ci"] = [0.0, 0.0], [0.0, 0.0]
    exact.pop("_exact_nll")
    return {
        "model": model_name,
        "text": {"source": text.source, "sha256": text.sha256, "tokens": len(tokens)},
        "budget": asdict(b),
        "scored_range": [b.prefix + 1, b.prefix + b.scored],
        "ci_level": bootstrap.LEVEL,
        "ci_block": b.chunk,
        "needle_haystack_start": hay_start,
        "kv_shape": asdict(model_kv_shape(model)),
        "fp16_bytes": model_kv_shape(model).fp16_bytes(b.context),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


@dataclass
class _Shared:
    """What every row reuses: exact prefix, layer records, needle groups, exact caches."""

    model: object
    tokenizer: object
    tokens: list[int]
    budget: Budget
    prefix_kv: list
    records: list
    groups: list
    reference: list | None = None
    exact_full: list | None = None
    continuations: list | None = None

    def row(self, spec: CacheSpec, progress: Progress) -> dict:
        model, b, t = self.model, self.budget, self.tokens
        start = last = time.perf_counter()
        stages = {}

        def lap(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            stages[name] = round(now - last, 1)
            last = now
            progress.step(f"{spec.label}: {name}")

        caches = fill(spec.make_caches(model), self.prefix_kv)
        quality, kept, per_token = scoring.score(
            model, caches, t, b.prefix, b.scored, b.chunk, self.reference
        )
        row = {**_describe(spec, caches, model, b.context), **asdict(quality)}
        row["_per_token"] = per_token
        if spec.kind == EXACT:
            self.reference, self.exact_full = kept, caches
            row["_exact_nll"] = per_token.nll
        lap("quality")

        decode = t[b.context + 1 : b.context + 1 + b.decode_steps]
        sp = speed.side_by_side(
            model,
            CacheSpec(EXACT).make_caches(model),
            spec.make_caches(model),
            self.exact_full,
            caches,
            t[: b.prefill_tokens],
            decode,
            b.prefill_chunk,
        )
        if spec.kind == EXACT:  # the exact row timed itself twice: the noise floor
            from mlx_lm.models.cache import trim_prompt_cache

            trim_prompt_cache(self.exact_full, len(decode))
        row.update(
            prefill_tps=round(sp.prefill_tps, 1),
            decode_tps=round(sp.decode_tps, 2),
            exact_prefill_tps=round(sp.exact_prefill_tps, 1),
            exact_decode_tps=round(sp.exact_decode_tps, 2),
            prefill_ratio=round(sp.prefill_ratio, 3),
            decode_ratio=round(sp.decode_ratio, 3),
            decode_context=sp.decode_context,
        )
        lap("speed")

        cos = layer_cosine.layer_cosines(spec.make_caches(model), self.prefix_kv, self.records)
        row["layer_cosine"] = [round(c, 6) for c in cos]
        row["layer_cosine_min"] = min(row["layer_cosine"])
        lap("layer cosine")

        trials = []
        for group in self.groups:
            trials += needle.run(model, self.tokenizer, spec.make_caches(model), group)
        row["needle"] = sum(x["retrieved"] for x in trials) / len(trials)
        row["needle_trials"] = trials
        lap("needle")

        ends = b.continuations if b.continuation_steps else ()
        gens = continuation.run(
            model, lambda: spec.make_caches(model), self.prefix_kv, t, ends, b.continuation_steps
        )
        if spec.kind == EXACT:
            self.continuations = gens
        compared = [
            continuation.compare(g, r) for g, r in zip(gens, self.continuations, strict=True)
        ]
        row["continuations"] = [{"prompt": e, **c} for e, c in zip(ends, compared, strict=True)]
        row["agree_len_min"] = min((c["agree_len"] for c in compared), default=None)
        row["match_mean"] = sum(c["match"] for c in compared) / len(compared) if compared else None
        lap("continuation")
        row["seconds"] = {**stages, "total": round(time.perf_counter() - start, 1)}
        return row


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (a KL of 1e-7 must not round to 0)."""
    return float(f"{x:.6g}")


def _describe(spec: CacheSpec, caches: list, model, context: int) -> dict:
    """The row's settings, bytes held and proof that the compressed cache was used."""
    shape = model_kv_shape(model)
    compressed = [c for c in caches if isinstance(c, CompressedKVCache)]
    bits = accounted_bits(spec, caches)
    layer = compressed[0] if compressed else None
    return {
        "label": spec.label,
        "kind": spec.kind,
        "method": spec.method,
        "bits": spec.bits,
        "key_method": layer.key_quantizer.method if layer else spec.method,
        "value_method": layer.value_quantizer.method if layer else spec.method,
        "value_bits": layer.value_quantizer.config.bits if layer else spec.bits,
        "window": spec.window,
        "options": dict(spec.options),
        "bits_per_element": round(bits, 4),
        "cache_bytes": sum(c.nbytes for c in caches),
        "accounted_bytes": round(shape.fp16_bytes(context) * bits / 16),
        "fp16_bytes": shape.fp16_bytes(context),
        "ratio_vs_fp16": round(shape.fp16_bytes(context) / sum(c.nbytes for c in caches), 3),
        "cache_tokens": caches[0].offset,
        "compressed_layers": len(compressed),
        "compressed_tokens": min((c.compressed_tokens for c in compressed), default=0),
    }


def _machine() -> dict:
    import os

    import mlx_lm

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "python": platform.python_version(),
    }

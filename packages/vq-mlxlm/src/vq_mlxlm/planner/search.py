"""Choose a cache configuration for a budget: probe, allocate, check against uniform.

Steps (:func:`make_plan`):

1. Probe (:mod:`.probe`): per layer, the KL of each key width of each candidate key method
   and of each value width of the value method, the other side near-exact.
2. For each key method and each window: the least-distortion per-layer (key, value) widths
   within the budget (:mod:`.allocate`), costs at the target ``context``: accounted bits per
   element (``bits=``) or bytes measured on a cache filled with ``context`` tokens
   (``budget_bytes=``).
3. Check: every allocation, and the uniform settings (one key width, one value width for
   every layer) that fit, are measured as whole caches on the probe's chunk; the plan is
   the allocation with the least measured KL. The best uniform setting's KL is reported next
   to it, and if it is lower the plan says so and uses it.

The window trades bits for exact recent tokens: its cost is computed at ``context`` (a
64-token window is 1.5% of 4k tokens but 0.05% of 128k) while its benefit is measured at the
probe's prefix, so a window chosen for a long ``context`` is measured at a shorter one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from vq_core import CompressedKVCache, ConfigError, get, make_cache
from vq_core.cache import DEFAULT_BLOCK
from vq_mlxlm.planner.allocate import accounted_bits, allocate, units
from vq_mlxlm.planner.plan_file import Plan
from vq_mlxlm.planner.probe import Probe, sensitivity

METHODS = ("rabitq", "turboquant_mse")
WIDTHS = (2, 3, 4)
WINDOWS = (0, 32, 64, 128)
RESOLUTION = 2048  # budget units of the knapsack
SINK = 1


@dataclass(frozen=True)
class Calibrated:
    """A RateQuant sensitivity table (``vq calibrate --method ratequant``): ``table[i][j]``
    is the KL with layer ``i``'s keys and values at ``widths[j]`` bits of ``method``."""

    method: str
    widths: tuple[int, ...]
    table: list[list[float]]
    source: str


def read_calibrated(artifacts: str, fingerprint: dict) -> Calibrated:
    """The RateQuant table in ``artifacts`` (ArtifactError if missing or for another model)."""
    from vq_core.artifacts import artifact_path, check_meta, read

    path = artifact_path(artifacts, "ratequant")
    arrays, meta = read(path)
    check_meta(meta, path, method="ratequant", fingerprint=fingerprint)
    return Calibrated(
        str(meta["base_method"]),
        tuple(int(b) for b in arrays["bits_options"].tolist()),
        arrays["sensitivity"].tolist(),
        str(path),
    )


@dataclass(frozen=True)
class Target:
    """A mean of ``bits`` per element, or ``nbytes`` of cache, at ``context`` tokens."""

    context: int
    bits: float | None = None
    nbytes: int | None = None

    def __post_init__(self):
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ConfigError(f"context must be a positive number of tokens, got {self.context!r}")
        if (self.bits is None) == (self.nbytes is None):
            raise ConfigError("give exactly one of a bits-per-element target and a byte budget")
        if self.bits is not None and not 1 <= self.bits <= 16:
            raise ConfigError(f"bits per element must be in [1, 16], got {self.bits}")
        if self.nbytes is not None and self.nbytes <= 0:
            raise ConfigError(f"byte budget must be positive, got {self.nbytes}")


def value_partner(method: str) -> str:
    return get(method).default_value_method or method


def layer_bytes(cache: CompressedKVCache, heads: int, context: int, dtype) -> int:
    """``nbytes`` of ``cache`` after ``context`` random tokens ``[1, heads, context, D]``."""
    shape = (1, heads, context, cache.key_quantizer.head_dim)
    keys = mx.random.normal(shape, key=mx.random.key(0)).astype(dtype)
    values = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
    cache.update_and_fetch(keys, values)
    mx.eval(keys, values)
    return cache.nbytes


class _Costs:
    """Per-layer cost of a (key method, key bits, value bits, window) setting."""

    def __init__(self, probe: Probe, target: Target, heads: int):
        self.probe, self.target, self.heads = probe, target, heads
        self._bytes: dict = {}  # memo: bits or bytes of a setting

    def cache(self, i: int, method: str, kb: int, vb: int, window: int) -> CompressedKVCache:
        return make_cache(
            method,
            head_dim=self.probe.head_dims[i],
            bits=kb,
            value_method=value_partner(method),
            value_bits=vb,
            window=window,
            sink=SINK,
            seed=1000 * i,
        )

    def __call__(self, i: int, method: str, kb: int, vb: int, window: int) -> float:
        t = self.target
        key = (self.probe.head_dims[i], method, kb, vb, window)
        if key not in self._bytes:
            c = self.cache(i, method, kb, vb, window)
            if t.bits is not None:
                k, v = c.key_quantizer.bits_per_element, c.value_quantizer.bits_per_element
                self._bytes[key] = accounted_bits(k, v, t.context, SINK, window, c.block)
            else:
                self._bytes[key] = layer_bytes(c, self.heads, t.context, self.probe.dtype)
        return self._bytes[key]

    def budget(self, layers: int) -> float:
        t = self.target
        return t.bits * layers if t.bits is not None else t.nbytes


def make_plan(
    model,
    tokens: list[int],
    target: Target,
    *,
    methods: Sequence[str] = METHODS,
    key_widths: Sequence[int] = WIDTHS,
    value_widths: Sequence[int] = WIDTHS,
    windows: Sequence[int] = WINDOWS,
    prefix: int = 512,
    scored: int = 64,
    probe_source: str = "",
    calibrated: Calibrated | None = None,
    reuse: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """The plan for ``model`` at ``target``, probed on ``tokens`` (see the module doc);
    with ``calibrated`` (a RateQuant table), its sensitivities replace the probe's; with
    ``reuse`` (an earlier plan's ``report["sensitivity"]`` for this model and probe), the
    probe's tables are not measured again."""
    from vq_mlxlm.model_shape import model_fingerprint, model_kv_shape

    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    if calibrated is not None:
        methods, key_widths = (calibrated.method,), list(calibrated.widths)
    partners = {value_partner(m) for m in methods}
    if len(partners) != 1:
        raise ConfigError(f"methods {list(methods)} pair with different value methods {partners}")
    value_method = partners.pop()
    probe = Probe(model, tokens, prefix, scored)
    n = len(probe.layers)
    say(f"probe ready: {prefix}-token prefix, {scored} scored tokens, {n} layers")
    if calibrated is None:
        options = [(kb, vb) for kb in key_widths for vb in value_widths]
        kind = "calibration-free: per-layer KL measured on the model (no vq calibrate artifact)"
        if reuse is None:
            s_value = sensitivity(probe, "v", value_method, list(value_widths), say)
            s_key = {m: sensitivity(probe, "k", m, list(key_widths), say) for m in methods}
        else:
            widths = [list(key_widths), list(value_widths)]
            missing = [m for m in methods if m not in reuse.get("key", {})]
            if reuse.get("widths") != widths or missing or len(reuse["value"]) != n:
                raise ConfigError(
                    f"the reused sensitivities hold widths {reuse.get('widths')} and methods "
                    f"{sorted(reuse.get('key', {}))} for {len(reuse.get('value', []))} layers; "
                    f"this plan needs {widths}, {list(methods)}, {n} layers"
                )
            s_value, s_key = reuse["value"], {m: reuse["key"][m] for m in methods}
            kind += " (tables reused from an earlier plan)"
        tables = {m: _additive(s_key[m], s_value, key_widths, value_widths) for m in methods}
        saved = {"value": s_value, "key": s_key, "widths": [list(key_widths), list(value_widths)]}
    else:
        if len(calibrated.table) != n:
            raise ConfigError(f"{calibrated.source} has {len(calibrated.table)} layers, not {n}")
        options = [(b, b) for b in key_widths]
        tables = {calibrated.method: [list(row) for row in calibrated.table]}
        kind = f"calibrated: RateQuant sensitivity from {calibrated.source} (keys = values)"
        saved = {"joint": tables[calibrated.method], "widths": list(key_widths)}
    probe_s = time.perf_counter() - t0

    shape = model_kv_shape(model)
    costs = _Costs(probe, target, shape.kv_heads)
    candidates, uniforms = [], []
    for m in methods:
        for w in windows:
            cost = [[costs(i, m, kb, vb, w) for kb, vb in options] for i in range(n)]
            dist = tables[m]
            unit_cost, capacity = units(cost, costs.budget(n), RESOLUTION)
            try:
                picks = allocate(dist, unit_cost, capacity)
            except ValueError:
                continue  # nothing fits with this window
            setting = (m, [options[o][0] for o in picks], [options[o][1] for o in picks], w)
            candidates.append((setting, sum(cost[i][o] for i, o in enumerate(picks))))
            fits = [j for j in range(len(options)) if sum(row[j] for row in unit_cost) <= capacity]
            fits.sort(key=lambda j: sum(row[j] for row in dist))
            for j in fits[:2]:  # the two uniform settings the probe ranks best
                kb, vb = options[j]
                uniforms.append(((m, [kb] * n, [vb] * n, w), sum(row[j] for row in cost)))
    if not candidates:
        raise ConfigError(f"no setting of {list(methods)} fits the target {target}")

    def measure(entries, kind):
        out = []
        for (m, kbits, vbits, w), spent in entries:
            caches = [costs.cache(i, m, kbits[i], vbits[i], w) for i in range(n)]
            kl = probe.kl(caches)
            label = _label(m, kbits, vbits, w)
            say(f"{kind} {label}: KL {kl:.4f}")
            out.append({"label": label, "setting": (m, kbits, vbits, w), "cost": spent, "kl": kl})
        return out

    planned = measure(candidates, "plan")
    uniform = measure(uniforms, "uniform")
    best = min(planned, key=lambda r: r["kl"])
    best_uniform = min(uniform, key=lambda r: r["kl"]) if uniform else None
    chose_uniform = best_uniform is not None and best_uniform["kl"] < best["kl"]
    chosen = best_uniform if chose_uniform else best
    m, kbits, vbits, w = chosen["setting"]
    report = {
        "target": {"context": target.context, "bits": target.bits, "bytes": target.nbytes},
        "bits_per_element": chosen["cost"] / n if target.bits is not None else None,
        "bytes": chosen["cost"] if target.nbytes is not None else None,
        "probe": {
            "kind": kind,
            "text": probe_source,
            "prefix": prefix,
            "scored": scored,
            "seconds": round(probe_s, 1),
        },
        "kl": chosen["kl"],
        "chose_uniform": chose_uniform,
        "best_uniform": _public(best_uniform),
        "candidates": [_public(r) for r in planned],
        "uniform_candidates": [_public(r) for r in uniform],
        "sensitivity": saved,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return Plan(
        model_fingerprint(model),
        m,
        value_method,
        list(kbits),
        list(vbits),
        window=w,
        sink=SINK,
        block=DEFAULT_BLOCK,
        report=report,
    )


def _additive(s_key, s_value, key_widths, value_widths) -> list[list[float]]:
    """``D[i][o] = S_key[i, kb] + S_value[i, vb]`` over the options ``(kb, vb)``."""
    return [
        [k_row[j] + v_row[h] for j in range(len(key_widths)) for h in range(len(value_widths))]
        for k_row, v_row in zip(s_key, s_value, strict=True)
    ]


def _label(method: str, kbits: list[int], vbits: list[int], window: int) -> str:
    k, v = sum(kbits) / len(kbits), sum(vbits) / len(vbits)
    return f"{method} k{k:.2f}/v{v:.2f}" + (f" w{window}" if window else "")


def _public(row: dict | None) -> dict | None:
    if row is None:
        return None
    m, kbits, vbits, w = row["setting"]
    return {
        "label": row["label"],
        "method": m,
        "key_bits": kbits,
        "value_bits": vbits,
        "window": w,
        "cost": row["cost"],
        "kl": row["kl"],
    }

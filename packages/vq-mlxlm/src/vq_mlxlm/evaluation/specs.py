"""What one row of the evaluation measures: a cache configuration, parsed from a string.

A spec is ``METHOD@BITS`` plus optional ``+key=value`` settings, e.g. ``turboquant_mse@3``,
``turboquant_mse@3+window=64``, ``turboquant_rvq@4+value_bits=3``,
``rabitq@2+rotation=hadamard``. ``METHOD`` is a registered vq method, ``mlx_lm`` (mlx-lm's
own ``QuantizedKVCache``, affine, group 64) or ``exact`` (mlx-lm's ``KVCache``: unquantized
keys and values in the model's compute dtype, float32 on MLX's CPU backend). ``window``,
``value_bits`` and ``value_method`` are cache settings; other keys go to the key method's
config. Bits per element are *accounted* with fp16 side data (norms, scales, biases) and
fp16 window tokens, as a GPU run holds them, averaged over layers.

Per-layer bits: ``METHOD@2.5+split=uniform`` gives the first half of the layers 3 bits and
the rest 2 (any mean: ``ceil`` on the first layers, ``floor`` on the others);
``METHOD@2.5+split=ratequant+artifacts=DIR`` uses the RateQuant allocation in ``DIR``
(``vq calibrate --method ratequant``), which must have that mean. ``artifacts=DIR`` on a
calibrated method loads its trained codebooks. ``METHOD@MEAN+plan=FILE`` is a ``vq plan``
file's configuration (its method, per-layer key and value widths, window and sink; ``MEAN``,
the mean key width, only labels the row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import ConfigError, available, get
from vq_core.cache import DEFAULT_BLOCK

EXACT, MLX_LM = "exact", "mlx_lm"
MLX_LM_BITS = (8, 4, 2)
MLX_LM_GROUP = 64
MAIN_BITS = (2, 3, 4)
_CACHE_KEYS = (
    "window",
    "value_bits",
    "value_method",
    "sink",
    "center",
    "block",
    "split",
    "artifacts",
    "plan",
)
SPLITS = ("uniform", "ratequant")


@dataclass(frozen=True)
class CacheSpec:
    method: str
    bits: int | float = 16
    window: int = 0
    value_bits: int | None = None
    value_method: str | None = None
    sink: int = 1
    center: int = 1
    block: int = DEFAULT_BLOCK
    split: str | None = None
    artifacts: str | None = None
    plan: str | None = None
    options: tuple[tuple[str, object], ...] = ()

    @property
    def kind(self) -> str:
        return self.method if self.method in (EXACT, MLX_LM) else "vq"

    @property
    def label(self) -> str:
        if self.method == EXACT:
            return EXACT
        extra = [f"{k}={v}" for k, v in self.options]
        for key in _CACHE_KEYS:
            value = getattr(self, key)
            if value != type(self).__dataclass_fields__[key].default:
                extra.insert(0, f"{key}={value}")
        return "+".join([f"{self.method}@{self.bits}", *extra])

    def make_caches(self, model) -> list:
        """Fresh per-layer caches for ``model`` (the model is left unpatched)."""
        from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

        from vq_mlxlm.patch import patch, unpatch

        if self.plan is not None:
            from vq_mlxlm.planner import load_plan

            patch(model, **load_plan(self.plan).patch_kwargs())
            try:
                return model.make_cache()
            finally:
                unpatch(model)
        if self.kind == "vq":
            patch(
                model,
                self.method,
                self.layer_bits(len(model.layers)),
                value_method=self.value_method,
                value_bits=self.value_bits,
                window=self.window,
                sink=self.sink,
                center=bool(self.center),
                block=self.block,
                artifacts=self.artifacts,
                **dict(self.options),
            )
            try:
                caches = model.make_cache()
            finally:
                unpatch(model)
            if self.split == "ratequant":
                layer_bits = [
                    c.key_quantizer.config.bits for c in caches if hasattr(c, "key_quantizer")
                ]
                mean = sum(layer_bits) / len(layer_bits)
                if abs(mean - self.bits) > 1e-9:
                    raise ConfigError(
                        f"{self.label}: the RateQuant allocation in {self.artifacts} has mean "
                        f"{mean:g} bits, not {self.bits}"
                    )
            return caches
        caches = make_prompt_cache(unpatch(model))
        if self.kind == MLX_LM:
            caches = [
                QuantizedKVCache(group_size=MLX_LM_GROUP, bits=self.bits)
                if type(c) is KVCache
                else c
                for c in caches
            ]
        return caches

    def layer_bits(self, layers: int) -> int | list[int]:
        """``bits``, or per-layer bits with mean ``bits`` for ``split=uniform``; with
        ``split=ratequant`` patch() reads the allocation from ``artifacts``."""
        if self.split != "uniform":
            return int(self.bits)
        lo = math.floor(self.bits)
        high = round((self.bits - lo) * layers)
        return [lo + 1] * high + [lo] * (layers - high)


def parse_spec(text: str) -> CacheSpec:
    """``"turboquant_mse@3+window=64"`` -> :class:`CacheSpec`; raises ValueError."""
    head, *settings = text.strip().split("+")
    method, _, bits = head.partition("@")
    if method == EXACT:
        return CacheSpec(EXACT)
    if not bits:
        raise ConfigError(f"spec {text!r} needs @BITS (e.g. {method}@4)")
    fields: dict = {}
    options = []
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"spec {text!r}: setting {item!r} is not key=value")
        parsed = _value(value)
        if key in _CACHE_KEYS:
            fields[key] = parsed
        else:
            options.append((key, parsed))
    number = float(bits) if "." in bits else int(bits)
    spec = CacheSpec(method, number, options=tuple(options), **fields)
    _check(spec)
    return spec


def main_bits(method: str) -> tuple[int, ...]:
    """A method's main widths: those of 2, 3, 4 it allows, else all it allows (QJL: 1)."""
    if method == MLX_LM:
        return MLX_LM_BITS
    allowed = get(method).config_class.allowed_bits
    return tuple(b for b in allowed if b in MAIN_BITS) or tuple(allowed)


def zero_calibration_methods() -> list[str]:
    return [name for name in available() if not get(name).needs_calibration]


def expand(methods: list[str], bits: list[int] | None = None, **settings) -> list[CacheSpec]:
    """Specs for ``methods`` (names or full specs) at ``bits`` (default: main widths)."""
    specs = []
    for name in methods:
        if "@" in name or name == EXACT:
            specs.append(parse_spec(name))
            continue
        widths = bits or main_bits(name)
        for b in widths:
            extra = "".join(
                f"+{k}={v}" for k, v in settings.items() if v is not None and name != MLX_LM
            )
            specs.append(parse_spec(f"{name}@{b}{extra}"))
    return specs


def accounted_bits(spec: CacheSpec, caches: list) -> float:
    """Bits per cached element (keys and values averaged), averaged over the compressed
    layers (layers a method leaves alone, e.g. sliding-window ones, are not counted)."""
    from vq_core import CompressedKVCache

    if spec.kind == "vq":
        layers = [c for c in caches if isinstance(c, CompressedKVCache)]
        return sum(_layer_bits(c) for c in layers) / len(layers)
    return _layer_bits(caches[0], spec)


def _layer_bits(cache, spec: CacheSpec | None = None) -> float:
    """Bits per cached element of one layer's cache (``spec`` for mlx-lm and exact rows)."""
    if spec is not None and spec.kind == EXACT:
        return 16.0
    if spec is not None and spec.kind == MLX_LM:
        return spec.bits + 2 * 16 / MLX_LM_GROUP
    key_bpe = cache.key_quantizer.bits_per_element
    value_bpe = cache.value_quantizer.bits_per_element
    n_comp, n_exact = cache.compressed_tokens, cache.offset - cache.compressed_tokens
    total = cache.offset or 1
    return (n_comp * (key_bpe + value_bpe) / 2 + n_exact * 16) / total


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _check(spec: CacheSpec) -> None:
    if spec.split not in (None, *SPLITS):
        raise ConfigError(f"{spec.label}: split={spec.split!r}; choose from {SPLITS}")
    if spec.split == "ratequant" and not spec.artifacts:
        raise ConfigError(f"{spec.label}: split=ratequant needs artifacts=DIR")
    if spec.split == "uniform" and spec.artifacts and not get(spec.method).needs_calibration:
        raise ConfigError(f"{spec.label}: artifacts=DIR would replace the uniform split")
    if spec.plan is not None:
        if spec.split or spec.artifacts or spec.options or spec.window or spec.value_bits:
            raise ConfigError(f"{spec.label}: a plan row takes no other settings")
        return
    if isinstance(spec.bits, float) and spec.split is None:
        raise ConfigError(f"{spec.label}: fractional bits need split=uniform or split=ratequant")
    if spec.method == MLX_LM:
        if spec.bits not in (2, 3, 4, 5, 6, 8):
            raise ConfigError(f"mlx_lm@{spec.bits}: mlx quantizes to 2, 3, 4, 5, 6 or 8 bits")
        if spec.options or spec.window or spec.value_bits or spec.value_method:
            raise ConfigError(f"{spec.label}: mlx_lm takes no settings")
        return
    if spec.method not in available():
        raise ConfigError(
            f"unknown method {spec.method!r}; choose from {', '.join(available())}, "
            f"{MLX_LM}, {EXACT}"
        )

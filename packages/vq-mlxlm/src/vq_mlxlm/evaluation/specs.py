"""What one row of the evaluation measures: a cache configuration, parsed from a string.

A spec is ``METHOD@BITS`` plus optional ``+key=value`` settings, e.g. ``turboquant_mse@3``,
``turboquant_mse@3+window=64``, ``turboquant_rvq@4+value_bits=3``,
``rabitq@2+rotation=hadamard``. ``METHOD`` is a registered vq method, ``mlx_lm`` (mlx-lm's
own ``QuantizedKVCache``, affine, group 64) or ``exact`` (mlx-lm's ``KVCache``: unquantized
keys and values in the model's compute dtype, float32 on MLX's CPU backend). ``window``,
``value_bits`` and ``value_method`` are cache settings; other keys go to the key method's
config. Bits per element are *accounted* with fp16 side data (norms, scales, biases) and
fp16 window tokens, as a GPU run holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import vq_algorithms  # noqa: F401  (registers the methods)
from vq_core import available, get

EXACT, MLX_LM = "exact", "mlx_lm"
MLX_LM_BITS = (8, 4, 2)
MLX_LM_GROUP = 64
MAIN_BITS = (2, 3, 4)
_CACHE_KEYS = ("window", "value_bits", "value_method", "sink", "center", "artifacts")


@dataclass(frozen=True)
class CacheSpec:
    method: str
    bits: int = 16
    window: int = 0
    value_bits: int | None = None
    value_method: str | None = None
    sink: int = 1
    center: int = 1
    artifacts: str | None = None
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

        if self.kind == "vq":
            patch(
                model,
                self.method,
                self.bits,
                value_method=self.value_method,
                value_bits=self.value_bits,
                window=self.window,
                sink=self.sink,
                center=bool(self.center),
                artifacts=self.artifacts,
                **dict(self.options),
            )
            try:
                return model.make_cache()
            finally:
                unpatch(model)
        caches = make_prompt_cache(unpatch(model))
        if self.kind == MLX_LM:
            caches = [
                QuantizedKVCache(group_size=MLX_LM_GROUP, bits=self.bits)
                if type(c) is KVCache
                else c
                for c in caches
            ]
        return caches


def parse_spec(text: str) -> CacheSpec:
    """``"turboquant_mse@3+window=64"`` -> :class:`CacheSpec`; raises ValueError."""
    head, *settings = text.strip().split("+")
    method, _, bits = head.partition("@")
    if method == EXACT:
        return CacheSpec(EXACT)
    if not bits:
        raise ValueError(f"spec {text!r} needs @BITS (e.g. {method}@4)")
    fields: dict = {}
    options = []
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"spec {text!r}: setting {item!r} is not key=value")
        parsed = _value(value)
        if key in _CACHE_KEYS:
            fields[key] = parsed
        else:
            options.append((key, parsed))
    spec = CacheSpec(method, int(bits), options=tuple(options), **fields)
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


def accounted_bits(spec: CacheSpec, cache) -> float:
    """Bits per cached element (keys and values averaged) of one layer's cache."""
    if spec.kind == EXACT:
        return 16.0
    if spec.kind == MLX_LM:
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
    if spec.method == MLX_LM:
        if spec.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"mlx_lm@{spec.bits}: mlx quantizes to 2, 3, 4, 5, 6 or 8 bits")
        if spec.options or spec.window or spec.value_bits or spec.value_method:
            raise ValueError(f"{spec.label}: mlx_lm takes no settings")
        return
    if spec.method not in available():
        raise ValueError(
            f"unknown method {spec.method!r}; choose from {', '.join(available())}, "
            f"{MLX_LM}, {EXACT}"
        )

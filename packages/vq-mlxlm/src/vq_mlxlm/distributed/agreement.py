"""Refuse at start a run whose ranks disagree on what they run.

Every rank hashes each setting that must be equal everywhere (the vq cache config with each
artifact file's checksum, the model's shape, the parallel layout, the prompt, the package
versions) to 4 bytes; one ``all_gather`` collects the ``[ranks, settings]`` table, and each
rank names the settings and ranks that differ from rank 0. A mismatch would otherwise run:
caches of different widths on different heads, or ranks decoding different prompts until a
collective's shapes disagree.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from vq_core import ConfigError

PACKAGES = ("mlx", "mlx-lm", "vq-core", "vq-kernels", "vq-algorithms", "vq-mlxlm")


def _digest(value: Any) -> int:
    text = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def artifact_checksums(directory: str | None) -> dict[str, str] | None:
    """sha256 of each file in an artifacts directory (paths may differ across hosts)."""
    if directory is None:
        return None
    root = Path(directory).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {str(p.relative_to(root) if root.is_dir() else p.name): _sha(p) for p in files}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_settings(model, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of a patched, sharded ``model`` that every rank must share."""
    from vq_mlxlm.distributed.layout import layout

    config = dict(getattr(model, "_vq_config", None) or {})
    if not config:
        raise ConfigError("patch the model (vq_mlxlm.patch) before checking settings")
    config["artifacts"] = artifact_checksums(config.get("artifacts"))
    spread = layout(model)
    args = getattr(model, "args", None)
    return {
        "vq cache": config,
        "model": {
            "type": getattr(model, "model_type", None),
            "layers": spread.layers,
            "kv_heads": spread.kv_heads,
            "hidden_size": getattr(args, "hidden_size", None),
            "vocab_size": getattr(args, "vocab_size", None),
        },
        "parallel": {"tensor": spread.tensor_size, "pipeline": spread.pipeline_size},
        "versions": versions(),
        **(extra or {}),
    }


def check_same_settings(group, settings: dict[str, Any]) -> None:
    """ConfigError on every rank unless all ranks of ``group`` hold equal ``settings``.

    Collective: every rank must call it with the same keys, in the same order.
    """
    import mlx.core as mx

    names = list(settings)
    mine = mx.array([_digest(settings[k]) for k in names], dtype=mx.uint32)
    table = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu).tolist()
    if len({len(row) for row in table}) != 1:
        raise ConfigError("vq settings differ across ranks (another number of settings)")
    differ = []
    for j, name in enumerate(names):
        ranks = [r for r, row in enumerate(table) if row[j] != table[0][j]]
        if ranks:
            differ.append(f"{name} (ranks {', '.join(map(str, ranks))} differ from rank 0)")
    if differ:
        raise ConfigError(
            "vq settings differ across ranks: " + "; ".join(differ) + ". Every rank must run "
            "the same cache flags, artifacts, model, prompt and package versions"
        )

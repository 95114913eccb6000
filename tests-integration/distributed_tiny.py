"""Run under ``vq launch`` (or alone): a tiny random llama (4 query / 2 KV heads) sharded
with vq_mlxlm.distributed.shard, patched, greedy tokens; rank 0 prints one JSON line.

``python distributed_tiny.py PARALLEL METHOD BITS`` (PARALLEL ``none`` runs unsharded).
"""

# ruff: noqa: E402  (the fast BLAS loads before MLX is first imported)
import json
import sys

from vq_mlxlm.fast_blas import enable_fast_blas

enable_fast_blas()

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step, generation_stream
from tiny_models import build

import vq_mlxlm
from vq_mlxlm import distributed

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19] * 4
TOKENS = 16


def main(parallel: str, method: str, bits: int) -> dict:
    group = mx.distributed.init()
    model = build("llama", seed=1)
    # 6x the weights (not the norms): greedy tokens vary instead of repeating one pair
    scaled = [(k, v * 6) for k, v in tree_flatten(model.parameters()) if "norm" not in k]
    model.update(tree_unflatten(scaled))
    if parallel != "none":
        model = distributed.shard(model, group, parallel)
    vq_mlxlm.patch(model, method, bits)
    cache = model.make_cache()
    with distributed.Watchdog(60, group.rank(), "distributed_tiny"):
        distributed.check_same_settings(group, distributed.run_settings(model))
        steps = generate_step(mx.array(PROMPT), model, prompt_cache=cache, max_tokens=TOKENS)
        tokens = [t for t, _ in steps]
        mx.synchronize(generation_stream)  # its last, unused step's collectives end first
        mine = mx.array([[sum(c.nbytes for c in cache)]], dtype=mx.int64)
        per_rank = mx.distributed.all_gather(mine, group=group, stream=mx.cpu).reshape(-1)
    return {"tokens": tokens, "cache_bytes": per_rank.tolist(), "rank": group.rank()}


if __name__ == "__main__":
    out = main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    if out["rank"] == 0:
        print(json.dumps(out), flush=True)

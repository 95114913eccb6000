"""vq_mlxlm.distributed in one process: shard layouts, the llama->qwen2 pipeline host, and
patch() giving each shard the settings of its global layers and heads.

A stand-in group (rank/size only) drives mlx-lm's own ``model.shard`` and
``model.model.pipeline``, which only read ``group.rank()``/``group.size()`` until the model
runs; the multi-process runs are in test_distributed_launch.py.
"""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from tiny_models import build

import vq_mlxlm
from vq_core import ConfigError
from vq_mlxlm.distributed import layout, shard
from vq_mlxlm.distributed.llama_pipeline import as_qwen2


class Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _llama(layers=6, seed=0):
    from tiny_models import COMMON

    saved = dict(COMMON)
    COMMON["num_hidden_layers"] = layers
    try:
        model = build("llama", seed=seed)
    finally:
        COMMON.clear()
        COMMON.update(saved)
    return model


def _tokens(model, n=10):
    prompt = mx.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38] * 4)
    cache = model.make_cache()
    out = [t for t, _ in generate_step(prompt, model, prompt_cache=cache, max_tokens=n)]
    return out, cache


def test_as_qwen2_computes_the_llama_function_exactly():
    llama = _llama()
    host = as_qwen2(llama)
    assert hasattr(host.model, "pipeline") and host.model_type == "llama"
    x = mx.array([[5, 7, 11, 13, 17]])
    assert mx.array_equal(llama(x), host(x)).item()


def test_as_qwen2_keeps_quantized_layers_quantized():
    import mlx.nn as nn

    llama = _llama()
    nn.quantize(llama, group_size=32, bits=4)
    host = as_qwen2(llama)
    assert isinstance(host.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    x = mx.array([[5, 7, 11, 13, 17]])
    assert mx.array_equal(llama(x), host(x)).item()


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_one_rank_shard_generates_the_unsharded_tokens(parallel):
    ref = vq_mlxlm.patch(_llama(), "turboquant_mse", 4)
    want, ref_cache = _tokens(ref)
    one = vq_mlxlm.patch(shard(_llama(), mx.distributed.init(), parallel), "turboquant_mse", 4)
    got, cache = _tokens(one)
    assert got == want
    assert sum(c.nbytes for c in cache) == sum(c.nbytes for c in ref_cache)


def test_pipeline_stage_caches_take_their_global_layers_settings():
    bits = [2, 3, 4, 2, 3, 4]
    stage = shard(_llama(), Group(0, 2), "pipeline")  # rank 0 runs the last layers
    spread = layout(stage)
    assert (spread.first_layer, spread.local_layers, spread.layers) == (3, 3, 6)
    vq_mlxlm.patch(stage, "turboquant_mse", bits)
    caches = stage.make_cache()
    assert len(caches) == 3
    assert [c.key_quantizer.config.bits for c in caches] == bits[3:]
    seeds = [c.key_quantizer.config.seed for c in caches]
    assert seeds == [1000 * i for i in range(3, 6)]  # the single-process seeds of layers 3-5


def test_tensor_shard_holds_its_heads():
    model = shard(_llama(), Group(1, 2), "tensor")  # tiny llama: 4 query / 2 KV heads
    spread = layout(model)
    assert (spread.first_kv_head, spread.local_kv_heads, spread.kv_heads) == (1, 1, 2)
    assert all(layer.self_attn.n_kv_heads == 1 for layer in model.layers)


def test_shard_refuses_heads_that_do_not_divide_and_unknown_modes():
    with pytest.raises(ConfigError, match="3 ranks: layer 0 has 4 query heads"):
        shard(_llama(), Group(0, 3), "tensor")
    with pytest.raises(ConfigError, match="parallel='sideways' is not allowed"):
        shard(_llama(), Group(0, 2), "sideways")
    with pytest.raises(ConfigError, match=r"before vq_mlxlm\.patch"):
        shard(vq_mlxlm.patch(_llama(), "turboquant_mse", 4), Group(0, 2), "tensor")


def test_tensor_and_pipeline_on_a_backend_without_split_is_refused():
    class NoSplit(Group):
        def split(self, *_):
            raise RuntimeError("[ring] Group split not supported.")

    with pytest.raises(ConfigError, match=r"needs group\.split"):
        shard(_llama(), NoSplit(0, 4), "tensor+pipeline", tensor_size=2)


def test_per_head_codebooks_are_cut_to_the_shards_heads():
    from vq_algorithms.comm_vq import CommVQ, CommVQConfig
    from vq_mlxlm.layer_caches import _head_slice

    config = CommVQConfig(head_dim=64, bits=2, table_bits=2, untrained=True)
    tables = mx.random.normal((3, config.stages, config.table_size, 32, 2))
    q = CommVQ(config, tables=tables)
    part = _head_slice(q, (1, 1, 3))
    assert part.heads == 1 and mx.array_equal(part.tables, tables[1:2]).item()
    assert _head_slice(q, (0, 3, 3)) is q
    with pytest.raises(ConfigError, match="3 KV heads, model has 6"):
        _head_slice(q, (0, 3, 6))

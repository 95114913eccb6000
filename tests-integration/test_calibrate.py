"""Calibrate every method on a tiny random mlx-lm model, then run the model on the artifacts."""

import mlx.core as mx
import pytest
from tiny_models import build

from vq_calibrate import load_allocation
from vq_core import ArtifactError, CompressedKVCache, create
from vq_mlxlm.calibration import calibrate
from vq_mlxlm.model_shape import original_caches as fresh_caches
from vq_mlxlm.routing import route


class ByteTokenizer:
    """Enough of a tokenizer for calibration: bytes modulo the tiny vocabulary."""

    def encode(self, text):
        return [b % 97 for b in text.encode()]


@pytest.fixture(scope="module")
def tiny():
    return build("llama"), ByteTokenizer()


def _run(model, caches):
    tokens = mx.array([[i % 97 for i in range(48)]])
    model(tokens[:, :32], cache=caches)
    out = model(tokens[:, 32:], cache=caches)
    mx.eval(out)
    return out


@pytest.mark.parametrize(("method", "bits"), [("spectral", 2), ("vecinfer", 2)])
def test_calibrate_and_use(tmp_path, tiny, method, bits):
    path = calibrate(tiny, method, bits, out=tmp_path, progress=False, n_sequences=3,
                     seq_len=64, max_samples=512)  # fmt: skip
    assert path == tmp_path / f"{method}.safetensors"
    route()
    model = tiny[0]
    caches = fresh_caches(model)
    for i in range(len(model.layers)):
        k = create(method, head_dim=64, bits=bits, artifact=str(tmp_path), layer=i, kind="k")
        v = create(method, head_dim=64, bits=bits, artifact=str(tmp_path), layer=i, kind="v")
        caches[i] = CompressedKVCache(k, v)
    exact = _run(model, fresh_caches(model))
    out = _run(model, caches)
    assert mx.isfinite(out).all().item()
    assert mx.abs(out - exact).max().item() < 10 * mx.abs(exact).max().item()
    with pytest.raises(ArtifactError, match="layer=2 is out of range"):
        create(method, head_dim=64, bits=bits, artifact=str(tmp_path), layer=2)


def test_ratequant_allocation(tmp_path, tiny):
    calibrate(tiny, "ratequant", 2.5, out=tmp_path, progress=False, n_sequences=2, seq_len=64,
              probe_sequences=1)  # fmt: skip
    alloc = load_allocation(str(tmp_path))
    assert len(alloc) == 2 and sum(alloc) == 5
    from mlx_lm.models.cache import make_prompt_cache

    from vq_mlxlm import patch

    model = patch(build("llama"), "turboquant_mse", 4, artifacts=str(tmp_path))
    assert [c.key_quantizer.config.bits for c in make_prompt_cache(model)] == alloc
    with pytest.raises(ValueError, match="probed for 'turboquant_mse', not 'rabitq'"):
        patch(build("llama"), "rabitq", 4, artifacts=str(tmp_path))
    with pytest.raises(ArtifactError, match="another model"):
        load_allocation(str(tmp_path), {"layers": 30})


def test_patch_with_artifacts_and_mismatch(tmp_path, tiny):
    from mlx_lm.models.cache import make_prompt_cache

    from vq_mlxlm import patch

    calibrate(tiny, "spectral", 2, out=tmp_path, progress=False, n_sequences=3, seq_len=64,
              max_samples=512)  # fmt: skip
    model = patch(build("llama"), "spectral", 2, artifacts=str(tmp_path))
    caches = make_prompt_cache(model)
    assert [c.key_quantizer.config.layer for c in caches] == [0, 1]
    assert {c.value_quantizer.config.kind for c in caches} == {"v"}
    assert mx.isfinite(_run(model, caches)).all().item()
    with pytest.raises(ArtifactError, match="another model"):
        patch(build("qwen2"), "spectral", 2, artifacts=str(tmp_path))


def test_comm_vq_calibrate_patch_generate_and_rope_mismatch(tmp_path, tiny):
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    from vq_mlxlm import patch

    calibrate(tiny, "comm_vq", 2, out=tmp_path, progress=False, n_sequences=3, seq_len=64,
              head_samples=256, table_bits=3)  # fmt: skip
    model = patch(build("llama"), "comm_vq", 2, artifacts=str(tmp_path), block=1)
    caches = make_prompt_cache(model)
    keys = [c.key_quantizer for c in caches]
    assert all(k.position_aware and k.config.table_bits == 3 for k in keys)
    assert {c.value_quantizer.method for c in caches} == {"turboquant_mse"}
    out = _run(model, caches)
    exact = _run(model, fresh_caches(model))
    assert caches[0].compressed_tokens == 47  # sink 1, everything else compressed
    err = mx.abs(out - exact).max().item()
    assert 0 < err < 0.5 * mx.abs(exact).max().item()
    # prompt-cache save/load keeps every token's position: it continues identically
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    save_prompt_cache(str(tmp_path / "c.safetensors"), caches)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    nxt = mx.array([[7, 8, 9]])
    a, b = model(nxt, cache=caches), model(nxt, cache=loaded)
    assert mx.array_equal(a, b).item()
    shifted = build("llama")
    shifted.layers[1].self_attn.rope = nn.RoPE(64, base=500.0)
    with pytest.raises(ArtifactError, match="layer 1 was calibrated with another RoPE"):
        patch(shifted, "comm_vq", 2, artifacts=str(tmp_path))

"""BatchCompressedKVCache: a ragged batch attends exactly as each sequence's own cache does,
and merge -> filter -> extend -> extract gives back each sequence's cache bit for bit."""

import copy

import mlx.core as mx
import pytest

from vq_core import (
    BatchCompressedKVCache,
    CompressedKVCache,
    ConfigError,
    NonFiniteError,
    ShapeError,
    attend,
    attention,
    create,
)

LENS = [5, 40, 77]  # one row below a block, one with a partial block, one with several


def _cache(method="toy_uniform", value_method="toy_uniform", window=3, sink=1, block=8):
    k = create(method, head_dim=64, bits=8)
    v = create(value_method, head_dim=64, bits=8, seed=1)
    return CompressedKVCache(k, v, window=window, sink=sink, center=True, block=block, step=16)


def _seq(n, seed):
    a, b = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, 2, n, 64), key=a), mx.random.normal((1, 2, n, 64), key=b)


def _right_padded(parts, lens):
    width = max(lens)
    pad = [(0, 0), (0, 0), (0, 0), (0, 0)]
    rows = []
    for x, n in zip(parts, lens, strict=True):
        pad[2] = (0, width - n)
        rows.append(mx.pad(x[:, :, :n], pad) + 0.0)
    return mx.concatenate(rows)


def _states_equal(a, b):
    sa, sb = a.state, b.state
    assert sorted(sa) == sorted(sb)
    for name in sa:
        if name == "meta":
            assert sa[name] == sb[name]
        else:
            assert mx.array_equal(sa[name], sb[name]).item(), name


def _run(kwargs, steps=12, gqa=3, atol=1e-5):
    """Prefill LENS as mlx-lm's BatchGenerator does (one right-padded chunk into merged empty
    caches), then decode; every row must match its own single cache at every step."""
    seqs = [_seq(n + steps, i) for i, n in enumerate(LENS)]
    singles = [_cache(**kwargs) for _ in LENS]
    batch = CompressedKVCache.merge([_cache(**kwargs) for _ in LENS])
    width = max(LENS)
    batch.prepare(lengths=LENS, right_padding=[width - n for n in LENS])
    q = mx.random.normal((3, 2 * gqa, width, 64), key=mx.random.key(5))
    keys = _right_padded([k for k, _ in seqs], LENS)
    values = _right_padded([v for _, v in seqs], LENS)
    out = attend(q, *batch.update_and_fetch(keys, values), scale=0.125, mask="causal")
    batch.finalize()
    for i, (c, (k, v), n) in enumerate(zip(singles, seqs, LENS, strict=True)):
        want = attend(q[i : i + 1, :, :n], *c.update_and_fetch(k[:, :, :n], v[:, :, :n]),
                      scale=0.125, mask="causal")  # fmt: skip
        assert mx.allclose(out[i : i + 1, :, :n], want, atol=atol).item()
    assert batch.lengths() == LENS and batch.offset.tolist() == LENS
    for step in range(steps):
        nk = mx.concatenate(
            [k[:, :, n + step : n + step + 1] for (k, _), n in zip(seqs, LENS, strict=True)]
        )
        nv = mx.concatenate(
            [v[:, :, n + step : n + step + 1] for (_, v), n in zip(seqs, LENS, strict=True)]
        )
        q1 = mx.random.normal((3, 2 * gqa, 1, 64), key=mx.random.key(100 + step))
        out = attend(q1, *batch.update_and_fetch(nk, nv), scale=0.125)
        for i, c in enumerate(singles):
            want = attend(q1[i : i + 1], *c.update_and_fetch(nk[i : i + 1], nv[i : i + 1]),
                          scale=0.125)  # fmt: skip
            assert mx.allclose(out[i : i + 1], want, atol=atol).item(), (step, i)
    for i, c in enumerate(singles):
        assert batch._n_comp[i] == c.compressed_tokens
        _states_equal(batch.extract(i), c)
    return batch, singles


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"window": 0, "sink": 0},
        {"sink": 4, "block": 4},
        {"method": "toy_block", "value_method": "toy_block"},  # 4-token blocks
        {"method": "toy_positional"},  # compressed token i must be at position sink + i
    ],
)
def test_ragged_batch_attends_as_each_sequence_alone(kwargs):
    batch, _ = _run(kwargs)
    assert len(set(batch._n_comp)) > 1  # the rows really are ragged in compressed tokens


def test_a_kernel_that_cannot_take_per_row_lengths_falls_back_to_the_reference():
    _run({"method": "toy_fused"})  # its stand-in kernel returns None when lengths are set


@pytest.mark.parametrize("gpu_path", [False, True])
def test_prefill_chunk_after_history_masks_each_rows_padding(gpu_path, monkeypatch):
    """A second ragged chunk (mlx-lm prompt segments) over compressed history; with
    ``gpu_path`` through the GPU's route (decoded history + one masked fused SDPA)."""
    monkeypatch.setattr(attention, "_prefill_on_sdpa", lambda: gpu_path)
    seqs = [_seq(n + 30, i) for i, n in enumerate(LENS)]
    caches = []
    for (k, v), n in zip(seqs, LENS, strict=True):
        c = _cache()
        c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        caches.append(c)
    batch = CompressedKVCache.merge(copy.deepcopy(caches))
    more = [3, 30, 11]
    batch.prepare(lengths=more, right_padding=[30 - m for m in more])
    q = mx.random.normal((3, 4, 30, 64), key=mx.random.key(7))
    keys = _right_padded([k[:, :, n:] for (k, _), n in zip(seqs, LENS, strict=True)], more)
    values = _right_padded([v[:, :, n:] for (_, v), n in zip(seqs, LENS, strict=True)], more)
    out = attend(q, *batch.update_and_fetch(keys, values), scale=0.125, mask="causal")
    batch.finalize()
    for i, (c, (k, v), n, m) in enumerate(zip(caches, seqs, LENS, more, strict=True)):
        view = c.update_and_fetch(k[:, :, n : n + m], v[:, :, n : n + m])
        want = attend(q[i : i + 1, :, :m], *view, scale=0.125, mask="causal")
        assert mx.allclose(out[i : i + 1, :, :m], want, atol=1e-5).item()
        _states_equal(batch.extract(i), c)


def test_merge_filter_extend_extract_round_trips():
    caches = []
    for i, n in enumerate([0, 1, 9, 40, 77]):
        c = _cache()
        if n:
            c.update_and_fetch(*_seq(n, i))
        caches.append(c)
    a = CompressedKVCache.merge(caches[:3])
    b = CompressedKVCache.merge(caches[3:])
    assert isinstance(a, BatchCompressedKVCache) and a.batch_size == 3
    a.extend(b)
    assert a.lengths() == [0, 1, 9, 40, 77]
    for i, c in enumerate(caches):
        _states_equal(a.extract(i), c)
    a.filter([4, 2])
    assert a.lengths() == [77, 9]
    _states_equal(a.extract(0), caches[4])
    _states_equal(a.extract(1), caches[2])
    held = a.nbytes
    a.filter([1])  # the 77-token row leaves: its capacity and exact columns go with it
    assert a.nbytes < held / 3
    _states_equal(a.extract(0), caches[2])
    twin = copy.deepcopy(a)
    a.update_and_fetch(*_seq(1, 9))
    assert twin.lengths() == [9] and a.lengths() == [10]
    _states_equal(twin.extract(0), caches[2])  # the copy did not see the write


def test_an_extracted_row_holds_no_batch_buffer():
    batch = CompressedKVCache.merge([_cache() for _ in range(8)])
    batch.update_and_fetch(*(mx.concatenate([x] * 8) for x in _seq(600, 0)))
    mx.eval(batch.state)
    row = batch.extract(3)
    mx.eval(row.state)
    before = mx.get_active_memory()
    del batch
    assert mx.get_active_memory() < before - 7 * row.nbytes  # the batch's buffers were freed


def test_a_non_finite_row_poisons_only_itself():
    batch = CompressedKVCache.merge([_cache(), _cache()])
    k, v = (mx.concatenate([x, x]) for x in _seq(20, 0))
    k = k.at[1, 0, 4, 3].add(mx.nan)
    batch.update_and_fetch(k, v)
    out = attend(mx.ones((2, 2, 1, 64)), *batch.update_and_fetch(*_seq_pair()), scale=0.1)
    assert not mx.isnan(out[0]).any().item() and mx.isnan(out[1]).all().item()
    batch.extract(0).state  # noqa: B018  (fine)
    with pytest.raises(NonFiniteError):
        batch.extract(1).state  # noqa: B018


def _seq_pair():
    k, v = _seq(1, 3)
    return mx.concatenate([k, k]), mx.concatenate([v, v])


def test_bad_input_is_refused_by_name():
    batch = CompressedKVCache.merge([_cache(), _cache()])
    with pytest.raises(ShapeError, match="rows"):
        batch.update_and_fetch(*_seq(3, 0))
    with pytest.raises(ShapeError, match="row 2"):
        batch.extract(2)
    with pytest.raises(ConfigError, match="share"):
        CompressedKVCache.merge([_cache(), _cache(window=5)])
    with pytest.raises(ShapeError, match="left padding"):
        batch.prepare(left_padding=[1, 0])
    with pytest.raises(ConfigError, match="sliding-window"):
        batch.make_mask(4, window_size=2)
    assert batch.make_mask(1) is None and batch.make_mask(4) == "causal"

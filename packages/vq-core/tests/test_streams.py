"""Random streams: the named keys of one seed are distinct, and the old ones are unchanged."""

import itertools

import mlx.core as mx
import pytest

from vq_core import STREAMS, ConfigError, stream_key


def test_streams_of_a_seed_are_distinct_and_no_seeds_own_rounding_key():
    for seed in (0, 1, 7919, 2**32 - 1):
        keys = {s: stream_key(seed, s) for s in STREAMS}
        for a, b in itertools.combinations(STREAMS, 2):
            assert not mx.array_equal(keys[a], keys[b]).item(), (seed, a, b)
    rounding = stream_key(5, "rounding")
    for seed in range(64):
        for s in ("sketch", "rotation", "codebook"):
            assert not mx.array_equal(rounding, stream_key(seed, s)).item()


def test_the_kept_derivations():
    k = mx.random.key(11)
    assert mx.array_equal(stream_key(11, "codebook"), k).item()
    assert mx.array_equal(stream_key(11, "sketch"), mx.random.split(k)[0]).item()
    assert mx.array_equal(stream_key(11, "rotation"), mx.random.split(k)[1]).item()


@pytest.mark.parametrize(("seed", "stream"), [(-1, "rotation"), (1.0, "sketch"), (0, "nope")])
def test_bad_arguments(seed, stream):
    with pytest.raises(ConfigError):
        stream_key(seed, stream)

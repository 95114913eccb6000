"""mlx-lm's BatchGenerator over vq caches on the default model: a ragged batch generates the
same greedy tokens, with the same log-probabilities within float tolerance, as each prompt
run alone through the model with its own single-sequence cache."""

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from vq_core import BatchCompressedKVCache
from vq_mlxlm import patch
from vq_mlxlm.default_model import load_default_model

STEPS = 6
PROMPTS = [
    "The capital of France is",
    "Write a story about a dragon who guards gold in the mountains. Once upon a time,",
    ", ".join(str(i) for i in range(1, 40)) + ",",  # ~120 tokens: three compressed blocks
]


@pytest.fixture(scope="module")
def model_and_tokens():
    model, tokenizer = load_default_model()
    patch(model, "turboquant_mse", 4)
    return model, [tokenizer.encode(p) for p in PROMPTS]


def _alone(model, tokens):
    """As BatchGenerator schedules it: the prompt but its last token, then that token."""
    cache = make_prompt_cache(model)
    model(mx.array(tokens[:-1])[None], cache=cache)
    logits = model(mx.array(tokens[-1:])[None], cache=cache)[0, -1]
    out = []
    for _ in range(STEPS):
        logprobs = logits - mx.logsumexp(logits)
        token = int(mx.argmax(logprobs).item())
        out.append((token, logprobs))
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out


def test_ragged_batch_matches_each_prompt_alone(model_and_tokens):
    model, prompts = model_and_tokens
    assert len({len(p) for p in prompts}) == 3 and max(map(len, prompts)) > 100
    gen = BatchGenerator(model, max_tokens=STEPS)
    uids = gen.insert(prompts)
    got = {u: [] for u in uids}
    seen_batch = False
    while responses := gen.next_generated():
        caches = gen._generation_batch.prompt_cache
        seen_batch |= any(
            isinstance(c, BatchCompressedKVCache) and c.batch_size == 3 for c in caches
        )
        for r in responses:
            got[r.uid].append((r.token, r.logprobs))
    assert seen_batch  # all three decoded together in one compressed batch
    for uid, tokens in zip(uids, prompts, strict=True):
        want = _alone(model, tokens)
        assert [t for t, _ in got[uid]] == [t for t, _ in want]
        for (_, a), (_, b) in zip(got[uid], want, strict=True):
            assert mx.abs(a - b).max().item() < 1e-3

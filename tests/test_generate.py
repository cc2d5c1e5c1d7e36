"""Generation: the KV cache changes the cost, never the tokens; sampling filters and seeds behave as documented.

python -m pytest tests/test_generate.py -q
"""

import pytest
import torch

from conftest import random_hf_model, tiny_config
from gpt2lite.cli import InputError
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE
from train_gpt2 import GPT, sample_next_token


@pytest.fixture(scope="module")
def hf_and_ours():
    config = tiny_config(n_embd=64, n_head=4, block_size=128, vocab_size=256)
    hf_model = random_hf_model(config, seed=1, init_std=0.2)
    hf_model.generation_config.eos_token_id = None  # never stop early: compare all 64 tokens
    hf_model.generation_config.pad_token_id = 0
    model = GPT(config)
    model.load_hf_state_dict(hf_model.state_dict())
    return hf_model, model.eval()


def test_greedy_with_cache_equals_without_cache_and_transformers(hf_and_ours):
    hf_model, model = hf_and_ours
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 64, temperature=0)
    uncached = model.generate(prompt, 64, temperature=0, use_cache=False)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=64)
    assert cached.shape == (3, 9 + 64)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)
    assert all(len(set(row[9:].tolist())) > 10 for row in cached), "a degenerate continuation would prove little"


def test_sampling_with_cache_equals_without_cache(hf_and_ours):
    _, model = hf_and_ours
    prompt = torch.randint(0, 256, (2, 5))
    settings = dict(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    assert torch.equal(model.generate(prompt, 40, **settings), model.generate(prompt, 40, use_cache=False, **settings))


def test_each_new_token_costs_one_position(hf_and_ours):
    _, model = hf_and_ours
    seen_lengths = []
    hook = model.transformer.wte.register_forward_hook(lambda module, args, out: seen_lengths.append(args[0].size(1)))
    try:
        model.generate(torch.randint(0, 256, (2, 20)), 10, seed=0)
    finally:
        hook.remove()
    assert seen_lengths == [20] + [1] * 9  # the prompt once, then one position per step


def test_same_seed_same_samples_and_global_rng_untouched(hf_and_ours):
    _, model = hf_and_ours
    prompt = torch.randint(0, 256, (4, 3))
    rng_before = torch.get_rng_state()
    a = model.generate(prompt, 30, seed=7)
    b = model.generate(prompt, 30, seed=7)
    c = model.generate(prompt, 30, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_past_block_size_equals_the_uncached_sliding_window():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16)).eval()
    prompt = torch.randint(0, 64, (2, 10))
    for settings in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        cached = model.generate(prompt, 40, **settings)  # reaches block_size after 6 tokens
        uncached = model.generate(prompt, 40, use_cache=False, **settings)
        assert cached.shape == (2, 50)
        assert torch.equal(cached, uncached)


def test_prompt_longer_than_block_size_keeps_its_last_block_size_tokens():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16)).eval()
    prompt = torch.randint(0, 64, (1, 40))
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (1, 45)
    assert torch.equal(out[:, :40], prompt)
    assert torch.equal(out[:, 40:], model.generate(prompt[:, -16:], 5, temperature=0)[:, 16:])


def test_top_k_1_and_tiny_top_p_are_greedy(hf_and_ours):
    _, model = hf_and_ours
    prompt = torch.randint(0, 256, (2, 4))
    greedy = model.generate(prompt, 20, temperature=0)
    assert torch.equal(model.generate(prompt, 20, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(prompt, 20, top_p=1e-6, seed=0), greedy)


def draw(logits: list[float], n: int = 4000, **settings) -> torch.Tensor:
    """n independent draws of the next token from one row of logits."""
    generator = torch.Generator().manual_seed(0)
    row = torch.tensor([logits]).expand(n, -1)  # (n, V)
    settings = dict(temperature=1.0, top_k=None, top_p=None) | settings
    return sample_next_token(row, generator=generator, **settings).squeeze(1)


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = [2.0, 1.0, 0.0, -1.0]
    for temperature in (1.0, 0.5):
        counts = torch.bincount(draw(logits, n=20000, temperature=temperature), minlength=4).float()
        expected = torch.softmax(torch.tensor(logits) / temperature, dim=0)
        torch.testing.assert_close(counts / counts.sum(), expected, rtol=0, atol=0.015)


def test_top_k_draws_only_the_k_most_likely():
    logits = [0.1, 3.0, -2.0, 2.5, 0.0, 2.9]
    assert set(draw(logits, top_k=3).tolist()) == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().tolist()
    assert set(draw(logits, top_p=0.75).tolist()) == {0, 1}
    assert set(draw(logits, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(draw(logits, top_p=1.0).tolist()) == {0, 1, 2, 3}
    assert set(draw(logits, top_k=2, top_p=0.99).tolist()) == {0, 1}


def test_padded_vocabulary_rows_are_never_drawn():
    logits = torch.zeros(1, 50304)
    logits[0, GPT2_VOCAB_SIZE:] = 100.0  # the model would love them, but they are no token
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, 0, None, None, generator).item() < GPT2_VOCAB_SIZE
    assert sample_next_token(logits, 1.0, 5, None, generator).item() < GPT2_VOCAB_SIZE


def test_generation_under_bf16_autocast(hf_and_ours):
    _, model = hf_and_ours
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.randint(0, 256, (2, 4)), 8, seed=0)
    assert out.shape == (2, 12)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(temperature=-0.5), "temperature must be 0"),
        (dict(top_k=0), "top_k must be at least 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_refused(hf_and_ours, settings, message):
    _, model = hf_and_ours
    settings = dict(max_new_tokens=4) | settings
    with pytest.raises(InputError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **settings)


def test_a_filled_cache_takes_one_token_at_a_time(hf_and_ours):
    _, model = hf_and_ours
    cache = model.new_kv_cache(1, "cpu")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one new token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_the_cpu_decode_route_is_swapped_in_for_each_model_call_of_generation_only(hf_and_ours):
    """The model's classes are plain nn.Linear; only inside generation's model calls on a CPU do they take the
    W @ x^T route, so a paused generation leaves the model as it found it, and so do two at once."""
    import torch.nn as nn

    from gpt2lite.cpu_decode import Linear

    _, model = hf_and_ours
    kinds = lambda: {type(m) for m in model.modules() if isinstance(m, nn.Linear)}  # noqa: E731
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(type(module)))
    try:
        assert kinds() == {nn.Linear}
        first, second = (model.stream(torch.randint(0, 256, (1, 5)), 3, seed=s) for s in (0, 1))
        next(first), next(second)
        assert kinds() == {nn.Linear}, "between the steps of a paused generation"
        list(first), list(second)
    finally:
        hook.remove()
    assert kinds() == {nn.Linear} and seen == [Linear] * 6

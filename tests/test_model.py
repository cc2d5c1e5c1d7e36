"""The model itself: GPT-2 124M's exact size, GPT-2's initialisation, a sane loss at init, causality, learning.

python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch

from conftest import tiny_config
from gpt2lite.cli import InputError
from gpt2lite.cpu_decode import Linear
from train_gpt2 import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt2_124m() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50304)).eval()  # the seed's padded vocabulary


def test_124m_parameter_count_with_padded_vocab(gpt2_124m):
    params = list(gpt2_124m.parameters())  # lm_head shares wte's tensor, so it is counted once
    assert len(params) == 148
    assert sum(p.numel() for p in params) == 124_475_904


def test_124m_parameter_count_with_gpt2_vocab():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_fresh_124m_loss_is_about_ln_vocab(gpt2_124m):
    torch.manual_seed(1)
    tokens = torch.randint(0, 50257, (2, 129))
    with torch.no_grad():
        _, loss = gpt2_124m(tokens[:, :-1], tokens[:, 1:])
    assert 10.6 <= loss.item() <= 11.2, f"loss at init {loss.item():.3f}, expected about ln(50257) = 10.82"


def test_gpt2_initialisation(gpt2_124m):
    state = gpt2_124m.state_dict()
    residual_std = 0.02 / math.sqrt(2 * 12)
    assert state["transformer.h.3.attn.c_proj.weight"].std().item() == pytest.approx(residual_std, rel=0.02)
    assert state["transformer.h.3.mlp.c_proj.weight"].std().item() == pytest.approx(residual_std, rel=0.02)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.3.attn.c_attn.weight",
                 "transformer.h.3.mlp.c_fc.weight"):
        assert state[name].std().item() == pytest.approx(0.02, rel=0.02), name
    assert all(state[name].abs().max() == 0 for name in state if name.endswith(".bias") and ".ln_" not in name)
    assert torch.all(state["transformer.ln_f.weight"] == 1)


def test_lm_head_is_tied_to_token_embedding(gpt2_124m):
    assert gpt2_124m.lm_head.weight is gpt2_124m.transformer.wte.weight


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 64
    with torch.no_grad():
        logits_a, _ = model(a)
        logits_b, _ = model(b)
    torch.testing.assert_close(logits_a[:, :10], logits_b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    tokens = torch.randint(0, 64, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"a 2-layer model should memorise 64 tokens, loss still {loss.item():.3f}"


def test_config_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(InputError, match="multiple of n_head"):
        GPTConfig(n_embd=100, n_head=3)


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(tiny_config())
    with pytest.raises(InputError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_computes_what_nn_linear_computes(bias):
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    for shape in [(1, 48), (1, 1, 48), (2, 1, 48), (3, 2, 48), (6, 48), (7, 48), (4, 5, 48)]:  # both routes
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert y.shape == expected.shape and y.is_contiguous()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x)
        (expected_grad_x,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(grad_x, expected_grad_x, rtol=1e-5, atol=1e-6)

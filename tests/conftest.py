"""Shared test helpers: tiny configs, a random Hugging Face GPT-2 standing in for OpenAI's, and the shared data.

Run the suite with `python -m pytest tests -q`. Nothing here touches the network.
"""

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE
from train_gpt2 import GPTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

hf_logging.set_verbosity_error()  # a tiny vocabulary makes transformers warn that token 50256 is out of range
hf_logging.disable_progress_bar()


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    settings.update(overrides)
    return GPTConfig(**settings)


def random_hf_model(config: GPTConfig, seed: int = 0, init_std: float = 0.02) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel with transformers' own random initialisation: the stand-in for OpenAI's weights.
    A larger init_std gives peakier logits, so that greedy decoding does not just repeat one token."""
    torch.manual_seed(seed)
    hf_config = GPT2Config(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        n_positions=config.block_size, vocab_size=config.vocab_size, initializer_range=init_std,
    )  # fmt: skip
    return GPT2LMHeadModel(hf_config).eval()


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: real-text tests need ../shared/data (CI has it, a user's clone does not)")
    return path


@pytest.fixture(scope="session")
def gpt2_vocab_hf_dir(tmp_path_factory) -> Path:
    """A save_pretrained directory of a small random GPT-2 with GPT-2's real vocabulary and tokenizer files."""
    from train_gpt2 import GPT

    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT(tiny_config(block_size=64, vocab_size=GPT2_VOCAB_SIZE)).save_pretrained(str(path))
    return path

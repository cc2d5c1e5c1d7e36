"""sample.py as a user runs it: continuations from a Hugging Face folder or a checkpoint, and one clear line for
every bad input (checked in a real subprocess, so a traceback could not hide).

python -m pytest tests/test_sample_cli.py -q
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import sample
from conftest import REPO, tiny_config
from gpt2lite.checkpoints import save_checkpoint
from train_gpt2 import GPT, get_tokenizer, load_model


def run_sample(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def test_five_samples_from_a_hugging_face_folder(gpt2_vocab_hf_dir):
    result = run_sample("--init-from", str(gpt2_vocab_hf_dir), "--prompt", "Hello World ! I'm LLM",
                        "--num-samples", "5", "--max-new-tokens", "32", "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    samples = [s for s in result.stdout.split("-" * 80 + "\n") if s.strip()]
    assert len(samples) == 5
    assert all(s.startswith("Hello World ! I'm LLM") for s in samples)
    assert "seed 1" in result.stderr


def test_one_sample_streams_the_same_text_generate_returns(gpt2_vocab_hf_dir, capsys):
    prompt = "The meaning of life is"
    sample.main(["--init-from", str(gpt2_vocab_hf_dir), "--prompt", prompt, "--max-new-tokens", "20",
                 "--seed", "3", "--top-p", "0.9"])
    streamed = capsys.readouterr().out
    model = load_model(str(gpt2_vocab_hf_dir)).eval()
    enc = get_tokenizer()
    out = model.generate(torch.tensor([enc.encode_ordinary(prompt)]), 20, top_k=50, top_p=0.9, seed=3)
    assert streamed == enc.decode(out[0].tolist()) + "\n"


def test_samples_from_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "ckpt.pt"), GPT(tiny_config(vocab_size=50304, block_size=32)), step=10)
    result = run_sample("--init-from", str(tmp_path / "ckpt.pt"), "--max-new-tokens", "40", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    prompt = "Hello, I'm a language model,"  # sample.py's default: 8 tokens, so 40 more run past block_size 32
    assert result.stdout.startswith(prompt)
    assert len(get_tokenizer().encode(result.stdout, allowed_special="all")) >= 8 + 40 - 2  # BPE may merge a few


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--init-from", "gpt-5"], {}, "unknown model 'gpt-5': use one of gpt2, gpt2-medium"),
        (["--init-from", "gpt2"], {"HF_HUB_OFFLINE": "1"}, r"could not download.*`python export\.py gpt2 DIR`"),
        (["--init-from", "EMPTY_DIR"], {}, "holds no GPT-2"),
        (["--prompt", ""], {}, "--prompt is empty"),
        (["--max-new-tokens", "0"], {}, "--max-new-tokens must be at least 1"),
        (["--top-p", "0"], {}, r"--top-p must be in \(0, 1\]"),
        (["--top-p", "1.5"], {}, r"--top-p must be in \(0, 1\]"),
        (["--temperature", "-1"], {}, "--temperature must be 0"),
        (["--num-samples", "0"], {}, "--num-samples must be at least 1"),
        (["--top-k", "-3"], {}, "--top-k must be 0"),
        (["--device", "cuda:7"], {}, "device 'cuda:7' is not usable here"),
        (["--max-new-tokens", "many"], {}, "invalid int value: 'many'"),
    ],
)
def test_bad_input_gets_one_line_and_a_nonzero_exit(tmp_path, args, env, message):
    args = [str(tmp_path) if a == "EMPTY_DIR" else a for a in args]
    env = {"HF_HOME": str(tmp_path / "hf-home"), **env}  # an empty cache: no local copy of gpt2
    result = run_sample(*args, **env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sample.py: error: ")
    assert re.search(message, lines[0]), lines[0]

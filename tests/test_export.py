"""export.py: a checkpoint to a Hugging Face folder from the command line, with one-line errors.

python -m pytest tests/test_export.py -q
"""

import subprocess
import sys

import torch
from transformers import GPT2LMHeadModel

from conftest import REPO, tiny_config
from gpt2lite.checkpoints import save_checkpoint
from train_gpt2 import GPT


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *args], cwd=REPO, capture_output=True, text=True)


def test_a_checkpoint_exports_to_a_folder_transformers_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50257, block_size=32)).eval()
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, step=3)
    result = export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'hf'}" in result.stdout
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)


def test_bad_input_gets_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for args, message in (
        ([str(tmp_path / "junk.pt"), str(tmp_path / "out")], "is not a readable gpt2-lite checkpoint"),
        ([str(tmp_path / "junk.pt"), str(tmp_path / "file.txt")], "is a file: give the folder"),
        ([str(tmp_path / "junk.pt")], "the following arguments are required: out_dir"),
    ):
        result = export(*args)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()

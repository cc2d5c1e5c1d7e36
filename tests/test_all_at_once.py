"""Every script tells a user all their mistakes at once, a line each, as training does: three mistakes, three
lines, one non-zero exit, no traceback, nothing written.

Run with `python -m pytest tests/test_all_at_once.py -q`.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO


def errors_of(script: str, *args: str, cwd=REPO) -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(f"{script}: error: ") for line in lines), result.stderr
    return [line.removeprefix(f"{script}: error: ") for line in lines]


def test_prepare_data_names_every_bad_flag_and_file(tmp_path):
    lines = errors_of("prepare_data.py", "--input", str(tmp_path / "missing.txt"), "--val-input",
                      str(tmp_path / "none*.txt"), "--shard-size", "0", "--num-proc", "0", "--out-dir",
                      str(tmp_path / "out"))  # fmt: skip
    assert lines == [
        "--shard-size must be at least 1 token, got 0",
        "--num-proc must be at least 1, got 0",
        f"input file {tmp_path / 'missing.txt'} does not exist",
        f"--input pattern {str(tmp_path / 'none*.txt')!r} matches no file",
    ]
    assert not (tmp_path / "out").exists()


def test_sample_names_every_bad_flag_and_the_model(tmp_path):
    lines = errors_of("sample.py", "--num-samples", "0", "--top-p", "3", "--init-from", str(tmp_path / "no.pt"))
    assert lines == [
        "--num-samples must be at least 1, got 0",
        "--top-p must be in (0, 1], got 3.0",
        f"{tmp_path / 'no.pt'} does not exist: pass an existing checkpoint file or model directory",
    ]


@pytest.mark.parametrize("model", ["gpt-9", "gpt2"])
def test_evaluate_names_every_bad_flag_and_downloads_nothing_while_one_is_wrong(tmp_path, model):
    lines = errors_of("evaluate.py", "--limit", "-1", "--batch-tokens", "0", "--init-from", model, cwd=tmp_path)
    assert lines[:2] == ["--limit must be 0 (everything) or positive, got -1", "--batch-tokens must be positive, got 0"]
    if model == "gpt2":  # a hub model is not even looked for while the flags are wrong: no download for a typo
        assert len(lines) == 2
    else:
        assert len(lines) == 3 and lines[2].startswith("unknown model 'gpt-9'")

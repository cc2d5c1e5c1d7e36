"""Every script's --help answers "what happens if I leave this out?": each option's default, once, in words where
None means something, never "(default: None)".

python -m pytest tests/test_help.py -q
"""

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from conftest import REPO
from gpt2lite import cli

SCRIPTS = ["train_gpt2", "prepare_data", "sample", "evaluate", "plot_losses", "bench", "export"]


class Built(Exception):
    """Raised instead of parsing: the parser the script built, caught before it reads any argument."""


def script_parser(monkeypatch, script: str) -> cli.ArgumentParser:
    def stop(parser, args=None, namespace=None):
        raise Built(parser)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", stop)
    module = importlib.import_module(script)
    with pytest.raises(Built) as built:
        (getattr(module, "parse_args", None) or module.main)([])
    return built.value.args[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_option_shows_its_default_once(monkeypatch, script):
    parser = script_parser(monkeypatch, script)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)  # the help line as --help prints it
        name = action.option_strings[-1]
        assert text.count("default") <= 1, (name, text)
        assert "None" not in text, (name, text)
        shown = action.default not in (None, False)
        assert not shown or "default" in text, f"{name}: its default {action.default!r} is not shown: {text}"
        if action.default is None and not isinstance(action, argparse._StoreTrueAction):
            # None is either "not given" (a source of text, a file to use instead) or a choice made for the user
            assert "default" in text or name in ("--input", "--hf-dataset"), (
                f"{name}: what does leaving it out do? {text}"
            )


def test_sample_help_says_how_many_tokens_and_what_temperature():
    out = subprocess.run([sys.executable, "sample.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    text = re.sub(r"\s+", " ", out)
    for expected in ("tokens to add to the prompt (default: 64)", "flatter (default: 1.0)", "(default: off)",
                     "(default: random)", "(default: 50)"):  # fmt: skip
        assert expected in text, expected


def test_train_help_says_compile_once():
    out = subprocess.run([sys.executable, "train_gpt2.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    text = re.sub(r"\s+", " ", out)
    assert "torch.compile the model (default: on for CUDA) --seed" in text
    assert "(default: None)" not in text and "(default: a fresh model)" in text

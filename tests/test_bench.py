"""bench.py's method, not its figures (speed is never asserted in tests): fair turns, ratios within a round.

python -m pytest tests/test_bench.py -q
"""

import pytest

from bench import main, median_ratio, race


def test_race_warms_up_then_rotates_the_order_each_round():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = race(contenders, repeats=3, device="cpu")
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    assert all(len(times) == 3 for times in seconds.values())


def test_median_ratio_pairs_rounds():
    assert median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # per-round ratios 2, 3, 3


@pytest.mark.parametrize("argv, message", [(["nope"], "unknown benchmark 'nope'"), (["--repeats", "0"], "--repeats")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_data_benchmark_compares_pipelines_that_make_the_same_shards(tmp_path):
    from bench import fineweb_prepare, ours_prepare
    from train_gpt2 import load_tokens

    docs = ["first document\n", "second, with ünïcödé\n", "third " * 500]
    (tmp_path / "ours").mkdir()
    (tmp_path / "fineweb").mkdir()
    n_ours = ours_prepare(docs, str(tmp_path / "ours"), 300, 2)
    assert n_ours == fineweb_prepare(docs, str(tmp_path / "fineweb"), 300, 2)
    ours = [load_tokens(str(p)).tolist() for p in sorted((tmp_path / "ours").glob("*.bin"))]
    theirs = [load_tokens(str(p)).tolist() for p in sorted((tmp_path / "fineweb").glob("*.bin"))]
    assert ours == theirs


def test_train_benchmark_steps_both_models_on_the_same_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import training_steps
    from train_gpt2 import GPTConfig

    ours, theirs = training_steps(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64), 2, 16,
                                  "fp32", False, "cpu", GPT2Config, GPT2LMHeadModel)  # fmt: skip
    ours()
    theirs()

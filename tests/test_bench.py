"""bench.py's method, not its figures (speed is never asserted in tests): fair turns, ratios within a round.

python -m pytest tests/test_bench.py -q
"""

import pytest
import torch

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


@pytest.mark.parametrize("streamed", [False, True], ids=["in memory", "streamed from parquet"])
def test_data_benchmark_compares_pipelines_that_make_the_same_shards(tmp_path, streamed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench import fineweb_prepare, fineweb_tokenize, fineweb_tokenize_row, ours_prepare, parquet_rows
    from gpt2lite import text_data
    from gpt2lite.shards import load_tokens

    docs = ["first document\n", "second, with ünïcödé\n", "third " * 500]
    (tmp_path / "ours").mkdir()
    (tmp_path / "fineweb").mkdir()
    if streamed:
        (tmp_path / "pq").mkdir()
        pq.write_table(pa.table({"text": docs}), tmp_path / "pq" / "docs.parquet")
        ours_docs = text_data.hf_stream(str(tmp_path / "pq"), None, "train", "text").documents
        their_docs, tokenize = parquet_rows(str(tmp_path / "pq")), fineweb_tokenize_row
    else:
        ours_docs, their_docs, tokenize = (lambda skip: iter(docs[skip:])), docs, fineweb_tokenize
    n_ours = ours_prepare(ours_docs, str(tmp_path / "ours"), 300, 2)
    assert n_ours == fineweb_prepare(their_docs, str(tmp_path / "fineweb"), 300, 2, tokenize)
    ours = [load_tokens(str(p)).tolist() for p in sorted((tmp_path / "ours").glob("*.bin"))]
    theirs = [load_tokens(str(p)).tolist() for p in sorted((tmp_path / "fineweb").glob("*.bin"))]
    assert ours == theirs and len(ours) > 1


def test_train_benchmark_steps_both_models_on_the_same_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import training_steps
    from train_gpt2 import GPTConfig

    ours, theirs = training_steps(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64), 2, 16,
                                  "fp32", False, "cpu", GPT2Config, GPT2LMHeadModel)  # fmt: skip
    ours()
    theirs()


def test_eval_benchmark_reference_scores_what_evaluate_scores():
    """The one-example-at-a-time transformers loop the eval benchmark races against computes our numbers."""
    from bench import hf_example_losses
    from conftest import random_hf_model, tiny_config
    from gpt2lite.evaluation import completion_losses
    from train_gpt2 import GPT

    hf = random_hf_model(tiny_config(vocab_size=50257, block_size=256), init_std=0.2)
    ours = GPT(tiny_config(vocab_size=50257, block_size=256))
    ours.load_hf_state_dict(hf.state_dict())
    pairs = [([5, 6, 7], [8, 9]), ([1] * 30, [2]), ([3, 4], [5, 6, 7, 8])]
    expected = [c.loss for c in completion_losses(ours.eval(), pairs, "cpu")]
    assert hf_example_losses(hf, pairs, "cpu") == pytest.approx(expected, rel=1e-4)  # one padded batch
    assert hf_example_losses(hf, pairs[1:2], "cpu") == pytest.approx(expected[1:2], rel=1e-4)


def test_gpu_benchmark_skips_without_a_gpu_and_steps_with_the_training_code(capsys, monkeypatch):
    """`python bench.py gpu` says it has nothing to measure on a CPU; its steps (train_gpt2.py's accumulation,
    GradScaler, clipping and AdamW, eager and with the math attention kernel, and Muon's) run on any device."""
    from bench import gpu_training_steps, held_bytes
    from train_gpt2 import GPTConfig

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    main(["gpu"])
    assert "gpu: skipped, this machine has no CUDA GPU" in capsys.readouterr().out

    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    modes = ["eager", "compiled", "eager, math attention", "compiled, Muon"]
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))  # no C++ compiler
    steps = gpu_training_steps(config, 2, 16, 64, "fp16", "cpu", modes)  # 2 accumulation steps, with a GradScaler
    assert list(steps) == modes
    for mode in ("eager", "eager, math attention", *(["compiled, Muon"] if hasattr(torch.optim, "Muon") else [])):
        steps[mode].step()
    assert steps["eager"].model is steps["compiled"].model and steps["compiled, Muon"].model is not steps["eager"].model
    # what a mode holds between steps: weights, and AdamW's two moments (and a step count) once it has stepped
    params = list(steps["eager"].model.parameters())
    weights = sum(p.numel() * 4 for p in params)
    assert held_bytes(steps["eager"].model, steps["eager"].optimizer) == 3 * weights + 4 * len(params)
    torch._dynamo.reset()


def test_gpu_benchmark_drops_a_mode_that_fails_and_compiles_from_an_empty_cache(monkeypatch):
    """One mode that does not fit in memory must not cost the others their rows, and is a measurement; any other
    failure is named as one. No graph compiled elsewhere, under another choice of attention kernel, may be reused
    (torch.compile's cache key leaves that choice out)."""
    import os

    from bench import Mode, failing_steps, fresh_compile_cache

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    ran = []

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    def compiler_error():
        raise RuntimeError("backend='inductor' raised: CompilationError: at 12:4")

    steps = {name: Mode(step, None, None) for name, step in [("eager", lambda: ran.append("eager")),
             ("eager, math attention", out_of_memory), ("compiled", compiler_error)]}  # fmt: skip
    assert failing_steps(steps, "cuda") == {
        "eager, math attention": "out of memory",
        "compiled": "failed: backend='inductor' raised: CompilationError: at 12:4",
    }
    assert list(steps) == ["eager"] and ran == ["eager"]

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with fresh_compile_cache():
        inside = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert inside != "/somewhere/else" and os.listdir(inside) == []
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else" and not os.path.exists(inside)


@pytest.mark.parametrize("failure", [None, torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                     RuntimeError("CUDA error: an illegal memory access was encountered")])  # fmt: skip
def test_the_gpu_benchmark_fails_when_a_row_fails_for_another_reason_than_memory(monkeypatch, capsys, failure):
    """bench.py gpu on a faked card, with every step faked: all rows print, and a row that failed for another reason
    than memory makes the benchmark exit non-zero (a GPU check that cannot fail proves nothing)."""
    import bench

    def steps(config, B, T, total, precision, device, modes):
        def step():
            if failure is not None and B == 16:
                raise failure

        return {name: bench.Mode(step, torch.nn.Linear(1, 1), torch.optim.SGD([torch.ones(1)], lr=1.0))
                for name in modes}  # fmt: skip

    for name, value in [("is_available", True), ("get_device_capability", (9, 0)), ("synchronize", None),
                        ("empty_cache", None), ("memory_reserved", 0), ("reset_peak_memory_stats", None),
                        ("max_memory_reserved", 2**30)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value, **kwargs: value)
    monkeypatch.setattr(bench, "gpu_training_steps", steps)
    monkeypatch.setattr(bench, "auto_micro_batch", lambda *args: 32 if args[-1] else 16)
    monkeypatch.setattr(bench, "peak_flops", lambda device, precision: (1e15, "a faked peak"))
    monkeypatch.setattr(bench, "machine_line", lambda device: "a faked card")
    if failure is not None and not isinstance(failure, torch.cuda.OutOfMemoryError):
        with pytest.raises(SystemExit, match="rows failed for another reason than memory:\n16 x 1024 bf16 eager: "
                                             "failed: CUDA error: an illegal memory access"):  # fmt: skip
            bench.main(["gpu", "--repeats", "1"])
    else:
        bench.main(["gpu", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    expected_rows = 4 + 4 + 2  # two settings of four modes; the auto micro batch measured eagerly, and compiled
    assert len(rows) == expected_rows, rows
    assert rows[-2].startswith("| 16 x 1024 (auto, measured eager) | bf16 | compiled |")
    assert rows[-1].startswith("| 32 x 1024 (auto, measured compiled) | bf16 | compiled |")
    muon = next(row for row in rows if row.startswith("| 4 x 1024 | fp16 | compiled, Muon |"))
    assert muon.endswith("x compiled |"), "Muon's cost: against AdamW, compiled"
    if failure is not None:
        oom = isinstance(failure, torch.cuda.OutOfMemoryError)
        assert ("out of memory" if oom else "failed: CUDA error") in rows[4], rows[4]


def test_the_eval_benchmark_runs_on_generated_text_in_a_clone_without_real_text(monkeypatch, tmp_path):
    import bench

    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "absent")
    tasks, described = bench.eval_tasks()
    assert len(tasks["hellaswag"]) == 300 * 4 and len(tasks["lambada"]) == 400 and len(tasks["wikitext"]) > 100
    assert described.startswith("generated text: ")
    assert all(context and completion for pairs in tasks.values() for context, completion in pairs)


def test_tokens_to_reach_interpolates_between_evaluations():
    from bench import tokens_to_reach

    curve = [9.0, 7.0, 6.0, 5.0]  # evaluated every 100 tokens
    assert tokens_to_reach(curve, 6.0, 100) == 200
    assert tokens_to_reach(curve, 6.5, 100) == pytest.approx(150)
    assert tokens_to_reach(curve, 8.0, 100) == pytest.approx(50)
    assert tokens_to_reach(curve, 4.9, 100) is None


def test_recipe_benchmark_runs_every_recipe_and_draws_the_curves(tmp_path, monkeypatch, capsys):
    """At a tiny size and 10 steps on generated text (what a clone without the project's real text uses): the
    grids on seed 0, each recipe's chosen rate on seed 1, the tables and the PNG."""
    import bench

    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.setattr(bench, "RECIPE_SIZES", {"2 layers, width 32": (2, 2, 32)})
    monkeypatch.setattr(bench, "EVAL_WINDOWS", 16)
    main(["recipe", "--recipe-steps", "10", "--recipe-png", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert "generated text (no real text beside the clone)" in out
    runs = [line for line in out.splitlines() if line.startswith("  2 x 32, recipe ")]
    assert len(runs) == 10  # 1 + 3 + 3 rates on seed 0, one per recipe on seed 1
    assert [line.split(", seed ")[1][0] for line in runs] == ["0"] * 7 + ["1"] * 3
    base = bench.seed_lr(32)
    assert f"recipe 2, rate {base:g}, seed 0" in out and f"recipe 2, rate {4 * base:g}, seed 0" in out
    assert "recipe 3, rate 0.04, seed 0" in out
    table = [line for line in out.splitlines() if line.startswith("| 1. seed's: AdamW, cosine | ")]
    assert len(table) == 2 and "| +0.0000 |" in table[1]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_recipe_steps_must_split_into_the_evaluations():
    with pytest.raises(SystemExit):
        main(["recipe", "--recipe-steps", "15"])

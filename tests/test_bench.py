"""bench.py's method, not its figures (speed is never asserted in tests): fair turns, ratios within a round.

python -m pytest tests/test_bench.py -q
"""

import io
import math

import pytest
import torch

from bench import main, median_ratio, race
from gpt2lite.cli import InputError


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


def test_the_eval_benchmark_runs_on_generated_text_where_no_real_text_can_be_had(monkeypatch):
    import bench

    monkeypatch.setattr(bench, "real_text_dir", lambda: None)
    tasks, described = bench.eval_tasks()
    assert len(tasks["hellaswag"]) == 300 * 4 and len(tasks["lambada"]) == 400 and len(tasks["wikitext"]) > 100
    assert described.startswith("GENERATED text, not real text (none to be had)")
    assert "Tiny Shakespeare" not in described, "it names no real text it did not read"
    assert all(context and completion for pairs in tasks.values() for context, completion in pairs)


def test_tokens_needed_interpolates_a_final_loss_curve_in_log_tokens():
    from bench import tokens_needed

    curve = {100: 5.0, 200: 4.0, 400: 3.5}  # each point a run decayed at that budget
    assert tokens_needed(curve, 4.0) == pytest.approx(200)
    assert tokens_needed(curve, 4.5) == pytest.approx(100 * 2**0.5), "halfway in log tokens"
    assert tokens_needed(curve, 5.5) is None, "reached before the smallest budget"
    assert tokens_needed(curve, 3.0) == float("inf"), "not reached"


@pytest.mark.parametrize(
    "first, points, bracketed",
    [
        (0.02, [0.01, 0.02, 0.04, 0.08], True),  # widened once, upward
        (1.0, [2.0**k for k in range(-5, 2)], True),  # widened four times, downward
        (0.001, [0.0005 * 2**k for k in range(8)], False),  # still best at the edge when MOST_POINTS are spent
    ],
)
def test_a_grid_widens_until_its_best_rate_has_a_worse_point_on_each_side(first, points, bracketed):
    from bench import MOST_POINTS, bracket, is_bracketed

    grid = bracket(lambda rate: (math.log2(rate / 0.05)) ** 2, first)  # the best rate: 0.05
    assert list(grid) == pytest.approx(points) and len(grid) <= MOST_POINTS
    assert is_bracketed(grid) == bracketed
    if bracketed:
        assert min(grid, key=grid.get) == pytest.approx(min(points, key=lambda r: abs(math.log2(r / 0.05))))


@pytest.fixture
def tiny_recipe_bench(tmp_path, monkeypatch):
    """The recipe bench at two tiny sizes on generated text (what a clone without the project's real text reads):
    budgets of half and all of one token a block parameter, two seeds, two decay shares."""
    import bench

    monkeypatch.setattr(bench, "real_text_dir", lambda: None)
    monkeypatch.setattr(bench, "GENERATED_TEXTS", 400)
    scale = bench.Scale({"1 x 16": (1, 1, 16), "1 x 32": (1, 2, 32)}, 64, 4, 32, 1, "cpu", "fp32", 1.0)
    monkeypatch.setattr(bench, "CPU_SCALE", scale)
    monkeypatch.setattr(bench, "BUDGETS", (0.5, 1.0))
    monkeypatch.setattr(bench, "RECIPE_SEEDS", (0, 1))
    monkeypatch.setattr(bench, "DECAY_FRACTIONS", (0.2, 0.5))
    monkeypatch.setattr(bench, "DECAY_SEEDS", (0,))
    return bench


def test_a_branch_decays_as_a_run_of_its_own_length(tiny_recipe_bench, tmp_path):
    """WSD's decay depends on nothing before it: a branch copied from a flat run that goes on past it ends where a
    run of just that branch ends, bit for bit."""
    bench = tiny_recipe_bench
    bench.recipe_shards(str(tmp_path), 64)
    runner = bench.Bench(bench.CPU_SCALE, str(tmp_path), planned_runs=2)
    short, long = bench.Branch(8, 2), bench.Branch(16, 4)
    for recipe in (bench.Recipe("adamw", 3e-3), bench.Recipe("muon", 3e-3, 0.02)):
        both = bench.branched_run(runner, "1 x 16", recipe, 0, [short, long])
        assert both[short] == bench.branched_run(runner, "1 x 16", recipe, 0, [short])[short]
        assert both[long] == bench.branched_run(runner, "1 x 16", recipe, 0, [long])[long], "the copy left it alone"
        assert both[long] < both[short]


@pytest.mark.usefixtures("tiny_recipe_bench")
def test_recipe_benchmark_brackets_every_rate_and_reads_the_speedup_off_the_curves(tmp_path, capsys):
    main(["recipe", "--recipe-png", str(tmp_path / "recipe.png")])
    out = capsys.readouterr().out
    assert "GENERATED text, not real text" in out
    assert "| 1 x 16 | 3,280 | 4,848 | 26, 3,328 | 1.0 | 13, 26 |" in out, "the regime: steps, tokens, budgets"
    for size in ("1 x 16", "1 x 32"):
        section = out.split(f"### {size}")[1].split("###")[0]
        grids = [line for line in section.splitlines() if line.startswith("- ")]
        assert [line.split(":")[0] for line in grids] == ["- AdamW lr", "- Muon lr", "- embedding lr under Muon"]
        assert all(line.endswith("(bracketed)") for line in grids), grids
        assert all(line.count("**") == 2 for line in grids), "one chosen rate each"
        assert "| Muon − AdamW, paired by seed | " in section
        assert "| adamw, 0 | " in section and "| muon, 0 | " in section, "the decay study"
    speedups = out.split("### Muon's speedup")[1].splitlines()
    assert [line.split(" | ")[0] for line in speedups if line.startswith("| 1 x ")] == ["| 1 x 16", "| 1 x 32"]
    assert all(line.endswith("× |") for line in speedups if line.startswith("| 1 x "))
    assert "an EXTRAPOLATION over" in out
    # every run: each size's grids on seed 0, then seed 1 at the chosen rates, then the decay study
    runs = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(runs) == len({line.split("] ")[1].rsplit(" (", 1)[0] for line in runs}), "no run twice"
    assert sum(" to 0.1x " in line for line in runs) == 2 * 2, "the decay study: 2 recipes, 2 sizes"
    assert (tmp_path / "recipe.png").stat().st_size > 20_000
    assert f"\n{len(runs)} runs in " in out


def test_the_recipe_bench_on_a_gpu_needs_its_shards(tmp_path):
    import argparse

    from bench import bench_recipe

    args = argparse.Namespace(recipe_gpu=True, device="cuda", recipe_data=str(tmp_path / "none"), recipe_png="x.png")
    with pytest.raises(InputError, match="--recipe-data .* does not exist: prepare GPT-2 token shards first"):
        bench_recipe(args)  # past main's check of the device: this machine may have none
    with pytest.raises(SystemExit):
        main(["recipe", "--recipe-gpu"])  # --device cpu, the default: one line says to add --device cuda


def test_the_speedup_is_read_off_the_better_recipes_curve_at_the_worse_ones_final_loss():
    from bench import Branch, Recipe, Tuned, speedup

    class Results:  # what speedup() reads from a Bench
        step_tokens = 100

        def __init__(self, adamw: list[float], muon: list[float]):
            self.results = {("s", tuned.adamw, 0): dict(zip(self.ends(), adamw)),
                            ("s", tuned.muon, 0): dict(zip(self.ends(), muon))}  # fmt: skip

        def ends(self):
            return [Branch(end, end // 5) for end in (10, 20, 40)]

        def budgets(self, size, fraction):
            return self.ends()

    tuned = Tuned(Recipe("adamw", 1e-3), Recipe("muon", 1e-3, 0.02), {})
    assert speedup(Results([5.0, 4.5, 4.0], [4.5, 4.0, 3.8]), "s", tuned, 0) == pytest.approx(2.0)  # 4,000 / 2,000
    assert speedup(Results([5.0, 4.5, 4.0], [4.5, 4.25, 4.0]), "s", tuned, 0) == pytest.approx(1.0)
    assert speedup(Results([5.0, 4.5, 4.0], [3.9, 3.8, 3.7]), "s", tuned, 0) == pytest.approx(4.0), "a bound"
    assert speedup(Results([4.5, 4.0, 3.8], [5.0, 4.5, 4.0]), "s", tuned, 0) == pytest.approx(0.5), "Muon slower"


def test_a_clone_downloads_the_benchmarks_real_text_once_and_checks_it(monkeypatch, tmp_path, capsys):
    """Without the project's copy beside it, the real text comes from the cache, downloaded once (WikiText-2's file as
    a member of its zip) and checked against its sha256; with no network, None and one line say why."""
    import hashlib
    import urllib.request
    import zipfile

    import bench

    texts = {name: f"the text of {name}\n".encode() for name in bench.REAL_TEXT}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("wikitext-2-raw/wiki.valid.raw", texts["wikitext-2-raw/wiki.valid.raw"])
    served = {"tinyshakespeare/input.txt": texts["tinyshakespeare/input.txt"],
              "lambada/lambada_test.jsonl": texts["lambada/lambada_test.jsonl"],
              "wikitext-2-raw/wiki.valid.raw": archive.getvalue()}  # fmt: skip
    urls = {name: f"https://example.org/{i}" for i, name in enumerate(bench.REAL_TEXT)}
    real_text = {name: (urls[name], hashlib.sha256(texts[name]).hexdigest(), member)
                 for name, (_, _, member) in bench.REAL_TEXT.items()}  # fmt: skip
    monkeypatch.setattr(bench, "REAL_TEXT", real_text)
    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.setenv("GPT2_LITE_CACHE", str(tmp_path / "cache"))
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url)
        name = next(name for name, address in urls.items() if address == url)
        return io.BytesIO(served[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert bench.real_text_dir() == tmp_path / "cache" and len(fetched) == 3
    assert all((tmp_path / "cache" / name).read_bytes() == text for name, text in texts.items())
    assert bench.real_text_dir() == tmp_path / "cache" and len(fetched) == 3, "downloaded once"

    def offline(url, timeout):
        raise OSError("Name or service not known")

    (tmp_path / "cache" / "lambada" / "lambada_test.jsonl").unlink()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert bench.real_text_dir() is None
    assert "no real text for the benchmarks (cannot download https://example.org/1" in capsys.readouterr().err

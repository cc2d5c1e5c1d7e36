"""python train_gpt2.py --plan: the run built as training builds it, a few real steps timed, and the arithmetic
of the whole run (tokens, passes, time, memory, disk) with its warnings; nothing is written.

python -m pytest tests/test_plan.py -q
"""

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import NEEDS_MUON, OPTIMIZERS, TINY_RUN, logged_events, run_train, small_shards

import train_gpt2
from conftest import REPO
from gpt2lite import planning

SETTINGS = [*TINY_RUN, "--max-steps", "8", "--eval-interval", "4", "--ckpt-interval", "4", "--sample-interval", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("plan-data"))


def plan(capsys, *argv: str) -> tuple[dict, str]:
    """The plan's JSON (its last line) and all it printed."""
    train_gpt2.main([*argv, "--plan"])
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_plan_writes_nothing_and_its_arithmetic_is_exact(data, tmp_path, capsys, optimizer):
    before = snapshot(data)
    run_dir = tmp_path / "run"
    settings = [*SETTINGS, *optimizer]
    result, out = plan(capsys, *settings, "--data-dir", str(data), "--run-dir", str(run_dir), "--keep-last", "2")
    assert not run_dir.exists() and snapshot(data) == before, "a plan writes nothing"
    manifest = json.loads((data / "manifest.json").read_text())
    train_tokens = manifest["splits"]["train"]["tokens"]
    assert result["tokens_per_step"] == 256 and result["grad_accum_steps"] == 256 // (4 * 32)
    assert result["total_tokens"] == 8 * 256 and result["steps"] == 8
    assert result["epochs"] == pytest.approx(8 * 256 / train_tokens)
    assert f"data: {train_tokens:,} training tokens" in out
    assert result["tokens_per_second"] == pytest.approx(256 / (result["ms_per_step"] / 1000))
    assert 0 < result["mfu"] < 1 and result["peak_memory_bytes"] > 0 and result["warnings"] == []
    # evaluations at steps 0, 4 and 8: three of them, and eight steps
    assert planning.evaluations(0, 8, 4) == 3 and planning.evaluations(0, 10, 4) == 4
    for start, end, interval in [(0, 8, 4), (3, 8, 4), (4, 8, 4), (5, 11, 4), (0, 1, 250), (7, 40_000, 250)]:
        loop = sum(1 for step in range(start, end + 1) if step == end or step % interval == 0)  # as train() does
        assert planning.evaluations(start, end, interval) == loop

    # disk at the peak: the 2 checkpoints the run writes (at steps 4 and 8, both kept), best.pt, each the size of the
    # run's own
    assert run_train(*settings, "--data-dir", str(data), "--run-dir", str(run_dir)).returncode == 0
    real = (run_dir / "ckpt_000008.pt").stat().st_size
    # the pickled integers (step, data position) may take a byte more or less than at the plan's step 0, which
    # torch.save's 64-byte alignment of its records can turn into a record more or less of padding
    assert result["checkpoint_bytes"] == pytest.approx(3 * real, abs=3 * 256)


@NEEDS_MUON
def test_muons_one_momentum_buffer_makes_a_smaller_checkpoint_than_adams_two_moments(data, tmp_path, capsys):
    plans = {}
    for name in ("adamw", "muon"):
        plans[name], _ = plan(capsys, *SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path), "--optimizer",
                              name)  # fmt: skip
    matrices = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 4 * 64 * 64)  # c_attn, c_proj, c_fc, the MLP's c_proj; 2 blocks
    files = 3  # the checkpoints at steps 4 and 8, and best.pt
    saved = plans["adamw"]["checkpoint_bytes"] - plans["muon"]["checkpoint_bytes"]
    # one fp32 buffer fewer per matrix parameter, and Adam's bookkeeping for each of the 8 matrices (a step count)
    assert files * 4 * matrices <= saved <= files * (4 * matrices + 8 * 1024)


def test_the_measured_step_is_of_the_order_of_the_steps_a_run_logs(data, tmp_path):
    """Both as a user runs them, one after the other (not a timing assertion: a factor of three either way)."""
    planned = run_train(*SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--plan")
    result = json.loads(planned.stdout.strip().splitlines()[-1])
    assert run_train(*SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "run")).returncode == 0
    logged = statistics.median(e["ms"] for e in logged_events(tmp_path / "run") if e["split"] == "train")
    assert logged / 3 < result["ms_per_step"] < logged * 3, (result["ms_per_step"], logged)


def test_a_plan_whose_steps_are_long_times_one_micro_batch_not_whole_steps_and_says_so(data, tmp_path, capsys,
                                                                                      monkeypatch):  # fmt: skip
    """A 124M step on a laptop takes minutes: the plan runs single micro batches, times the optimizer's step inside
    one, and multiplies; validation, its first batch. Here every step counts as long, on a tiny model."""
    settings = [*SETTINGS, "--total-batch-size", "1024", "--eval-steps", "2"]  # 8 micro batches of 4 x 32 a step
    monkeypatch.setattr(planning, "LONG_STEP_SECONDS", 0)
    micro_batches, seconds, validations = [], [], []
    accumulate, estimate = train_gpt2.accumulate_gradients, train_gpt2.estimate_loss

    def timed_accumulate(*args):  # the forward and backward of the micro batches, timed
        t0 = time.perf_counter()
        micro_batches.append(args[2])
        loss = accumulate(*args)
        seconds.append(time.perf_counter() - t0)
        return loss

    monkeypatch.setattr(train_gpt2, "accumulate_gradients", timed_accumulate)
    monkeypatch.setattr(train_gpt2, "estimate_loss", lambda *a: validations.append(a[2]) or estimate(*a))
    parts, out = plan(capsys, *settings, "--data-dir", str(data), "--run-dir", str(tmp_path / "b"))
    assert parts["grad_accum_steps"] == 8
    assert micro_batches == [1, 1, 1], "a warm-up and two more looks, one micro batch each: no step run whole"
    assert validations == [4], "validation's first batch of 4 windows, not both its batches"
    progress = [line for line in out.splitlines() if line.startswith("timing: ")]
    assert progress[0] == "timing: a warm-up step of one micro batch (4 x 32 tokens)"
    assert "a step is 8 micro batches and one optimizer step" in progress[1] and "not run whole" in progress[1]
    assert progress[2] == "timing: validation's first batch of 2"
    assert out.index("timing: ") < out.index("\nmodel: 3,323,648 parameters (")  # while it measures, before the plan
    # a step is 8 micro batches: at least 8 of the fastest forward and backward timed, plus the optimizer's step
    assert parts["ms_per_step"] / 1000 >= 8 * min(seconds)


def test_a_ddp_run_is_planned_under_torchrun(data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt2.py"]
    result = subprocess.run([*torchrun, *SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"),
                             "--plan"], cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    plans = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(plans) == 1, "rank 0 alone prints the plan"
    plan = json.loads(plans[0])
    assert plan["tokens_per_step"] == 256 and plan["grad_accum_steps"] == 1  # 4 x 32 x 2 processes x 1
    assert "4 x 32 tokens x 2 process(es) x 1 accumulation steps = 256 tokens a step" in result.stdout
    assert not (tmp_path / "run").exists()


def test_many_passes_over_the_data_are_a_warning_and_a_few_are_not(data, tmp_path, capsys):
    manifest = json.loads((data / "manifest.json").read_text())
    steps_per_pass = manifest["splits"]["train"]["tokens"] / 256
    few, _ = plan(capsys, *SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "a"),
                  "--max-steps", str(int(3.5 * steps_per_pass)))  # fmt: skip
    many, out = plan(capsys, *SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "b"),
                     "--max-steps", str(int(4.5 * steps_per_pass) + 1))  # fmt: skip
    assert few["warnings"] == [] and 3 < few["epochs"] < 4
    assert len(many["warnings"]) == 1 and "passes" in many["warnings"][0] and "--patience" in many["warnings"][0]
    assert "warning: the run reads its training split 4.5 times" in out


def test_an_existing_run_is_a_warning_and_with_resume_the_plan_starts_where_it_stopped(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_train(*SETTINGS, "--data-dir", str(data), "--run-dir", str(run_dir)).returncode == 0
    before = snapshot(run_dir)
    result, _ = plan(capsys, *SETTINGS, "--data-dir", str(data), "--run-dir", str(run_dir), "--max-steps", "12")
    assert any("already holds a run" in w and "--resume" in w for w in result["warnings"])
    resumed, out = plan(capsys, "--resume", "--run-dir", str(run_dir), "--max-steps", "12")
    assert resumed["warnings"] == [] and resumed["steps"] == 4 and "from step 8 of 12" in out
    assert snapshot(run_dir) == before, "the run directory is untouched: not its log, not its checkpoints"


def test_memory_near_the_devices_and_a_long_colab_run_off_drive_are_warnings(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(planning, "physical_memory_bytes", lambda: 10**6)  # a device far too small
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20261120")
    result, _ = plan(capsys, *SETTINGS, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"),
                     "--max-steps", "100000000", "--patience", "0")  # fmt: skip
    passes, memory, colab = result["warnings"]
    assert "peak memory" in memory and "--batch-size" in memory and "--total-batch-size" in memory
    assert "longer than a free Colab session" in colab and "/content/drive" in colab
    assert "passes" in passes and "validation stops improving (now off)" in passes


def test_the_plan_refuses_what_the_run_refuses(data, tmp_path):
    base = [*TINY_RUN, "--data-dir", str(data), "--run-dir", str(tmp_path / "run")]
    for argv, message in (
        (["--max-steps", "3", "--warmup-steps", "5"], "--warmup-steps 5 must be below --max-steps 3"),
        (["--data-dir", str(tmp_path / "none")], "no"),
        (["--total-batch-size", "300"], "is not a multiple of"),
        (["--hellaswag-interval", "2", "--hellaswag-data", str(tmp_path / "hs.jsonl")], "hs.jsonl does not exist"),
    ):
        run, planned = run_train(*base, *argv), run_train(*base, *argv, "--plan")
        assert planned.returncode == run.returncode == 1 and message in planned.stderr
        assert planned.stderr.splitlines()[-1] == run.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def t4_facts() -> planning.Facts:
    """The default run's facts on a T4, at the original reproduction's 3.7 s a step."""
    return planning.Facts(
        parameters=124_475_904, model="12 layers, width 768, context 1024", train_tokens=117_920_140,
        val_tokens=247_289, batch_size=4, seq_len=1024, world_size=1, grad_accum_steps=16, start_step=0,
        max_steps=40_000, eval_interval=250, ckpt_interval=1000, keep_last=3, patience=10, device="Tesla T4",
        precision="fp16", why="", compiled=True, attention="memory-efficient", seconds_per_step=3.7, eval_seconds=10,
        mfu=0.3, peak_memory_bytes=10 * 2**30, device_memory_bytes=15 * 2**30, checkpoint_bytes_each=1_500_000_000,
        largest_micro_batch=8, run_dir="runs/gpt2-124m", run_dir_holds_a_run=False, run_dir_in_use=None, resume=False,
        in_colab=False,
    )  # fmt: skip


def test_the_largest_micro_batch_line_keeps_the_batch():
    facts = t4_facts()
    result = planning.make_plan(facts)
    text = "\n".join(planning.plan_lines(facts, result))
    assert "--batch-size 8 keeps 65,536 tokens a step with 8 accumulation steps" in text
    assert result["checkpoint_bytes"] == 5 * 1_500_000_000 and "5 files of 1.40 GiB" in text
    assert result["estimated_seconds"] == pytest.approx(40_000 * 3.7 + 161 * 10)
    assert result["epochs"] == pytest.approx(40_000 * 65_536 / 117_920_140)  # the seed's 22 passes
    assert "22.2 times" in result["warnings"][0]


def test_the_disk_counts_the_checkpoints_a_run_writes_and_those_a_resume_finds():
    """A run shorter than --ckpt-interval writes one checkpoint, at its end: that and best.pt, not --keep-last + 2.
    A resumed run's old checkpoints stay beside the new ones until rotation drops them."""
    cases = [  # (start, end, interval, already in --run-dir), files at the peak, what the line says
        ((0, 100, 1000, 0), 2, "1 checkpoint(s) and best.pt"),
        ((0, 20, 0, 0), 2, "1 checkpoint(s) and best.pt"),
        ((0, 3000, 1000, 0), 4, "3 checkpoint(s) and best.pt"),
        ((0, 3001, 1000, 0), 5, "3 kept, the next being written, best.pt"),
        ((9500, 10_000, 500, 3), 5, "3 kept, the next being written, best.pt"),
        ((900, 1000, 500, 1), 3, "2 checkpoint(s) and best.pt"),
    ]  # fmt: skip
    for (start, end, interval, kept), files, words in cases:
        facts = dataclasses.replace(t4_facts(), start_step=start, max_steps=end, ckpt_interval=interval,
                                    checkpoints_kept=kept)  # fmt: skip
        result = planning.make_plan(facts)
        assert result["checkpoint_bytes"] == files * 1_500_000_000, (start, end, interval, kept)
        assert words in "\n".join(planning.plan_lines(facts, result)), (start, end, interval, kept)
    loop = [step for step in range(901, 1201) if step == 1200 or step % 500 == 0]  # train()'s checkpoints
    facts = dataclasses.replace(t4_facts(), start_step=900, max_steps=1200, ckpt_interval=500)
    assert planning.checkpoints_written(facts) == len(loop) == 2
    assert planning.make_plan(facts)["seconds_between_checkpoints"], "two checkpoints: a time between them"

"""Training: each technique of the seed's steps 3-11 proven on CPU, and the loop end to end, killed and resumed.

python -m pytest tests/test_train.py -q
"""

import contextlib
import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from test_data import make_text, write_files
from test_evaluate import hellaswag_fixture

import evaluate
import gpt2lite.run
import prepare_data
import train_gpt2
from conftest import REPO, shared_file, tiny_config
from gpt2lite import checkpoints, devices
from gpt2lite.cli import InputError
from train_gpt2 import GPT, GPTConfig, accumulate_gradients, autocast_for, choose_precision, clip_and_step, get_lr


class FixedBatches:
    """A stand-in for DataLoader that hands out the given (x, y) batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def no_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


NEEDS_MUON = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")
OPTIMIZERS = [pytest.param([], id="adamw"), pytest.param(["--optimizer", "muon"], id="muon", marks=NEEDS_MUON)]


# --- the pieces -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "warmup, max_steps, step, expected",
    [(50, 1000, 0, 1.2000e-05), (50, 1000, 100, 5.9632e-04), (50, 1000, 500, 3.5230e-04), (50, 1000, 900, 7.4629e-05),
     (5, 100, 0, 1.2000e-04), (5, 100, 10, 5.9632e-04)],
)  # fmt: skip
def test_get_lr_reproduces_the_seed_table(warmup, max_steps, step, expected):
    assert f"{get_lr(step, warmup, max_steps, 6e-4, 6e-5):.4e}" == f"{expected:.4e}"


def test_lr_ends_of_the_schedule():
    assert get_lr(49, 50, 1000, 6e-4, 6e-5) == pytest.approx(6e-4)  # warmup reaches the peak
    assert get_lr(1000, 50, 1000, 6e-4, 6e-5) == pytest.approx(6e-5)
    assert get_lr(5000, 50, 1000, 6e-4, 6e-5) == pytest.approx(6e-5)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    decayed, not_decayed = (g["params"] for g in model.configure_optimizers(0.1, 6e-4).param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decayed) == 50 and len(not_decayed) == 98  # wte, wpe, 4 matrices x 12 blocks; biases and LayerNorms
    assert {names[id(p)] for p in decayed} >= {"transformer.wte.weight", "transformer.wpe.weight",
                                               "transformer.h.0.attn.c_attn.weight"}  # fmt: skip
    assert all(names[id(p)].endswith(".bias") or ".ln_" in names[id(p)] for p in not_decayed)


def test_precision_choice():
    assert choose_precision("cpu", "auto")[0] == "fp32"
    assert choose_precision("cpu", "bf16") == ("bf16", "as --dtype asked")


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    tokens = torch.randint(0, 64, (8, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = accumulate_gradients(model, FixedBatches([(x, y)]), 1, contextlib.nullcontext, no_scaler(), "cpu")
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    micro = FixedBatches([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])  # 4 micro batches of 2
    accumulated_loss = accumulate_gradients(model, micro, 4, contextlib.nullcontext, no_scaler(), "cpu")
    torch.testing.assert_close(accumulated_loss, loss, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        assert (p.grad - big[name]).norm() <= 1e-5 * big[name].norm(), name


@pytest.mark.parametrize("muon_lr", [None, pytest.param(0.02, marks=NEEDS_MUON)], ids=["adamw", "muon"])
def test_fp16_with_grad_scaler_reports_the_true_norm(muon_lr):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64))
    tokens = torch.randint(0, 64, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    norms = {}
    for precision in ("fp32", "fp16"):
        copy_ = copy.deepcopy(model)
        optimizer = copy_.configure_optimizers(0.1, 1e-3, muon_lr)
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        accumulate_gradients(copy_, FixedBatches([batch]), 1, autocast_for("cpu", precision), scaler, "cpu")
        norms[precision], skipped = clip_and_step(copy_, optimizer, scaler, 1e-3, grad_clip=1.0)
        assert not skipped
    assert scaler.get_scale() > 1000, "the gradients really were scaled"
    assert norms["fp16"].item() == pytest.approx(norms["fp32"].item(), rel=0.03)


def test_grad_scaler_overflow_is_reported_as_a_skipped_step():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    before = copy.deepcopy(model.state_dict())
    optimizer = model.configure_optimizers(0.1, 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16 gradients overflow at this scale
    tokens = torch.randint(0, 64, (2, 17))
    accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1, autocast_for("cpu", "fp16"),
                         scaler, "cpu")  # fmt: skip
    _, skipped = clip_and_step(model, optimizer, scaler, 1e-3, grad_clip=1.0)
    assert skipped and scaler.get_scale() < 2.0**120
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a skipped step changes nothing"


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = model.configure_optimizers(0.0, 3e-3)
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(40):
        loss = accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1,
                                    autocast_for("cpu", "bf16"), no_scaler(), "cpu")  # fmt: skip
        clip_and_step(model, optimizer, no_scaler(), 3e-3, 1.0)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_torch_compile_gives_the_eager_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    tokens = torch.randint(0, 64, (2, 17))
    _, eager = model(tokens[:, :-1], tokens[:, 1:])
    try:
        _, compiled = torch.compile(model)(tokens[:, :-1], tokens[:, 1:])
    except Exception as e:  # no C++ compiler: the training loop falls back the same way
        pytest.skip(f"torch.compile does not work on this machine: {e}")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # fused kernels round differently


# --- the loop, end to end -------------------------------------------------------------------------------------

TINY_RUN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "4",
            "--seq-len", "32", "--total-batch-size", "256", "--warmup-steps", "3", "--max-lr", "3e-3",
            "--min-lr", "3e-4", "--eval-steps", "2", "--device", "cpu"]  # fmt: skip


def small_shards(folder: Path) -> Path:
    """Shards of generated text in folder/data: enough for tiny runs, no shared data needed."""
    files = write_files(folder / "in", {f"doc{i}.txt": make_text(1500, seed=i) for i in range(4)})
    prepare_data.main(["--input", *files, "--out-dir", str(folder / "data"), "--shard-size", "3000", "--num-proc", "1"])
    return folder / "data"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("small-data"))


def run_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def interrupt_when(ready: Callable[[], bool], argv: list[str], sig: int = signal.SIGKILL) -> subprocess.Popen:
    """Start `train_gpt2.py argv`, and send it sig as soon as ready() holds (SIGKILL: a power cut, an out-of-memory
    kill). Returns the process, already ended for SIGKILL; for another signal, its stderr is to be read."""
    stderr = subprocess.DEVNULL if sig == signal.SIGKILL else subprocess.PIPE
    process = subprocess.Popen([sys.executable, "train_gpt2.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    if sig == signal.SIGKILL:
        process.wait()
    return process


def logged_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def logged_losses(run_dir: Path) -> list[tuple]:
    return [(e["step"], e["split"], e["loss"]) for e in logged_events(run_dir) if e["split"] in ("train", "val")]


def test_tiny_run_on_real_text_learns_logs_checkpoints_and_samples(tmp_path):
    text = shared_file("wikitext-2-raw/wiki.valid.raw")
    prepare_data.main(["--input", str(text), "--out-dir", str(tmp_path / "data"), "--num-proc", "1"])
    run = tmp_path / "run"
    result = run_train(*TINY_RUN, "--data-dir", str(tmp_path / "data"), "--run-dir", str(run), "--max-steps", "40",
                       "--eval-interval", "20", "--sample-interval", "40", "--ckpt-interval", "20")  # fmt: skip
    assert result.returncode == 0, result.stderr
    step_lines = [line for line in result.stdout.splitlines() if re.match(r"step \d+/40 \| loss", line)]
    assert len(step_lines) == 40
    assert re.fullmatch(r"step 39/40 \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| norm \d+\.\d\d \| \d+ ms \| "
                        r"[\d,]+ tok/s \| mfu \d+%", step_lines[-1])  # fmt: skip
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    samples = [e for e in events if e["split"] == "sample"]
    assert [e["step"] for e in samples] == [0, 40] and f"step 40 sample: {samples[-1]['text']!r}" in result.stdout
    train = [e for e in events if e["split"] == "train"]
    val = [e for e in events if e["split"] == "val"]
    assert {"step", "loss", "lr", "norm", "ms", "tok_s", "skipped"} <= set(train[0])
    assert [e["step"] for e in val] == [0, 20, 40]
    assert val[-1]["loss"] < val[0]["loss"] - 2.0, "40 steps should take the loss well below ln(50304) = 10.8"
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "ckpt_000020.pt", "ckpt_000040.pt"]

    checkpoint = torch.load(run / "ckpt_000040.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])
    assert {"optimizer", "scaler", "step", "model_config", "args", "train_loader", "rng"} <= set(checkpoint)
    sample = subprocess.run([sys.executable, "sample.py", "--init-from", str(run / "best.pt"), "--max-new-tokens", "5",
                             "--prompt", "The"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr
    train_gpt2.load_model(str(run / "best.pt")).save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(tmp_path, small_data, optimizer):
    settings = [*TINY_RUN, "--data-dir", str(small_data), "--max-steps", "24", "--eval-interval", "8",
                "--ckpt-interval", "6", "--sample-interval", "0", "--dropout", "0.1", *optimizer]  # fmt: skip
    straight = run_train(*settings, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    interrupt_when((killed / "ckpt_000012.pt").exists, [*settings, "--run-dir", str(killed)])
    assert not (killed / "ckpt_000024.pt").exists(), "the run finished before it could be killed"

    resumed = run_train("--resume", "--run-dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert logged_losses(killed) == logged_losses(tmp_path / "straight")
    # the summary covers the whole run, not only the part after the resume
    # the summary covers the whole run, as the straight run's does, not only the part after the resume
    summary, straight_summary = summary_of(resumed.stdout), summary_of(straight.stdout)
    assert summary[0] == f"run done: step 24 of 24 in {killed}"
    assert summary[1:3] == straight_summary[1:3]  # the best and last validation losses, the train loss
    assert summary[3].startswith("  tokens: 6,144 in 24 steps, ")
    assert re.fullmatch(r"  wall time: .* since the resume at step 1[28], .*", summary[4]), summary[4]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_torchrun_with_two_processes_equals_one_with_twice_the_accumulation(tmp_path, small_data, optimizer):
    hellaswag_fixture(tmp_path / "hellaswag.jsonl", n=7)  # 4 examples on one process, 3 on the other
    # 3 validation batches of 4 windows: under DDP, 8 windows a batch, and rank 1's half of the second is padding
    settings = [*TINY_RUN, "--data-dir", str(small_data), "--max-steps", "6", "--eval-interval", "3",
                "--eval-steps", "3", "--sample-interval", "0", "--ckpt-interval", "0", "--hellaswag-interval", "3",
                "--hellaswag-data", str(tmp_path / "hellaswag.jsonl"), *optimizer]  # fmt: skip
    single = run_train(*settings, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *settings, "--run-dir", str(tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 process(es) x 1 accumulation steps" in ddp.stdout
    assert "x 1 process(es) x 2 accumulation steps" in single.stdout
    assert ("shared out among 2 processes" in ddp.stdout) == bool(optimizer), "Muon's Newton-Schulz, shared out"
    assert ddp.stdout.count("step 5/6 | loss") == 1, "only rank 0 prints"
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert [e[:2] for e in one] == [e[:2] for e in two]
    for (_, _, a), (_, _, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)  # the same tokens, summed in another order
    hellaswag = [[e for e in logged_events(tmp_path / name) if e["split"] == "hellaswag"] for name in ("one", "two")]
    assert [e["step"] for e in hellaswag[0]] == [0, 3, 6] and all(e["examples"] == 7 for e in hellaswag[1])
    assert [e["acc_norm"] for e in hellaswag[0]] == [e["acc_norm"] for e in hellaswag[1]]  # counts summed over ranks
    assert "hellaswag acc_norm" in single.stdout


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, small_data, monkeypatch, capsys):
    real = train_gpt2.accumulate_gradients
    calls = {"n": 0}

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_gpt2, "accumulate_gradients", nan_at_step_5)
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"the loss became nan at step 5: training diverged \(the last checkpoint, "
                                         r".*ckpt_000004.pt, is intact\)"):  # fmt: skip
        train_gpt2.main([*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "10",
                         "--eval-interval", "5", "--ckpt-interval", "2", "--sample-interval", "0"])  # fmt: skip
    state = torch.load(run / "ckpt_000004.pt", weights_only=True)
    assert state["step"] == 4


def summary_of(stdout: str) -> list[str]:
    return stdout[stdout.index("run done:") :].splitlines()


def test_a_run_ends_with_a_summary_of_its_log_and_next_commands_that_run(tmp_path, small_data):
    run = tmp_path / "my run"  # a space: the commands must quote the paths
    result = run_train(*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "12",
                       "--eval-interval", "4", "--sample-interval", "0", "--ckpt-interval", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summary_of(result.stdout)
    events = logged_events(run)
    train = [e for e in events if e["split"] == "train"]
    val = [e for e in events if e["split"] == "val"]
    best = min(val, key=lambda e: e["loss"])
    tokens_per_s = 12 * 256 / (sum(e["ms"] for e in train) / 1000)  # every step 256 tokens
    recent = sum(e["loss"] for e in train[-10:]) / 10
    assert summary[:6] == [
        f"run done: step 12 of 12 in {run}",
        f"  validation loss: best {best['loss']:.4f} at step {best['step']}, last {val[-1]['loss']:.4f} at step 12",
        f"  train loss: {train[-1]['loss']:.4f} at step 11, {recent:.4f} over the last 10 steps",
        f"  tokens: 3,072 in 12 steps, {tokens_per_s:,.0f} tok/s on average over the steps",
        summary[4],
        f"  model to use: {run / 'best.pt'}",
    ]
    assert re.fullmatch(
        r"  wall time: \S+ \w+ from start to end, with evaluations, samples and checkpoints", summary[4]
    )
    assert summary[6] == "next:"
    commands = [shlex.split(line) for line in summary[7:]]
    assert [command[:2] for command in commands] == [
        ["python", "plot_losses.py"],
        ["python", "sample.py"],
        ["python", "export.py"],
        ["python", "evaluate.py"],
    ]
    for command in commands[:3]:  # the fourth downloads its benchmarks: its flags are checked instead
        done = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
    assert (run / "my run_loss.png").is_file() and (run / "hf" / "model.safetensors").is_file()
    assert evaluate.parse_args(commands[3][2:]).init_from == str(run / "best.pt")


def test_early_stopping_after_patience_evaluations(tmp_path, small_data, monkeypatch, capsys):
    val_losses = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    monkeypatch.setattr(train_gpt2, "estimate_loss", lambda *args: next(val_losses))
    run = tmp_path / "run"
    train_gpt2.main([*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "30",
                     "--eval-interval", "2", "--patience", "2", "--sample-interval", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "early stop: no better validation loss in 2 evaluations (best 4.0000)" in out
    assert f"run done: step 6 of 30 in {run} (stopped early)" in out
    assert "validation loss: best 4.0000 at step 2, last 4.6000 at step 6" in out
    assert max(e[0] for e in logged_losses(run)) == 6  # evaluations at 0, 2 (best), 4, 6: stop
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 2


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--total-batch-size", "1000"], "--total-batch-size 1,000 is not a multiple of batch-size x seq-len"),
        (["--seq-len", "128", "--total-batch-size", "512"], "--seq-len 128 is above the model's block size 64"),
        (["--warmup-steps", "10", "--max-steps", "10"], "--warmup-steps 10 must be below --max-steps 10"),
        (["--min-lr", "1e-2"], "--min-lr 0.01 must be at most --max-lr 0.003"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--data-dir", "NOWHERE"], "does not exist: run prepare_data.py first"),
        (["--hellaswag-interval", "5", "--hellaswag-data", "NOWHERE"], "HellaSwag file"),
        (["--hellaswag-interval", "-1"], "--hellaswag-interval must not be negative"),
        (["--data-dir", "NO_VAL"], "holds no val shards"),
        (["--batch-size", "128", "--seq-len", "64", "--total-batch-size", "8192"], "but one batch needs 128 windows"),
        (["--seed", "-1"], "--seed must not be negative"),
    ],
)
def test_bad_settings_get_one_line(tmp_path, small_data, extra, message):
    no_val = tmp_path / "no-val"
    no_val.mkdir()
    for path in small_data.glob("*_train_*.bin"):
        (no_val / path.name).write_bytes(path.read_bytes())
    args = [*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(tmp_path / "run"), "--max-steps", "10"]
    args += [{"NOWHERE": str(tmp_path / "nowhere"), "NO_VAL": str(no_val)}.get(a, a) for a in extra]
    result = run_train(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: "), result.stderr
    assert message in lines[0], lines[0]


def test_every_problem_is_reported_at_once_and_nothing_is_written(tmp_path, small_data):
    run, error = tmp_path / "run", "train_gpt2.py: error: "
    result = run_train(*TINY_RUN, "--data-dir", str(tmp_path / "no-data"), "--run-dir", str(run), "--max-steps", "10",
                       "--warmup-steps", "10", "--eval-steps", "0", "--device", "nosuch", "--init-from",
                       str(tmp_path / "no-model.pt"), "--hellaswag-interval", "5", "--hellaswag-data",
                       str(tmp_path / "no-hellaswag.jsonl"))  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith(error) for line in lines), lines
    assert [line.removeprefix(error).split(" ")[0] for line in lines] == [
        "--eval-steps", "device", "--warmup-steps", "data", str(tmp_path / "no-model.pt"), "HellaSwag"
    ], lines  # fmt: skip
    assert not run.exists()

    # a wrong model size leaves the model unbuilt; downloads (OpenAI's weights, HellaSwag) wait for a clean run
    waits = run_train(*TINY_RUN, "--data-dir", str(tmp_path / "no-data"), "--run-dir", str(run), "--n-head", "0",
                      "--init-from", "gpt2", "--hellaswag-interval", "5")  # fmt: skip
    assert waits.stderr.splitlines() == [
        f"{error}--n-head must be at least 1, got 0",
        f"{error}data folder {tmp_path / 'no-data'} does not exist: run prepare_data.py first, or pass --data-dir",
    ]
    assert not run.exists()


def test_resume_refuses_a_different_model_and_a_fresh_run_refuses_an_existing_one(tmp_path, small_data):
    run = tmp_path / "run"
    args = [*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "4", "--ckpt-interval",
            "2", "--eval-interval", "2", "--sample-interval", "0"]  # fmt: skip
    assert run_train(*args).returncode == 0
    again = run_train(*args)
    assert again.returncode == 1 and "already holds a run: pass --resume" in again.stderr
    missing = run_train("--resume", "--run-dir", str(tmp_path / "never-made"), "--data-dir", str(tmp_path / "no-data"))
    assert missing.returncode == 1 and "no-data does not exist" in missing.stderr
    assert not (tmp_path / "never-made").exists(), "a refused run creates nothing, --resume or not"
    other = run_train("--resume", "--run-dir", str(run), "--n-layer", "3")
    assert other.returncode == 1
    assert "--n-layer 3 differs from the checkpoint being resumed's 2" in other.stderr
    assert os.path.isfile(run / "ckpt_000004.pt")
    shorter = run_train("--resume", "--run-dir", str(run), "--max-steps", "3")
    assert shorter.returncode == 1 and "ckpt_000004.pt is at step 4, past --max-steps 3" in shorter.stderr

    # a finished run's log without its checkpoints (the README's reference runs) is a record, not a run to redo
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "log.jsonl").write_bytes((run / "log.jsonl").read_bytes())
    for flags in ([], ["--resume"]):
        refused = run_train(*args, "--run-dir", str(kept), *flags)
        assert (
            refused.returncode == 1 and "holds the log of a run that reached step 4 but no checkpoint" in refused.stderr
        )
    assert (kept / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes() and os.listdir(kept) == ["log.jsonl"]


def test_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, small_data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 0, "split": "val", "loss": 10.9}\n{"step": 0, "split": "tr')
    args = [*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "4", "--ckpt-interval",
            "4", "--eval-interval", "4", "--sample-interval", "0"]  # fmt: skip
    result = run_train(*args)
    assert result.returncode == 0, result.stderr
    assert "holds a log but no checkpoint: starting that run again from step 0" in result.stdout
    expected = [(0, "val"), (0, "train"), (1, "train"), (2, "train"), (3, "train"), (4, "val")]
    assert [(step, split) for step, split, _ in logged_losses(run)] == expected  # the old lines are gone


def test_a_failing_compile_is_explained_and_training_goes_on(tmp_path, small_data, monkeypatch, capsys):
    def broken_compile(model):
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    train_gpt2.main([*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(tmp_path / "run"), "--max-steps", "4",
                     "--eval-interval", "4", "--sample-interval", "0", "--compile"])  # fmt: skip
    out = capsys.readouterr().out
    assert "torch.compile failed (InductorError: no working C++ compiler found): training uncompiled" in out
    assert "compile False" in out and "step 3/4 | loss" in out


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 says so too: not trusted


@pytest.mark.parametrize(
    "name, capability, precision, tflops",
    [("Tesla T4", (7, 5), "fp16", 65.0), ("NVIDIA GeForce RTX 4080", (8, 9), "bf16", 97.5),
     ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", 989.0), ("Tesla V100-SXM2-16GB", (7, 0), "fp16", 125.0)],
)  # fmt: skip
def test_precision_and_mfu_peak_follow_the_card(monkeypatch, name, capability, precision, tflops):
    fake_gpu(monkeypatch, name, capability)
    assert choose_precision("cuda", "auto")[0] == precision
    assert devices.peak_flops("cuda", precision) == (tflops * 1e12, f"{name} data-sheet peak")


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
     ("NVIDIA GeForce RTX 4080", 97.5), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
     # names that contain a listed name but are another card: measured, not taken for it
     ("NVIDIA RTX A1000", None), ("NVIDIA GeForce RTX 4080 SUPER", None), ("NVIDIA GeForce RTX 4080 Laptop GPU", None),
     ("NVIDIA H100", None), ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", None)],
)  # fmt: skip
def test_the_peak_table_matches_exact_card_names(name, tflops):
    assert devices.datasheet_peak_flops(name, "bf16") == (None if tflops is None else tflops * 1e12)


def test_an_unlisted_card_gets_a_measured_peak(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4080 SUPER", (8, 9))
    measured = {torch.bfloat16: 123e12}
    monkeypatch.setattr(devices, "measure_matmul_flops", lambda device, dtype: measured[dtype])
    assert devices.peak_flops("cuda", "bf16") == (123e12, "measured bf16 matmul peak")


def test_bf16_is_refused_below_compute_capability_8(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(InputError, match=r"--dtype bf16 needs compute capability 8.0, and this Tesla T4 has 7.5 .*"
                                         r"use --dtype fp16"):  # fmt: skip
        choose_precision("cuda", "bf16")
    assert choose_precision("cuda", "fp16") == ("fp16", "as --dtype asked")
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4080", (8, 9))
    assert choose_precision("cuda", "bf16") == ("bf16", "as --dtype asked")


def test_flops_per_token_is_6n_plus_attention():
    config = GPTConfig(vocab_size=50304)
    with torch.device("meta"):
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    assert train_gpt2.flops_per_token(config, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_ctrl_c_ends_a_run_with_one_line_and_resume_continues_it(tmp_path, small_data):
    run = tmp_path / "run"
    args = [*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "400",
            "--eval-interval", "100", "--ckpt-interval", "2", "--sample-interval", "0"]  # fmt: skip
    process = interrupt_when((run / "ckpt_000004.pt").exists, args, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    match = re.fullmatch(r"train_gpt2.py: interrupted: `python train_gpt2.py --resume --run-dir (.*)` continues the "
                         r"run from step (\d+) \((.*)\)", line)  # fmt: skip
    assert match and Path(match[1]) == run, line
    assert Path(match[3]) == run / f"ckpt_{int(match[2]):06d}.pt" and Path(match[3]).is_file(), line
    resumed = run_train("--resume", "--run-dir", str(run), "--max-steps", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout and "step 7/8 | loss" in resumed.stdout


def test_init_from_a_checkpoint_starts_where_that_model_left_off(tmp_path, small_data):
    common = [*TINY_RUN, "--data-dir", str(small_data), "--eval-interval", "10", "--sample-interval", "0"]
    first = run_train(*common, "--run-dir", str(tmp_path / "first"), "--max-steps", "20", "--ckpt-interval", "20")
    assert first.returncode == 0, first.stderr
    final_val = [e for e in logged_losses(tmp_path / "first") if e[1] == "val"][-1][2]
    tuned = run_train(*common, "--run-dir", str(tmp_path / "tuned"), "--max-steps", "4", "--max-lr", "1e-4",
                      "--min-lr", "1e-5", "--init-from", str(tmp_path / "first" / "ckpt_000020.pt"),
                      "--dropout", "0.1")  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert "dropout=0.1" in tuned.stdout  # fine-tuning may add dropout to a model trained without it
    start_val = logged_losses(tmp_path / "tuned")[0]
    assert start_val[:2] == (0, "val") and start_val[2] == pytest.approx(final_val, rel=1e-6)
    refused = run_train(*common, "--run-dir", str(tmp_path / "other"), "--max-steps", "4", "--n-layer", "3",
                        "--n-embd", "96", "--init-from", str(tmp_path / "first" / "ckpt_000020.pt"))  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    source = tmp_path / "first" / "ckpt_000020.pt"
    assert refused.stderr.splitlines() == [  # every conflict at once, and no run directory in the advice
        f"train_gpt2.py: error: --n-embd 96 differs from {source}'s 64: drop the flag",
        f"train_gpt2.py: error: --n-layer 3 differs from {source}'s 2: drop the flag",
    ]
    assert not (tmp_path / "other").exists()


# --- resuming: on the CPU, across precisions, before the first checkpoint, past a damaged one -------------------


def tiny_run_args(data: Path, run: Path, max_steps: int, *extra: str) -> list[str]:
    return [*TINY_RUN, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", str(max_steps),
            "--eval-interval", "2", "--ckpt-interval", "2", "--sample-interval", "0", *extra]  # fmt: skip


def test_each_checkpoint_written_gets_a_line_with_its_size_and_time(tmp_path, small_data, capsys):
    run = tmp_path / "run"
    train_gpt2.main(tiny_run_args(small_data, run, 4))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint ")]
    written = [f"{run / 'best.pt'}", f"{run / 'ckpt_000002.pt'}", f"{run / 'ckpt_000004.pt'}"]
    assert {line.split(":")[0].removeprefix("checkpoint ") for line in lines} == set(written)
    for line in lines:
        size = os.path.getsize(line.split(":")[0].removeprefix("checkpoint "))
        assert re.fullmatch(rf"checkpoint .+: {size / 1e6:,.1f} MB in \d+\.\d s", line), line


def test_a_resume_reads_its_checkpoint_on_the_cpu(tmp_path, small_data, monkeypatch, capsys):
    run = tmp_path / "run"
    train_gpt2.main(tiny_run_args(small_data, run, 4))
    mapped_to = []
    real_load = torch.load

    def spy(*args, **kwargs):
        mapped_to.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    # cpu:0 stands in for cuda:0, which a checkpoint mapped to the run's device would turn its RNG states into
    train_gpt2.main(["--resume", "--run-dir", str(run), "--max-steps", "6", "--device", "cpu:0"])
    assert "resuming at step 4 of 6" in capsys.readouterr().out
    assert mapped_to == ["cpu"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("first, then", [("fp32", "fp16"), ("fp16", "fp32")])
def test_a_run_resumes_in_another_precision(tmp_path, small_data, capsys, first, then, optimizer):
    """A Colab run moves between a T4 (fp16 + GradScaler) and an L4 or A100 (bf16, no scaler): a disabled
    GradScaler saves an empty state, which an enabled one must not be asked to load."""
    run = tmp_path / "run"
    train_gpt2.main(tiny_run_args(small_data, run, 4, "--dtype", first, *optimizer))
    assert bool(torch.load(run / "ckpt_000004.pt", weights_only=True)["scaler"]) == (first == "fp16")
    capsys.readouterr()
    train_gpt2.main(["--resume", "--run-dir", str(run), "--max-steps", "6", "--dtype", then])
    out = capsys.readouterr().out
    assert f"precision {then} (as --dtype asked)" in out and "resuming at step 4 of 6" in out
    assert [e[:2] for e in logged_losses(run) if e[0] >= 4] == [(4, "val"), (4, "train"), (5, "train"), (6, "val")]
    assert all(math.isfinite(e[2]) for e in logged_losses(run))


def test_resume_starts_a_run_that_has_no_checkpoint_yet_and_loses_nothing_when_killed_before_one(tmp_path, small_data):
    """--resume serves a run's first start and every restart: killed before its first checkpoint and started again
    with the same command, a run logs what one never stopped logs."""
    settings = [*TINY_RUN, "--data-dir", str(small_data), "--max-steps", "30", "--eval-interval", "10",
                "--ckpt-interval", "0", "--sample-interval", "0", "--dropout", "0.1", "--resume"]  # fmt: skip
    straight = run_train(*settings, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    assert "holds no checkpoint yet: starting the run at step 0" in straight.stdout

    killed, log = tmp_path / "killed", tmp_path / "killed" / "log.jsonl"
    five_steps_logged = lambda: log.exists() and log.read_text().count('"train"') >= 5  # noqa: E731
    interrupt_when(five_steps_logged, [*settings, "--run-dir", str(killed)])
    assert not list(killed.glob("*.pt")), "the run wrote a checkpoint before it could be killed"

    again = run_train(*settings, "--run-dir", str(killed))
    assert again.returncode == 0, again.stderr
    assert logged_losses(killed) == logged_losses(tmp_path / "straight")


def test_resume_skips_a_damaged_latest_checkpoint_and_keeps_it(tmp_path, small_data, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train_gpt2.main(tiny_run_args(small_data, straight, 6))
    train_gpt2.main(tiny_run_args(small_data, run, 4))
    damaged = run / "ckpt_000004.pt"
    damaged.write_bytes(damaged.read_bytes()[:5000])  # cut short, as by a full disk
    capsys.readouterr()
    train_gpt2.main(["--resume", "--run-dir", str(run), "--max-steps", "6", "--ckpt-interval", "5"])
    out = capsys.readouterr().out
    assert re.search(r"--resume: skipping .*ckpt_000004.pt is not a readable gpt2-lite checkpoint \(.*\); the file "
                     r"is left as it is", out)  # fmt: skip
    assert f"resuming at step 2 of 6 from {run / 'ckpt_000002.pt'}" in out
    assert damaged.stat().st_size == 5000, "the skipped file is kept"
    assert logged_losses(run) == logged_losses(straight)  # steps 2 and 3 again, exactly as before

    for path in run.glob("ckpt_*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"--resume: none of the 3 checkpoints in .* loads \(.*ckpt_000006.pt is not"):
        train_gpt2.main(["--resume", "--run-dir", str(run), "--max-steps", "8"])


def test_the_line_after_ctrl_c_says_where_a_resume_would_start(tmp_path):
    assert checkpoints.resume_hint(str(tmp_path)) == (
        f"{tmp_path} holds no checkpoint yet, so `python train_gpt2.py --resume --run-dir {tmp_path}` starts the run "
        "again from step 0"
    )
    (tmp_path / "ckpt_000250.pt").write_bytes(b"")
    (tmp_path / "ckpt_000500.pt").write_bytes(b"")
    assert checkpoints.resume_hint(str(tmp_path)) == (
        f"`python train_gpt2.py --resume --run-dir {tmp_path}` continues the run from step 500 "
        f"({tmp_path / 'ckpt_000500.pt'})"
    )


def test_rotation_empties_a_checkpoint_before_deleting_it_unless_it_has_another_link(tmp_path):
    """On a mounted Google Drive a deleted file lingers in the trash at full size; an emptied one does not."""
    alone, linked = tmp_path / "ckpt_000001.pt", tmp_path / "ckpt_000002.pt"
    alone.write_bytes(b"x" * 1000)
    linked.write_bytes(b"y" * 1000)
    os.link(linked, tmp_path / "kept-by-the-user.pt")
    with open(alone, "rb") as still_open:  # what the trash would keep: the file's data after the delete
        checkpoints.remove_checkpoint(str(alone))
        assert os.fstat(still_open.fileno()).st_size == 0
    checkpoints.remove_checkpoint(str(linked))
    assert not alone.exists() and not linked.exists()
    assert (tmp_path / "kept-by-the-user.pt").read_bytes() == b"y" * 1000


@pytest.mark.parametrize(
    "argv, warmup",
    [([], 2000), (["--max-steps", "100"], 5), (["--max-steps", "100000"], 2000), (["--max-steps", "10"], 0),
     (["--max-steps", "100", "--warmup-steps", "50"], 50)],
)  # fmt: skip
def test_warmup_defaults_to_5_percent_of_the_steps_capped_at_2000(argv, warmup):
    args, _ = train_gpt2.parse_args(argv)
    gpt2lite.run.check_schedule(args)
    assert args.warmup_steps == warmup


@pytest.mark.parametrize(
    "argv, given",
    [([], set()), (["--max-steps", "100"], {"max_steps"}), (["--max-steps=100"], {"max_steps"}),
     (["--max-st", "100", "--no-compile", "--resume"], {"max_steps", "compile", "resume"})],
)  # fmt: skip
def test_a_flag_counts_as_given_however_it_is_spelled(argv, given):
    """A resume puts back each of the run's settings that was not given: an abbreviated flag was given too."""
    args, found = train_gpt2.parse_args(argv)
    assert found == given
    assert args.n_layer == 12 and args.max_steps == (100 if given & {"max_steps"} else 40000)


# --- torch.compile and DDP --------------------------------------------------------------------------------------


def counting_compile(monkeypatch) -> list[bool]:
    """torch.compile with a backend that runs the traced graph as it is (no C++ compiler needed) and records, for
    each graph it is given, whether DDP's forward was running: Dynamo's DDP optimisation only happens then."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled_inside_ddp = []

    def backend(graph_module, example_inputs):
        compiled_inside_ddp.append(DDP._get_active_ddp_module() is not None)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=backend))
    return compiled_inside_ddp


# validation's batch is training's micro batch, or 4 beside a larger one (gpt2lite/run.py: eval_batch)
@pytest.mark.parametrize("train_rows, val_rows", [(2, 2), (4, 2)])
def test_ddp_is_wrapped_before_compiling_and_both_graphs_compile_up_front(tmp_path, small_data, monkeypatch,
                                                                           train_rows, val_rows):  # fmt: skip
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled_inside_ddp = counting_compile(monkeypatch)
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        args, _ = train_gpt2.parse_args(["--batch-size", str(train_rows), "--seq-len", "16", "--dropout", "0.1",
                                         "--compile"])  # fmt: skip
        raw = GPT(tiny_config(vocab_size=50304, dropout=0.1))
        val_loader = train_gpt2.DataLoader(str(small_data), "val", val_rows, 16)
        run = SimpleNamespace(raw_model=raw, device="cpu", args=args, autocast=contextlib.nullcontext, say=print,
                              val_loader=val_loader, micro_batch=train_rows, wants_compile=True)  # fmt: skip
        model, compiled = train_gpt2.wrap_model(run)
        assert compiled and isinstance(model._orig_mod, DDP) and model._orig_mod.module is raw
        assert len(compiled_inside_ddp) >= 2 and all(compiled_inside_ddp), "train and eval graphs, inside DDP"
        assert all(p.grad is None for p in raw.parameters()), "the throwaway batch leaves no gradient behind"
        graphs = len(compiled_inside_ddp)

        # what the loop then does compiles nothing more: an evaluation, then a training step
        train_gpt2.estimate_loss(model, val_loader, 2 * val_rows, contextlib.nullcontext, "cpu")
        train_loader = train_gpt2.DataLoader(str(small_data), "train", train_rows, 16)
        accumulate_gradients(model, train_loader, 2, contextlib.nullcontext, no_scaler(), "cpu")
        assert len(compiled_inside_ddp) == graphs
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_a_compile_that_fails_only_for_evaluation_falls_back_before_training(tmp_path, small_data, monkeypatch,
                                                                              capsys):  # fmt: skip
    real_compile = torch.compile

    def compile_without_an_eval_graph(model):
        compiled = real_compile(model, backend="eager")

        def call(*args, **kwargs):
            if not torch.is_grad_enabled():
                raise RuntimeError("BackendCompilerFailed: no eval graph")
            return compiled(*args, **kwargs)

        return call

    monkeypatch.setattr(torch, "compile", compile_without_an_eval_graph)
    train_gpt2.main(tiny_run_args(small_data, tmp_path / "run", 4, "--compile"))
    out = capsys.readouterr().out
    assert "torch.compile failed (BackendCompilerFailed: no eval graph): training uncompiled" in out
    assert "compile False" in out and "step 4/4 | val loss" in out
    torch._dynamo.reset()


def test_mfu_on_a_cpu_stays_below_100_percent_at_the_cpu_demo_shapes(tmp_path, capsys):
    """The measured peak is warm, large enough and the run's dtype: no step can look faster than the machine."""
    text = write_files(tmp_path / "text", {"text.txt": make_text(6000, seed=0)})
    prepare_data.main(["--input", *text, "--val-fraction", "0.2", "--out-dir", str(tmp_path / "data"),
                       "--num-proc", "1"])  # fmt: skip
    train_gpt2.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                     "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "128", "--batch-size", "8",
                     "--seq-len", "128", "--total-batch-size", "1024", "--max-steps", "6", "--eval-interval", "6",
                     "--eval-steps", "1", "--sample-interval", "0", "--ckpt-interval", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"mfu against the measured fp32 matmul peak, [\d.]+ TFLOP/s", out)
    mfu = [int(m) for m in re.findall(r"\| mfu (\d+)%", out)]
    assert len(mfu) == 6 and all(0 < m < 100 for m in mfu), mfu

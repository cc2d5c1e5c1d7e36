"""Training: each technique of the seed's steps 3-11 proven on CPU, and the loop end to end, killed and resumed.

python -m pytest tests/test_train.py -q
"""

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data import make_text, write_files
from test_evaluate import hellaswag_fixture

import prepare_data
import train_gpt2
from conftest import REPO, shared_file, tiny_config
from train_gpt2 import (
    GPT,
    GPTConfig,
    InputError,
    accumulate_gradients,
    autocast_for,
    choose_precision,
    get_lr,
    step_optimizer,
)


class FixedBatches:
    """A stand-in for DataLoader that hands out the given (x, y) batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def no_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


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
    decayed, not_decayed = (g["params"] for g in model.configure_optimizers(0.1, 6e-4, "cpu").param_groups)
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


def test_fp16_with_grad_scaler_reports_the_true_norm():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64))
    tokens = torch.randint(0, 64, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    norms = {}
    for precision in ("fp32", "fp16"):
        copy_ = copy.deepcopy(model)
        optimizer = copy_.configure_optimizers(0.1, 1e-3, "cpu")
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        accumulate_gradients(copy_, FixedBatches([batch]), 1, autocast_for("cpu", precision), scaler, "cpu")
        norms[precision], skipped = step_optimizer(copy_, optimizer, scaler, 1e-3, grad_clip=1.0)
        assert not skipped
    assert scaler.get_scale() > 1000, "the gradients really were scaled"
    assert norms["fp16"].item() == pytest.approx(norms["fp32"].item(), rel=0.03)


def test_grad_scaler_overflow_is_reported_as_a_skipped_step():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    before = copy.deepcopy(model.state_dict())
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16 gradients overflow at this scale
    tokens = torch.randint(0, 64, (2, 17))
    accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1, autocast_for("cpu", "fp16"),
                         scaler, "cpu")  # fmt: skip
    _, skipped = step_optimizer(model, optimizer, scaler, 1e-3, grad_clip=1.0)
    assert skipped and scaler.get_scale() < 2.0**120
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a skipped step changes nothing"


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = model.configure_optimizers(0.0, 3e-3, "cpu")
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(40):
        loss = accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1,
                                    autocast_for("cpu", "bf16"), no_scaler(), "cpu")  # fmt: skip
        step_optimizer(model, optimizer, no_scaler(), 3e-3, 1.0)
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


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Shards of generated text: enough for tiny runs, no shared data needed."""
    folder = tmp_path_factory.mktemp("small-data")
    files = write_files(folder / "in", {f"doc{i}.txt": make_text(1500, seed=i) for i in range(4)})
    prepare_data.main(["--input", *files, "--out-dir", str(folder / "data"), "--shard-size", "3000", "--num-proc", "1"])
    return folder / "data"


def run_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


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


def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(tmp_path, small_data):
    settings = [*TINY_RUN, "--data-dir", str(small_data), "--max-steps", "24", "--eval-interval", "8",
                "--ckpt-interval", "6", "--sample-interval", "0", "--dropout", "0.1"]  # fmt: skip
    assert run_train(*settings, "--run-dir", str(tmp_path / "straight")).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "train_gpt2.py", *settings, "--run-dir", str(killed)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "ckpt_000012.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "ckpt_000024.pt").exists(), "the run finished before it could be killed"

    resumed = run_train("--resume", "--run-dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert logged_losses(killed) == logged_losses(tmp_path / "straight")


def test_torchrun_with_two_processes_equals_one_with_twice_the_accumulation(tmp_path, small_data):
    hellaswag_fixture(tmp_path / "hellaswag.jsonl", n=7)  # 4 examples on one process, 3 on the other
    settings = [*TINY_RUN, "--data-dir", str(small_data), "--max-steps", "6", "--eval-interval", "3",
                "--sample-interval", "0", "--ckpt-interval", "0", "--hellaswag-interval", "3",
                "--hellaswag-data", str(tmp_path / "hellaswag.jsonl")]  # fmt: skip
    single = run_train(*settings, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *settings, "--run-dir", str(tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 process(es) x 1 accumulation steps" in ddp.stdout
    assert "x 1 process(es) x 2 accumulation steps" in single.stdout
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


def test_early_stopping_after_patience_evaluations(tmp_path, small_data, monkeypatch, capsys):
    val_losses = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    monkeypatch.setattr(train_gpt2, "estimate_loss", lambda *args: next(val_losses))
    run = tmp_path / "run"
    train_gpt2.main([*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "30",
                     "--eval-interval", "2", "--patience", "2", "--sample-interval", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "early stop: no better validation loss in 2 evaluations (best 4.0000)" in out
    assert max(e[0] for e in logged_losses(run)) == 6  # evaluations at 0, 2 (best), 4, 6: stop
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 2


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--total-batch-size", "1000"], "--total-batch-size 1,000 is not a multiple of batch-size x seq-len"),
        (["--seq-len", "128", "--total-batch-size", "512"], "--seq-len 128 is above the model's block size 64"),
        (["--warmup-steps", "10", "--max-steps", "10"], "--warmup-steps 10 must be below --max-steps 10"),
        (["--min-lr", "1e-2"], "--min-lr 0.01 must be positive and at most --max-lr"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--resume"], "holds no checkpoint (ckpt_NNNNNN.pt) to continue from"),
        (["--data-dir", "NOWHERE"], "does not exist: run prepare_data.py first"),
        (["--hellaswag-interval", "5", "--hellaswag-data", "NOWHERE"], "HellaSwag file"),
        (["--hellaswag-interval", "-1"], "--hellaswag-interval must not be negative"),
        (["--data-dir", "NO_VAL"], "holds no val shards"),
        (["--batch-size", "64", "--seq-len", "64", "--total-batch-size", "4096"], "but one batch needs 4,097"),
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


def test_resume_refuses_a_different_model_and_a_fresh_run_refuses_an_existing_one(tmp_path, small_data):
    run = tmp_path / "run"
    args = [*TINY_RUN, "--data-dir", str(small_data), "--run-dir", str(run), "--max-steps", "4", "--ckpt-interval",
            "2", "--eval-interval", "2", "--sample-interval", "0"]  # fmt: skip
    assert run_train(*args).returncode == 0
    again = run_train(*args)
    assert again.returncode == 1 and "already holds a run: pass --resume" in again.stderr
    missing = run_train("--resume", "--run-dir", str(tmp_path / "never-made"))
    assert missing.returncode == 1 and "holds no checkpoint" in missing.stderr
    assert not (tmp_path / "never-made").exists()
    other = run_train("--resume", "--run-dir", str(run), "--n-layer", "3")
    assert other.returncode == 1
    assert "--n-layer 3 differs from the checkpoint being resumed's 2" in other.stderr
    assert os.path.isfile(run / "ckpt_000004.pt")


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


@pytest.mark.parametrize(
    "name, capability, precision",
    [("Tesla T4", (7, 5), "fp16"), ("NVIDIA GeForce RTX 4080", (8, 9), "bf16"),
     ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"), ("Tesla V100-SXM2-16GB", (7, 0), "fp16")],
)  # fmt: skip
def test_precision_and_mfu_peak_follow_the_card(monkeypatch, name, capability, precision):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 says so too: not trusted
    assert choose_precision("cuda", "auto")[0] == precision
    peak, source = train_gpt2.peak_flops("cuda", precision)
    half, _ = next(v for k, v in train_gpt2.GPU_PEAK_TFLOPS.items() if k in name)
    assert peak == half * 1e12 and source == f"{name} data-sheet peak"


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
    process = subprocess.Popen([sys.executable, "train_gpt2.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / "ckpt_000004.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        "train_gpt2.py: interrupted (a training run continues with --resume from its last checkpoint)"
    ]
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
                        "--init-from", str(tmp_path / "first" / "ckpt_000020.pt"))  # fmt: skip
    assert refused.returncode == 1 and "--n-layer 3 differs from" in refused.stderr

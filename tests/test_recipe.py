"""The token-efficient recipe on GPT-2's own architecture: the warmup-stable-decay schedule, Muon for the blocks'
matrices beside AdamW for the rest, and --batch-size auto. The runs that resume, mix precisions, train under DDP and
plan with Muon are the same tests as AdamW's, parametrized (test_train.py, test_plan.py).

python -m pytest tests/test_recipe.py -q
"""

import contextlib
import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import TINY_RUN, FixedBatches, logged_events, logged_losses, no_scaler, run_train, small_shards

import train_gpt2
from conftest import tiny_config
from gpt2lite import planning
from gpt2lite.cli import InputError
from gpt2lite.optimizers import JointOptimizer, unallocated_state_bytes
from gpt2lite.run import Processes
from train_gpt2 import GPT, GPTConfig, accumulate_gradients, autocast_for, clip_and_step, get_lr

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("recipe-data"))


# --- the warmup-stable-decay schedule ---------------------------------------------------------------------------


def wsd(step: int, max_steps: int = 1000) -> float:
    return get_lr(step, 50, max_steps, 6e-4, 6e-5, "wsd", 0.2)


def test_wsd_warms_up_holds_then_decays_linearly_over_the_last_fifth():
    assert wsd(0) == pytest.approx(6e-4 / 50) and wsd(49) == pytest.approx(6e-4)  # the same warmup as the cosine
    assert wsd(0) == get_lr(0, 50, 1000, 6e-4, 6e-5) and wsd(49) == get_lr(49, 50, 1000, 6e-4, 6e-5)
    assert {wsd(step) for step in range(50, 801)} == {6e-4}, "flat from the warmup's end to the decay's start"
    assert wsd(801) == pytest.approx(6e-5 + 5.4e-4 * 199 / 200)  # the decay: 200 steps, 800 -> 1000
    assert wsd(900) == pytest.approx((6e-4 + 6e-5) / 2)
    assert wsd(999) == pytest.approx(6e-5 + 5.4e-4 / 200)
    assert wsd(1000) == wsd(5000) == 6e-5
    rates = [wsd(step) for step in range(800, 1001)]
    steps_down = [a - b for a, b in zip(rates, rates[1:])]
    assert all(down == pytest.approx(5.4e-4 / 200) for down in steps_down), "a straight line"
    # with twice the steps, the same flat rate, and the decay at the new end
    assert {get_lr(step, 50, 2000, 6e-4, 6e-5, "wsd", 0.2) for step in range(50, 1601)} == {6e-4}


def test_a_wsd_run_resumed_from_its_flat_part_with_more_steps_runs_as_if_planned_that_long(tmp_path, data):
    """The lr of the flat part does not depend on --max-steps: a 12-step run resumed from its step-8 checkpoint
    with --max-steps 24 logs what a 24-step run logs, losses and learning rates, bit for bit."""
    common = [*TINY_RUN, "--data-dir", str(data), "--schedule", "wsd", "--eval-interval", "4", "--ckpt-interval", "4",
              "--sample-interval", "0", "--keep-last", "5"]  # fmt: skip
    straight = run_train(*common, "--run-dir", str(tmp_path / "straight"), "--max-steps", "24")
    assert straight.returncode == 0, straight.stderr
    short = tmp_path / "short"
    assert run_train(*common, "--run-dir", str(short), "--max-steps", "12").returncode == 0
    (short / "ckpt_000012.pt").unlink()  # steps 10 and 11 were its decay: continue from the flat part's step 8
    longer = run_train("--resume", "--run-dir", str(short), "--max-steps", "24")
    assert longer.returncode == 0, longer.stderr
    assert logged_losses(short) == logged_losses(tmp_path / "straight")
    lrs = [e["lr"] for e in logged_events(short) if e["split"] == "train"]
    assert lrs == [get_lr(step, 3, 24, 3e-3, 3e-4, "wsd", 0.2) for step in range(24)]
    assert lrs[3:19] == [3e-3] * 16 and lrs[19:] == sorted(lrs[19:], reverse=True)  # decay: steps 19 to 23


# --- Muon beside AdamW ------------------------------------------------------------------------------------------


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    optimizer = model.configure_optimizers(0.1, 6e-4, muon_lr=0.02)
    muon, adamw = optimizer.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    kinds = {name.split(".", 3)[3] for name in on_muon}
    assert len(on_muon) == 48 and kinds == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                            "mlp.c_proj.weight"}  # fmt: skip
    decayed, not_decayed = (group["params"] for group in adamw.param_groups)
    assert {names[id(p)] for p in decayed} == {"transformer.wte.weight", "transformer.wpe.weight"}  # and the head
    assert len(not_decayed) == 98 and all(p.dim() == 1 for p in not_decayed)
    every = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters())), "each parameter once"
    (group,) = muon.param_groups
    assert group["lr"] == 0.02 and group["lr_scale"] == pytest.approx(0.02 / 6e-4)
    # the same pull toward zero per step as AdamW's: lr x weight decay
    assert group["lr"] * group["weight_decay"] == pytest.approx(6e-4 * 0.1)
    assert unallocated_state_bytes(optimizer) == 4 * (sum(p.numel() for p in every) + sum(
        p.numel() for p in every if names[id(p)] not in on_muon))  # fmt: skip


def test_the_schedule_scales_both_rates():
    model = GPT(tiny_config())
    optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
    tokens = torch.randint(0, 64, (2, 17))
    accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1, contextlib.nullcontext,
                         no_scaler(), "cpu")  # fmt: skip
    clip_and_step(model, optimizer, no_scaler(), 2.5e-4, 1.0)  # a quarter of AdamW's peak
    muon, adamw = optimizer.optimizers
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 / 4) and {g["lr"] for g in adamw.param_groups} == {2.5e-4}


def test_muon_learns_a_batch_faster_than_adamw_at_their_usual_rates():
    """Not the recipe's evidence (bench.py recipe is), only that the update goes downhill: 30 steps on one batch."""
    losses = {}
    for muon_lr in (None, 0.02):
        torch.manual_seed(0)
        model = GPT(tiny_config(n_embd=64, n_head=4))
        optimizer = model.configure_optimizers(0.0, 1e-3, muon_lr)
        tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(30):
            loss = accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1,
                                        contextlib.nullcontext, no_scaler(), "cpu")  # fmt: skip
            clip_and_step(model, optimizer, no_scaler(), 1e-3, 1.0)
        losses[muon_lr] = loss.item()
    assert losses[0.02] < losses[None] < math.log(64)


def test_an_fp16_overflow_in_one_optimizers_gradients_skips_both():
    """Stepped apart, Muon would step on gradients that clipping had just zeroed (an infinite norm); joined, the step
    is skipped for every parameter, and the loss scale goes down."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
    assert isinstance(optimizer, JointOptimizer)
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tokens = torch.randint(0, 64, (2, 17))
    accumulate_gradients(model, FixedBatches([(tokens[:, :-1], tokens[:, 1:])]), 1, autocast_for("cpu", "fp16"),
                         scaler, "cpu")  # fmt: skip
    model.transformer.ln_f.weight.grad[0] = float("inf")  # AdamW's; every matrix of Muon's is finite
    norm, skipped = clip_and_step(model, optimizer, scaler, 1e-3, grad_clip=1.0)
    assert skipped and not math.isfinite(norm.item()) and scaler.get_scale() < 1024.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a skipped step changes nothing"
    assert not optimizer.state, "nor does it start either optimizer's state"


def test_a_resume_takes_a_new_muon_lr_and_refuses_another_optimizer(tmp_path, data):
    run = tmp_path / "run"
    args = [*TINY_RUN, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", "4", "--ckpt-interval", "2",
            "--eval-interval", "2", "--sample-interval", "0", "--optimizer", "muon"]  # fmt: skip
    first = run_train(*args)
    assert first.returncode == 0, first.stderr
    assert "Muon on the blocks' 8 matrices (98,304 parameters), peak lr 0.01; AdamW on the rest, peak lr 0.003" in (
        first.stdout
    )
    refused = run_train("--resume", "--run-dir", str(run), "--max-steps", "6", "--optimizer", "adamw")
    assert refused.returncode == 1 and refused.stderr.splitlines() == [
        f"train_gpt2.py: error: --optimizer adamw differs from {run / 'ckpt_000004.pt'}'s muon, whose state the "
        "checkpoint holds: drop the flag, or start a new --run-dir"
    ]
    resumed = run_train("--resume", "--run-dir", str(run), "--max-steps", "6", "--muon-lr", "0.03")
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / "ckpt_000006.pt", weights_only=True)
    muon_state, adamw_state = state["optimizer"]["optimizers"]
    assert muon_state["param_groups"][0]["lr_scale"] == pytest.approx(0.03 / 3e-3), "the new --muon-lr applies"
    assert all("momentum_buffer" in s for s in muon_state["state"].values())
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in adamw_state["state"].values())


def test_a_torch_without_muon_gets_one_line(tmp_path, data, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    with pytest.raises(InputError) as error:
        train_gpt2.main([*TINY_RUN, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--max-steps", "4",
                         "--optimizer", "muon"])  # fmt: skip
    assert str(error.value) == (
        "--optimizer muon needs torch 2.9 or newer (torch.optim.Muon), and this is torch 2.8.0: pip install "
        "'torch>=2.9', or use --optimizer adamw"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schedule", "wsd", "--warmup-steps", "9"], "--schedule wsd: --warmup-steps 9 and the decay's 2 steps "
                                                       "(--decay-fraction 0.2) add up to more than --max-steps 10"),
        (["--decay-fraction", "0"], "--decay-fraction must be in (0, 1], got 0.0"),
        (["--muon-lr", "-1"], "--muon-lr must be positive, got -1.0"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["--batch-size", "many"], "invalid micro_batch value: 'many'"),
    ],
)  # fmt: skip
def test_bad_recipe_settings_get_one_line(tmp_path, data, extra, message):
    result = run_train(*TINY_RUN, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--max-steps", "10",
                       *extra)  # fmt: skip
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode != 0 and line.startswith("train_gpt2.py: error: ") and message in line, result.stderr


# --- --batch-size auto ------------------------------------------------------------------------------------------


def test_auto_is_the_default_and_off_cuda_the_seeds_micro_batch_of_4(tmp_path, data):
    at = TINY_RUN.index("--batch-size")
    settings = TINY_RUN[:at] + TINY_RUN[at + 2 :]
    args, _ = train_gpt2.parse_args(settings)
    assert args.batch_size == "auto"
    run = tmp_path / "run"
    result = run_train(*settings, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", "4",
                       "--ckpt-interval", "4", "--eval-interval", "4", "--sample-interval", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "batch 256 tokens = 4 x 32 x 1 process(es) x 2 accumulation steps" in result.stdout
    assert "--batch-size auto" not in result.stdout, "nothing measured, nothing to say"
    assert torch.load(run / "ckpt_000004.pt", weights_only=True)["args"]["batch_size"] == 4


@pytest.mark.parametrize(
    "sequences, largest_that_fits, expected",
    [(64, 16, 16), (64, 1000, 64), (48, 1000, 16), (48, 8, 8), (7, 1000, 1), (64, 0, 0), (1, 1000, 1)],
)
def test_the_largest_power_of_two_that_divides_a_step_and_fits(sequences, largest_that_fits, expected):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest_that_fits

    assert planning.largest_power_of_two(sequences, fits) == expected
    assert tried == [2**i for i in range(len(tried))], "1, 2, 4, ... until one does not fit or divide"


def test_fit_micro_batch_rebuilds_the_loaders_and_keeps_the_tokens_per_step(data, monkeypatch, capsys):
    """What --batch-size auto does with what the GPU probe found (the probe itself is CUDA's: tests/test_gpu.py):
    training takes the micro batch found, validation keeps the seed's 4 unless fewer fit."""
    found = {"largest": 8}

    def probe(model, autocast, scaler, device, seq_len, sequences_per_step, reserve_bytes):
        found.update(sequences=sequences_per_step, reserve=reserve_bytes)
        return found["largest"]

    monkeypatch.setattr(planning, "largest_micro_batch", probe)
    monkeypatch.setattr(planning, "memory_budget", lambda device: 14 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    args, _ = train_gpt2.parse_args([*TINY_RUN, "--data-dir", str(data), "--total-batch-size", "512"])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    run = SimpleNamespace(args=args, procs=Processes(0, 0, 1), world_size=1, raw_model=model, device="cpu",
                          autocast=contextlib.nullcontext, scaler=no_scaler(),
                          optimizer=model.configure_optimizers(0.1, 1e-3), say=print)  # fmt: skip
    for largest, val_rows in ((8, 4), (2, 2)):
        found["largest"], args.batch_size = largest, "auto"
        run.train_loader = train_gpt2.DataLoader(str(data), "train", 1, 32)  # as check_inputs leaves them
        run.val_loader = train_gpt2.DataLoader(str(data), "val", 4, 32)
        planning.fit_micro_batch(run)
        assert found["sequences"] == 16 and found["reserve"] == 8 * sum(p.numel() for p in model.parameters())
        assert args.batch_size == largest and run.grad_accum_steps == 16 // largest
        assert run.train_loader.B == largest and run.train_loader.seed == args.seed and run.val_loader.B == val_rows
    assert capsys.readouterr().out.splitlines()[0] == (
        "--batch-size auto: 8 x 32, the largest power of two that divides a step's 16 sequences and fits 14.00 GiB "
        "of the Tesla T4"
    )
    found["largest"], args.batch_size = 0, "auto"
    with pytest.raises(InputError, match=r"--batch-size auto: not even one sequence of --seq-len 32 fits 14.00 GiB"):
        planning.fit_micro_batch(run)

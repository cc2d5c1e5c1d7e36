"""The token-efficient recipe on GPT-2's own architecture: the warmup-stable-decay schedule, Muon for the blocks'
matrices beside AdamW for the rest, and --batch-size auto. The runs that resume, mix precisions, train under DDP and
plan with Muon are the same tests as AdamW's, parametrized (test_train.py, test_plan.py).

python -m pytest tests/test_recipe.py -q
"""

import contextlib
import copy
import math
from pathlib import Path

import pytest
import torch
from test_train import TINY_RUN, FixedBatches, logged_events, logged_losses, no_scaler, run_train, small_shards

import train_gpt2
from conftest import tiny_config
from gpt2lite.cli import InputError
from gpt2lite.optimizers import (
    JointOptimizer,
    momentum_warmup_steps,
    muon_momentum,
    set_muon_momentum,
    share_out,
    unallocated_state_bytes,
)
from gpt2lite.run import resolve_recipe
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


def test_a_short_decay_branched_from_a_copy_of_a_flat_checkpoint_leaves_the_run_alone(tmp_path, data):
    """The README's branch: a flat-phase checkpoint copied into a new run directory and resumed with a smaller
    --max-steps decays from there to --min-lr, while the run it came from goes on unchanged."""
    common = [*TINY_RUN, "--data-dir", str(data), "--schedule", "wsd", "--eval-interval", "4", "--ckpt-interval", "4",
              "--sample-interval", "0", "--keep-last", "5", "--max-steps", "24"]  # fmt: skip
    run, branch = tmp_path / "run", tmp_path / "branch"
    assert run_train(*common, "--run-dir", str(run)).returncode == 0
    branch.mkdir()
    (branch / "ckpt_000008.pt").write_bytes((run / "ckpt_000008.pt").read_bytes())
    result = run_train("--resume", "--run-dir", str(branch), "--max-steps", "10")  # decays over steps 8 and 9
    assert result.returncode == 0, result.stderr
    lrs = [e["lr"] for e in logged_events(branch) if e["split"] == "train"]
    assert lrs == [get_lr(step, 3, 10, 3e-3, 3e-4, "wsd", 0.2) for step in (8, 9)] == pytest.approx([3e-3, 1.65e-3])
    step_8 = [loss for loss in logged_losses(run) if loss[0] == 8]  # its evaluation and its step: the same state
    assert [loss for loss in logged_losses(branch) if loss[0] == 8] == step_8 and len(step_8) == 2
    assert (branch / "ckpt_000010.pt").exists() and (run / "ckpt_000024.pt").exists()


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
    assert group["weight_decay"] == 0.0, "Muon's own weight decay, 0 unless given: not AdamW's"
    assert model.configure_optimizers(0.1, 6e-4, 0.02, 0.05).optimizers[0].param_groups[0]["weight_decay"] == 0.05
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
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
    assert "Muon: the blocks' 8 matrices (98,304 parameters), peak lr 0.007, weight decay 0, momentum 0.95" in (
        first.stdout
    ), "no momentum warmup: a sixth of 4 steps is 0"
    assert "AdamW: the embedding (the head's too) and the vectors, peak lr 0.003, weight decay 0 on 2 tensors" in (
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


def recipe_defaults(*argv: str) -> dict:
    args, _ = train_gpt2.parse_args(list(argv))
    resolve_recipe(args)
    names = ["max_lr", "min_lr", "weight_decay", "muon_lr", "muon_weight_decay", "muon_momentum_warmup"]
    return {name: getattr(args, name) for name in names}


def test_adamw_keeps_the_seeds_recipe_and_muon_takes_the_records_scaled_to_our_step():
    assert recipe_defaults() == {"max_lr": 6e-4, "min_lr": 6e-5, "weight_decay": 0.1, "muon_lr": 0.007,
                                 "muon_weight_decay": 0.0, "muon_momentum_warmup": 4000}  # fmt: skip
    assert recipe_defaults("--schedule", "wsd")["min_lr"] == 0.0, "WSD decays to zero"
    muon = recipe_defaults("--optimizer", "muon")
    assert (muon["max_lr"], muon["weight_decay"], muon["min_lr"]) == (1.3e-3, 0.0, 1.3e-4)
    # the records' 0.02 and 3.6e-3 at 524,288 tokens a step, over the square root of 8 for our 65,536
    assert muon["muon_lr"] == pytest.approx(0.02 / 8**0.5, rel=0.02)
    assert muon["max_lr"] == pytest.approx(3.6e-3 / 8**0.5, rel=0.03)
    given = recipe_defaults("--optimizer", "muon", "--max-lr", "2e-3", "--weight-decay", "0.05", "--min-lr", "0")
    assert (given["max_lr"], given["weight_decay"], given["min_lr"]) == (2e-3, 0.05, 0.0)


def test_muons_momentum_warms_up_over_the_records_tokens_at_most_their_share_of_the_run():
    # 500 steps of 524,288 tokens: 4,000 of 65,536; at most 500 / 3,200 of the run
    assert momentum_warmup_steps(65536, 50000) == 4000 and momentum_warmup_steps(524288, 50000) == 500
    assert momentum_warmup_steps(65536, 3200) == 500 and momentum_warmup_steps(65536, 4) == 0
    assert [muon_momentum(step, 100) for step in (0, 50, 100, 500)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum(0, 0) == 0.95, "no warmup: 0.95 from the first step"
    model = GPT(tiny_config())
    optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
    set_muon_momentum(optimizer, 25, 100)
    muon, adamw = optimizer.optimizers
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.875)
    assert all(group["betas"] == (0.9, 0.95) and "momentum" not in group for group in adamw.param_groups)


def test_a_muon_run_warms_its_momentum_up_step_by_step(tmp_path, data):
    """The chapter's step sets the momentum: after steps 0 to 3 of an 8-step warmup, the checkpoint holds step 3's."""
    run = tmp_path / "run"
    result = run_train(*TINY_RUN, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", "4",
                       "--optimizer", "muon", "--muon-momentum-warmup", "8", "--sample-interval", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    muon_state = torch.load(run / "ckpt_000004.pt", weights_only=True)["optimizer"]["optimizers"][0]
    assert muon_state["param_groups"][0]["momentum"] == pytest.approx(muon_momentum(3, 8)) == pytest.approx(0.8875)


def test_a_muon_checkpoint_from_before_these_flags_resumes_with_the_decay_it_had(tmp_path, data):
    """Before --muon-weight-decay, Muon decayed by AdamW's lr x weight decay a step, and its momentum did not warm
    up: a checkpoint without the new settings keeps that."""
    run = tmp_path / "run"
    args = [*TINY_RUN, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", "4", "--sample-interval", "0",
            "--optimizer", "muon", "--weight-decay", "0.1", "--muon-lr", "0.01"]  # fmt: skip
    assert run_train(*args).returncode == 0
    checkpoint = torch.load(run / "ckpt_000004.pt", weights_only=False)
    for name in ("muon_weight_decay", "muon_momentum_warmup"):
        del checkpoint["args"][name]
    torch.save(checkpoint, run / "ckpt_000004.pt")
    resumed = run_train("--resume", "--run-dir", str(run), "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    group = torch.load(run / "ckpt_000006.pt", weights_only=True)["optimizer"]["optimizers"][0]["param_groups"][0]
    assert group["weight_decay"] == pytest.approx(0.1 * 3e-3 / 0.01) and group["momentum"] == 0.95


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
        (["--max-lr", "0"], "--max-lr must be positive, got 0.0"),
        (["--muon-weight-decay", "-0.1"], "--muon-weight-decay must not be negative, got -0.1"),
        (["--muon-momentum-warmup", "-1"], "--muon-momentum-warmup must not be negative, got -1"),
        (["--min-lr=-1e-4"], "--min-lr must not be negative, got -0.0001"),
        (["--min-lr", "4e-3"], "--min-lr 0.004 must be at most --max-lr 0.003"),
        (["--total-batch-size", "0", "--optimizer", "muon"], "--total-batch-size must be at least 1, got 0"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["--batch-size", "many"], "invalid micro_batch value: 'many'"),
    ],
)  # fmt: skip
def test_bad_recipe_settings_get_one_line(tmp_path, data, extra, message):
    result = run_train(*TINY_RUN, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--max-steps", "10",
                       *extra)  # fmt: skip
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode != 0 and line.startswith("train_gpt2.py: error: ") and message in line, result.stderr


# --- Muon under DDP: each process orthogonalises its share ----------------------------------------------------


def gradients(model: GPT, step: int):
    """The same gradients on every process, as DDP's all-reduce leaves them, and different at each step."""
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def sharded_muon_worker(rank: int, folder: str):
    """One of two gloo processes: three steps of the joint optimizer, its state gathered after two and loaded into
    a fresh optimizer that takes the third; what each process holds is saved for the test to compare."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # the same kernels as the single process of the test, so the same bits
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(n_layer=2, n_embd=32, vocab_size=64))
        optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
        muon = optimizer.optimizers[0]
        for step in range(2):
            gradients(model, step)
            optimizer.step()
        state = optimizer.state_dict()  # a collective: every process calls it
        held = len(muon.state)
        optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
        optimizer.load_state_dict(copy.deepcopy(state))  # a copy: loading keeps the tensors it is given
        held_after_load = len(optimizer.optimizers[0].state)
        gradients(model, 2)
        optimizer.step()
        torch.save({"weights": model.state_dict(), "state": state, "held": held, "held_after_load": held_after_load,
                    "type": type(muon).__name__}, f"{folder}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_process_orthogonalises_its_share_and_the_step_is_one_processs_bit_for_bit(tmp_path):
    """Two gloo processes against one: the same weights bit for bit after three steps (the owner of a matrix runs
    the same operations on the same numbers as the one process, and sends the result), each process holding the
    momentum of about half the matrices, and a state dict that is the one process's, gathered, and that resumes."""
    import torch.multiprocessing as mp

    mp.spawn(sharded_muon_worker, args=(str(tmp_path),), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(n_layer=2, n_embd=32, vocab_size=64))
        optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
        for step in range(3):
            gradients(model, step)
            optimizer.step()
            if step == 1:
                state = copy.deepcopy(optimizer.state_dict())
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert {r["type"] for r in ranks} == {"ShardedMuon"}
    assert sorted(r["held"] for r in ranks) == [4, 4] and [r["held_after_load"] for r in ranks] == [4, 4], (
        "8 matrices, 4 each: c_attn and the MLP's two are costlier than attn.c_proj, and balance out"
    )
    for r in ranks:
        for name, weight in model.state_dict().items():
            assert torch.equal(r["weights"][name], weight), name
    gathered, alone = ranks[0]["state"]["optimizers"][0], state["optimizers"][0]
    assert gathered["param_groups"] == alone["param_groups"] and gathered["state"].keys() == alone["state"].keys()
    for index, own in alone["state"].items():
        assert torch.equal(gathered["state"][index]["momentum_buffer"], own["momentum_buffer"])


def test_muons_matrices_are_shared_out_by_their_newton_schulz_work():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    matrices = [p for group in model.configure_optimizers(0.1, 6e-4, 0.01).optimizers[0].param_groups
                for p in group["params"]]  # fmt: skip
    for world_size in (1, 2, 3, 8):
        owners = share_out(matrices, world_size)
        cost = [2 * min(p.shape) ** 2 * max(p.shape) + min(p.shape) ** 3 for p in matrices]
        work = [sum(c for c, owner in zip(cost, owners) if owner == r) for r in range(world_size)]
        assert max(work) <= 1.1 * sum(work) / world_size, (world_size, work)  # within 10% of an even share
    assert sorted(share_out(matrices, 64)) == list(range(48)), "more processes than matrices: one each, some none"

"""
A training run's machinery around the chapter's loop: every input checked before anything is written, the `Run`
the loop works with, resuming it, and the lines that say what it chose.

train_gpt2.py hands in what only it defines: its choose_precision, its DataLoader class and its build_model (this
package never imports the chapter, which runs as __main__: importing it back would make a second GPT class).
"""

import argparse
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2lite.checkpoints import (
    checkpoint_path,
    log_event,
    open_run,
    rng_states,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_states,
    truncate_log,
)
from gpt2lite.cli import InputError, Problems
from gpt2lite.devices import training_device
from gpt2lite.evaluation import HELLASWAG_CACHE, HELLASWAG_URL, data_file, hellaswag_examples, hellaswag_scores
from gpt2lite.gpt2_files import from_the_hub
from gpt2lite.lock import RunLock, lock_problem, remove_leftovers
from gpt2lite.optimizers import (
    MUON_EMBED_LR,
    MUON_EMBED_WEIGHT_DECAY,
    MUON_TORCH,
    load_keeping_settings,
    members,
    momentum_warmup_steps,
    muon_available,
)

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")
SEED_MICRO_BATCH = 4  # the seed's 4 x 1,024, and what --batch-size auto means off CUDA, where nothing is measured
# validation windows per --eval-steps, whatever the micro batch: the seed's 4, so that the windows validation reads
# depend on --eval-steps and the data alone, not on the card, the micro batch, or how often a run was resumed
EVAL_ROWS = SEED_MICRO_BATCH


def micro_batch(text: str) -> int | str:
    """--batch-size: a number of sequences, or auto (resolved by check_inputs, or on CUDA by fit_micro_batch)."""
    return text if text == "auto" else int(text)


class Processes(NamedTuple):
    """Where this process stands among the training processes: a plain `python train_gpt2.py` is rank 0 of 1."""

    rank: int
    local_rank: int  # its GPU on this machine
    world_size: int


@dataclass
class Run:
    """What the training loop works with. check_inputs fills in what the inputs give; the chapter adds the model as
    trained (`model`: wrapped in DDP and torch.compile where they apply), its optimizer and precision tools."""

    args: argparse.Namespace
    procs: Processes
    device: str
    precision: str  # what choose_precision picked, and why
    why: str
    train_loader: object
    val_loader: object
    grad_accum_steps: int
    raw_model: nn.Module  # the bare model: what checkpoints hold
    hellaswag: list[dict] | None
    checkpoint: dict | None  # the one being resumed, until `resume` has put it back
    last_checkpoint: str | None  # the newest checkpoint of this run: at first, the one being resumed
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    autocast: Callable | None = None
    compiled: bool = False  # whether torch.compile works here (wrap_model tried)
    flops_per_token: int = 0  # the model's training FLOPs per token, at this sequence length
    peak: float = 0.0  # FLOP/s of one device at 100% MFU
    peak_source: str = ""
    step: int = 0  # the step this run (re)starts at
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    lock: RunLock | None = None  # rank 0's lock on --run-dir, from make_run_dir to the run's end
    in_use: str | None = None  # --plan: the line saying which process holds --run-dir, if one does

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exception):  # however the run ends: the run directory is free again
        if self.lock is not None:
            self.lock.release()

    @property
    def rank(self) -> int:
        return self.procs.rank

    @property
    def world_size(self) -> int:
        return self.procs.world_size

    @property
    def master(self) -> bool:  # only rank 0 prints, logs, samples and writes checkpoints
        return self.rank == 0

    @property
    def micro_batch(self) -> int:  # sequences per forward and backward: --batch-size, or what auto found
        return self.train_loader.B

    @property
    def wants_compile(self) -> bool:  # --compile, or by default on CUDA
        return torch.device(self.device).type == "cuda" if self.args.compile is None else self.args.compile

    @property
    def val_windows(self) -> int:  # what estimate_loss reads, spread over the validation split
        return self.args.eval_steps * EVAL_ROWS

    def say(self, *parts):
        if self.master:
            print(*parts, flush=True)

    def mfu(self, tokens_per_s: float) -> float:  # model FLOPs done per second, against what the devices could do
        return self.flops_per_token * tokens_per_s / (self.peak * self.world_size)

    def state(self, step: int) -> dict:
        """All the state a run needs to continue exactly, beside the model's; every process must call it (RNG
        states are gathered)."""
        rng = [rng_states(self.device)]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_states(self.device))
        return dict(
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            step=step,
            args=vars(self.args),
            train_loader=self.train_loader.state_dict(),
            best_val_loss=self.best_val_loss,
            evals_without_improvement=self.evals_without_improvement,
            rng=rng,
        )

    def save(self, path: str, step: int):
        t0 = time.perf_counter()
        state = self.state(step)
        if self.master:
            save_checkpoint(path, self.raw_model, **state)
            self.say(f"checkpoint {path}: {os.path.getsize(path) / 1e6:,.1f} MB in {time.perf_counter() - t0:.1f} s")
        if os.path.basename(path) != "best.pt":
            self.last_checkpoint = path

    def log_hellaswag(self, step: int):
        """HellaSwag's accuracies, printed and logged."""
        # the uncompiled model: every batch has its own length, which would make torch.compile recompile
        scores = hellaswag_scores(self.raw_model, self.hellaswag, self.device, self.autocast)
        self.say(
            f"step {step}/{self.args.max_steps} | hellaswag acc_norm {scores['acc_norm']:.4f} | "
            f"acc {scores['acc']:.4f} | {scores['examples']:,} examples"
        )
        if self.master:
            log_event(self.args.run_dir, step=step, split="hellaswag", **scores)

    def keep_checkpoint(self, step: int):
        """The step's checkpoint; of the periodic ones, only the newest --keep-last stay."""
        self.save(checkpoint_path(self.args.run_dir, step), step)
        if self.master:
            rotate_checkpoints(self.args.run_dir, self.args.keep_last)


# --- the inputs, all checked before any problem is reported -----------------------------------------------------


def out_of_range(args: argparse.Namespace) -> dict[str, str]:
    """Each flag whose value is out of its range, with the line that says so."""
    at_least_one = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "seq_len"]
    at_least_one += ["total_batch_size", "max_steps", "eval_interval", "eval_steps", "keep_last"]
    not_negative = ["warmup_steps", "sample_interval", "ckpt_interval", "patience", "grad_clip", "weight_decay"]
    not_negative += ["muon_weight_decay", "muon_momentum_warmup", "min_lr", "hellaswag_interval", "hellaswag_limit"]
    not_negative += ["seed"]
    found = {}
    for name in at_least_one + not_negative:
        value, least = getattr(args, name), 1 if name in at_least_one else 0
        if isinstance(value, (int, float)) and value < least:  # None: a default still to work out; or auto
            rule = "be at least 1" if least else "not be negative"
            found[name] = f"--{name.replace('_', '-')} must {rule}, got {value}"
    if not 0 <= args.dropout < 1:
        found["dropout"] = f"--dropout must be in [0, 1), got {args.dropout}"
    for name in ("max_lr", "muon_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            found[name] = f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if not 0 < args.decay_fraction <= 1:
        found["decay_fraction"] = f"--decay-fraction must be in (0, 1], got {args.decay_fraction}"
    return found


def check_schedule(args: argparse.Namespace):
    """Settings that must agree with each other and with this torch; checked once a resumed run's own settings are
    back in place."""
    problems = Problems()
    resolve_recipe(args)
    if args.warmup_steps >= args.max_steps:
        problems.add(f"--warmup-steps {args.warmup_steps} must be below --max-steps {args.max_steps}")
    if 0 < args.max_lr < args.min_lr:  # a --max-lr out of range has its own line
        problems.add(f"--min-lr {args.min_lr} must be at most --max-lr {args.max_lr}")
    decay_steps = max(1, round(args.decay_fraction * args.max_steps))  # as get_lr counts them
    if args.schedule == "wsd" and args.warmup_steps + decay_steps > args.max_steps:
        problems.add(f"--schedule wsd: --warmup-steps {args.warmup_steps} and the decay's {decay_steps} steps "
                     f"(--decay-fraction {args.decay_fraction}) add up to more than --max-steps {args.max_steps}")
    if args.optimizer == "muon" and not muon_available():
        problems.add(f"--optimizer muon needs torch {MUON_TORCH} or newer (torch.optim.Muon), and this is torch "
                     f"{torch.__version__}: pip install 'torch>={MUON_TORCH}', or use --optimizer adamw")  # fmt: skip
    problems.raise_any()


def resolve_recipe(args: argparse.Namespace):
    """The defaults that depend on other flags, worked out once: a resumed run keeps what it started with.

    AdamW alone keeps the seed's recipe (GPT-3's: 6e-4, decay 0.1). Beside Muon, AdamW trains the embedding, head
    and vectors at the speedrun's rate, without decay (optimizers.py, MUON_EMBED_LR). The cosine ends at a tenth of
    the peak, as the seed's 6e-5 of 6e-4; WSD decays to zero, as the speedrun's records do (README, Recipe: what
    bench.py recipe measured of it)."""
    muon = args.optimizer == "muon"
    if args.max_lr is None:
        args.max_lr = MUON_EMBED_LR if muon else 6e-4
    if args.weight_decay is None:
        args.weight_decay = MUON_EMBED_WEIGHT_DECAY if muon else 0.1
    if args.min_lr is None:  # 6e-4 / 10 is 5.9999999999999995e-05: six digits keep the seed's 6e-5 exactly
        args.min_lr = float(f"{args.max_lr / 10:.6g}") if args.schedule == "cosine" else 0.0
    if args.warmup_steps is None:
        args.warmup_steps = min(2000, args.max_steps // 20)
    if args.muon_momentum_warmup is None:
        # a --total-batch-size below 1 has its own line, and must not divide by zero first
        args.muon_momentum_warmup = momentum_warmup_steps(max(1, args.total_batch_size), args.max_steps)


def accumulation_steps(args: argparse.Namespace, batch_size: int, world_size: int) -> int:
    tokens_per_micro_step = batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise InputError(
            f"--total-batch-size {args.total_batch_size:,} is not a multiple of batch-size x seq-len x processes "
            f"= {batch_size} x {args.seq_len} x {world_size} = {tokens_per_micro_step:,}"
        )
    return args.total_batch_size // tokens_per_micro_step


def eval_batch(micro_batch: int) -> int:
    """Validation's batch: its windows EVAL_ROWS at a time, or as many as training's micro batch where that is
    smaller (the batches group the windows, and do not choose them)."""
    return min(EVAL_ROWS, micro_batch)


def make_loader(loader: type, args: argparse.Namespace, procs: Processes, split: str, batch_size: int):
    """The split's DataLoader, of the chapter's class: the train split's shuffled by --seed, the val split's read in
    order (validation spreads its windows, and needs no seed)."""
    seed = [args.seed] if split == "train" else []
    return loader(args.data_dir, split, batch_size, args.seq_len, procs.rank, procs.world_size, *seed)


def open_run_dir(
    args: argparse.Namespace, given: set[str], problems: Problems, say: Callable
) -> tuple[dict | None, str | None]:
    """The checkpoint a resumed run continues from and its path, its settings put back into args (except those
    given on the command line), or (None, None) for a run that starts at step 0."""
    first_checkpoint_step = args.ckpt_interval or args.max_steps  # a log that got this far is a record, kept
    try:
        checkpoint, path = (None, None)
        if args.resume or not args.plan:
            checkpoint, path = open_run(args.run_dir, args.resume, first_checkpoint_step, say)
    except InputError as e:
        problems.add(str(e))
        if args.resume:  # without the run's own settings, the other checks would check the wrong ones
            problems.raise_any()
        return None, None
    saved = (checkpoint or {}).get("args", {})
    for name, value in saved.items():
        if name not in given and name not in ("resume", "device"):  # the run's own settings, unless changed
            setattr(args, name, value)
    if saved.get("optimizer") == "muon" and "muon_weight_decay" not in saved:  # saved before these were flags
        for name, value in [("muon_weight_decay", saved["weight_decay"] * saved["max_lr"] / saved["muon_lr"]),
                            ("muon_momentum_warmup", 0)]:  # fmt: skip
            if name not in given:
                setattr(args, name, value)
    if checkpoint is not None and args.optimizer != saved.get("optimizer", "adamw"):  # AdamW before Muon came
        problems.add(f"--optimizer {args.optimizer} differs from {path}'s {saved.get('optimizer', 'adamw')}, whose "
                     "state the checkpoint holds: drop the flag, or start a new --run-dir")  # fmt: skip
    if checkpoint is not None and checkpoint["step"] > args.max_steps:
        problems.add(f"{path} is at step {checkpoint['step']}, past --max-steps {args.max_steps}: "
                     "give a larger --max-steps to continue the run")  # fmt: skip
    return checkpoint, path


def check_model(model: nn.Module, source: str | None, args: argparse.Namespace, given: set[str]):
    """A model flag given beside weights that fix it must agree with them; the sequence must fit the context."""
    problems = Problems()
    if source is not None:
        # a fine-tuned model takes this run's dropout: it may add some to a model trained without
        fine_tuning = source == args.init_from
        fix = "drop the flag" if fine_tuning else "drop the flag, or start a new --run-dir"
        for name in sorted(given & set(MODEL_FLAGS) - ({"dropout"} if fine_tuning else set())):
            if getattr(model.config, name) != getattr(args, name):
                problems.add(f"--{name.replace('_', '-')} {getattr(args, name)} differs from {source}'s "
                             f"{getattr(model.config, name)}: {fix}")  # fmt: skip
    if args.seq_len > model.config.block_size:
        problems.add(f"--seq-len {args.seq_len} is above the model's block size {model.config.block_size}")
    problems.raise_any()


def load_hellaswag(args: argparse.Namespace) -> list[dict]:
    path = data_file(args.hellaswag_data, HELLASWAG_URL, "HellaSwag", HELLASWAG_CACHE, "--hellaswag-data")
    return hellaswag_examples(path)[: args.hellaswag_limit or None]


def check_inputs(
    args: argparse.Namespace, given: set[str], procs: Processes, choose_precision: Callable, loader: type,
    build_model: Callable,
) -> Run:  # fmt: skip
    """Everything the run is built from, loaded and checked before anything is written: the flags, the device, the
    run directory (resumed or new), the precision, the data, the model and HellaSwag's file. A user with three
    mistakes hears of all three at once, a line each, instead of one per attempt. Downloads (OpenAI's weights,
    HellaSwag) come last, and only when nothing else is wrong: a typo should not cost gigabytes first.

    The chapter passes its choose_precision, its DataLoader class, and build_model(args, checkpoint) -> (model,
    where its weights come from)."""
    problems, bad_flags = Problems(), out_of_range(args)
    problems.add(*bad_flags.values())
    device = precision = why = grad_accum_steps = model = None
    with problems:
        device = training_device(args.device, procs.local_rank, procs.world_size)
    say = functools.partial(print, flush=True) if procs.rank == 0 else (lambda *parts: None)
    in_use = [lock_problem(args.run_dir) if procs.rank == 0 else None]  # one writer: see make_run_dir
    if procs.world_size > 1:  # rank 0 holds the lock, and every process must stop if it cannot
        dist.broadcast_object_list(in_use, src=0)
    in_use = in_use[0]
    checkpoint = resumed_from = None
    if in_use and not args.plan:
        problems.add(in_use)  # and nothing of it is read: a live run may be rewriting it
    else:
        checkpoint, resumed_from = open_run_dir(args, given, problems, say)
    with problems:
        check_schedule(args)
    if device:
        with problems:
            precision, why = choose_precision(device, args.dtype)
    # --batch-size auto stays "auto" in args, and so in the checkpoint: a resume measures again, since the card or the
    # number of processes may have changed. On CUDA training's micro batch is checked at one sequence here and
    # measured once the model is on the GPU (fit_micro_batch); elsewhere it is the seed's 4.
    measured = args.batch_size == "auto" and bool(device) and torch.device(device).type == "cuda"
    batch_size = 1 if measured else SEED_MICRO_BATCH if args.batch_size == "auto" else args.batch_size
    val_batch_size = EVAL_ROWS if measured else eval_batch(batch_size)
    train_loader = val_loader = None
    if "seed" not in bad_flags:  # it orders the windows
        with problems:
            train_loader = make_loader(loader, args, procs, "train", batch_size)
    with problems:
        val_loader = make_loader(loader, args, procs, "val", val_batch_size)
    if not bad_flags.keys() & {"batch_size", "seq_len", "total_batch_size"}:  # it divides by them
        with problems:
            grad_accum_steps = accumulation_steps(args, batch_size, procs.world_size)
    model_from_hub = checkpoint is None and from_the_hub(args.init_from)
    if not bad_flags.keys() & {*MODEL_FLAGS, "seq_len"} and (not model_from_hub or not problems):
        with problems:
            model, source = build_model(args, checkpoint)
            check_model(model, source, args, given)
    hellaswag = None
    # a plan downloads nothing, and checks a file it is given as the run does
    if args.hellaswag_interval > 0 and (args.hellaswag_data or not args.plan) and (args.hellaswag_data or not problems):
        with problems:
            hellaswag = load_hellaswag(args)
    problems.raise_any()
    return Run(
        args, procs, device, precision, why, train_loader, val_loader, grad_accum_steps, model, hellaswag,
        checkpoint=checkpoint, last_checkpoint=resumed_from, in_use=in_use,
    )  # fmt: skip


def make_run_dir(run: Run):
    """The run directory, made once every process has looked at it, and locked by rank 0 for the whole run; what a
    killed write left behind is removed under the lock. A plan writes nothing and locks nothing."""
    if run.world_size > 1:  # every process has looked at the run directory before rank 0 writes into it
        dist.barrier(device_ids=[run.procs.local_rank] if dist.get_backend() == "nccl" else None)
    if run.args.plan:
        return
    refused = None
    if run.master:
        os.makedirs(run.args.run_dir, exist_ok=True)  # only now: a refused run leaves nothing behind
        try:
            run.lock = RunLock(run.args.run_dir, run.say)
            remove_leftovers(run.args.run_dir, run.say)
        except InputError as e:  # another process took it since check_inputs looked
            refused = e
    if run.world_size > 1:  # every process stops, or none
        failed = torch.tensor(float(refused is not None), device=run.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        refused = refused or (InputError(f"{run.args.run_dir} is in use") if failed.item() else None)
    if refused:
        raise refused


# --- resuming, and what the run says before its first step ------------------------------------------------------


def resume(run: Run):
    """Put the optimizer, GradScaler, data position, progress and random states back where the checkpoint left
    them (the weights are in already: build_model took them); the log loses the events past that step."""
    checkpoint = run.checkpoint
    if checkpoint is not None:
        load_keeping_settings(run.optimizer, checkpoint["optimizer"])  # onto the parameters' device
        if checkpoint["scaler"]:  # empty when it was saved disabled: a run moved from bf16 or fp32 to fp16
            run.scaler.load_state_dict(checkpoint["scaler"])
        run.train_loader.load_state_dict(checkpoint["train_loader"])
        run.step = checkpoint["step"]
        run.best_val_loss = checkpoint["best_val_loss"]
        run.evals_without_improvement = checkpoint["evals_without_improvement"]
        if len(checkpoint["rng"]) == run.world_size:
            set_rng_states(checkpoint["rng"][run.rank], run.device)
        run.checkpoint = None  # its memory back: the optimizer state has been copied out
    if run.master and not run.args.plan:
        truncate_log(run.args.run_dir, run.step)


def count(params: list[torch.Tensor]) -> str:
    return f"{sum(p.numel() for p in params):,}"


def describe_run(run: Run):
    """What the run chose, printed before its first step."""
    args, model, *muon, adamw = run.args, run.raw_model, *members(run.optimizer)
    decayed, not_decayed = (group["params"] for group in adamw.param_groups)
    run.say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {model.config}")
    final = f"{args.min_lr / args.max_lr:.0%} of the peak" if args.min_lr else "zero"
    run.say(f"lr: warmup {args.warmup_steps} steps, then {args.schedule} down to {final} at step {args.max_steps}")
    if muon:
        warmup = args.muon_momentum_warmup
        momentum = f"0.85 -> 0.95 over {warmup} steps" if warmup else "0.95"
        matrices = [p for group in muon[0].param_groups for p in group["params"]]
        shared = f", shared out among {run.world_size} processes" if run.world_size > 1 else ""  # ShardedMuon
        run.say(f"Muon: the blocks' {len(matrices)} matrices ({count(matrices)} parameters{shared}), peak lr "
                f"{args.muon_lr:g}, weight decay {args.muon_weight_decay:g}, momentum {momentum}")  # fmt: skip
    takes = "the embedding (the head's too) and the vectors" if muon else "every parameter"
    run.say(f"AdamW: {takes}, peak lr {args.max_lr:g}, weight decay {args.weight_decay:g} on {len(decayed)} tensors "
            f"({count(decayed)} parameters), none on {len(not_decayed)} ({count(not_decayed)})")  # fmt: skip
    run.say(
        f"device {run.device} x {run.world_size} process(es) | precision {run.precision} ({run.why}) | "
        f"compile {run.compiled} | "
        f"fused AdamW {bool(adamw.defaults.get('fused'))}"
    )
    run.say(
        f"batch {args.total_batch_size:,} tokens = {run.micro_batch} x {args.seq_len} x {run.world_size} process(es) "
        f"x {run.grad_accum_steps} accumulation steps | mfu against the {run.peak_source}, "
        f"{run.peak / 1e12:.3g} TFLOP/s"
    )
    windows = sum(run.val_loader.windows_per_shard)
    every = math.ceil(windows / EVAL_ROWS)  # the --eval-steps that reads all of them
    coverage = "all of them" if args.eval_steps >= every else f"--eval-steps {every} reads all of them"
    run.say(
        f"validation: {min(windows, run.val_windows):,} of the split's {windows:,} windows of "
        f"{args.seq_len} tokens, evenly spread ({coverage})"
    )
    resumed_from = run.last_checkpoint
    where = f"from {resumed_from}" if resumed_from else f"in {args.run_dir}"
    doing = "planning a run" if args.plan else "resuming" if resumed_from else "starting"
    run.say(f"{doing} at step {run.step} of {args.max_steps} {where}" + (" (nothing is written)" if args.plan else ""))

"""
What `python train_gpt2.py --plan` works out: from what the run is (its model, data, batch and schedule) and what a
few of its real steps measured (the chapter builds the run as training does and hands `plan_run` its step), how
many tokens it reads, how often it passes over its data, how long it takes, what disk its checkpoints need, and
what to change before starting it; and two questions for the device: which attention kernel PyTorch will run, and
the largest micro batch that fits. Nothing here writes a file.
"""

import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2lite.checkpoints import checkpoint_size, step_checkpoints
from gpt2lite.cli import InputError, duration
from gpt2lite.devices import PRECISIONS, is_out_of_memory
from gpt2lite.optimizers import unallocated_state_bytes
from gpt2lite.run import EVAL_ROWS, accumulation_steps, eval_batch, make_loader

# Hoffmann et al. 2022 ("Chinchilla"): about 20 training tokens per parameter is compute-optimal
COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER = 20
# the original reproduction's 124M run (docs/ladder.md) overfit WikiText-103 after about 9,000 steps of 65,536
# tokens: some five passes
MAX_PASSES = 4
MEMORY_WARNING_SHARE = 0.9
LONG_STEP_SECONDS = 10  # a step or a validation longer than this is timed in parts and multiplied
COLAB_SESSION_HOURS = 12  # a free Colab session's limit at most; most end sooner, when idle or busy


# the run's own flags among the facts
RUN_SETTINGS = ("seq_len", "max_steps", "eval_interval", "ckpt_interval", "keep_last", "patience", "run_dir", "resume")


@dataclass
class Facts:
    """What the run is, and what measuring it found: everything the plan is computed from."""

    parameters: int
    model: str  # layers, width, context, in words
    train_tokens: int
    val_tokens: int
    batch_size: int
    seq_len: int
    world_size: int
    grad_accum_steps: int
    start_step: int
    max_steps: int
    eval_interval: int
    ckpt_interval: int
    keep_last: int
    patience: int
    device: str
    precision: str
    why: str
    compiled: bool
    attention: str
    seconds_per_step: float
    eval_seconds: float
    mfu: float
    peak_memory_bytes: int
    device_memory_bytes: int | None  # None where it cannot be read
    checkpoint_bytes_each: int
    largest_micro_batch: int | None  # CUDA only: the largest power of two that fits at these shapes
    run_dir: str
    run_dir_holds_a_run: bool
    run_dir_in_use: str | None  # which process holds --run-dir now, if one does
    resume: bool
    in_colab: bool
    checkpoints_kept: int = 0  # step checkpoints a resume finds in --run-dir: rotation keeps them beside the new

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.world_size * self.grad_accum_steps


def evaluations(start_step: int, max_steps: int, interval: int) -> int:
    """How many validation losses the loop computes from start_step on: every interval steps, and at the end."""
    due = max_steps // interval - (start_step - 1) // interval  # the multiples of interval in [start_step, max_steps]
    return due + (max_steps % interval != 0)


def checkpoints_written(f: Facts) -> int:
    """The checkpoints the loop writes after start_step: every ckpt_interval steps, and at the end."""
    if f.start_step >= f.max_steps:
        return 0
    if not f.ckpt_interval:
        return 1
    return f.max_steps // f.ckpt_interval - f.start_step // f.ckpt_interval + (f.max_steps % f.ckpt_interval != 0)


def writes_past_keep_last(f: Facts) -> bool:
    """Whether a checkpoint is written while --keep-last others are on disk: the oldest goes only after it."""
    written = checkpoints_written(f)
    return written > 0 and f.checkpoints_kept + written > f.keep_last


def checkpoint_files(f: Facts) -> int:
    """The most checkpoint files on disk at once: the step checkpoints rotation keeps (a resumed run's old ones
    among them), the next one written before the oldest goes, and best.pt."""
    kept = min(f.checkpoints_kept + checkpoints_written(f), f.keep_last)
    return max(f.checkpoints_kept, kept + writes_past_keep_last(f)) + 1


def make_plan(f: Facts) -> dict:
    """The plan as numbers: the JSON object that --plan prints last."""
    steps = f.max_steps - f.start_step
    total_tokens = f.tokens_per_step * f.max_steps
    seconds = steps * f.seconds_per_step + evaluations(f.start_step, f.max_steps, f.eval_interval) * f.eval_seconds
    return {
        "tokens_per_step": f.tokens_per_step,
        "grad_accum_steps": f.grad_accum_steps,
        "steps": steps,
        "total_tokens": total_tokens,
        "epochs": total_tokens / f.train_tokens,
        "tokens_per_parameter": total_tokens / f.parameters,
        "ms_per_step": f.seconds_per_step * 1000,
        "tokens_per_second": f.tokens_per_step / f.seconds_per_step,
        "mfu": f.mfu,
        "peak_memory_bytes": f.peak_memory_bytes,
        "estimated_seconds": seconds,
        "seconds_between_checkpoints": checkpoint_seconds(f),
        "checkpoint_bytes": checkpoint_files(f) * f.checkpoint_bytes_each,  # at the peak
        "largest_micro_batch": f.largest_micro_batch,
        "warnings": warnings(f, total_tokens / f.train_tokens, seconds),
    }


def checkpoint_seconds(f: Facts) -> float | None:
    """Time between two checkpoints, evaluations included; None when the run writes one only at its end."""
    if not f.ckpt_interval or checkpoints_written(f) <= 1:
        return None
    return f.ckpt_interval * f.seconds_per_step + f.ckpt_interval / f.eval_interval * f.eval_seconds


def warnings(f: Facts, epochs: float, seconds: float) -> list[str]:
    """What to change before starting, each with its reason and the flag that changes it."""
    found = []
    if epochs > MAX_PASSES:
        found.append(
            f"the run reads its training split {epochs:.1f} times; the original reproduction's 124M run overfit "
            "WikiText-103 after about five passes: prepare more data (prepare_data.py --dataset fineweb-edu), lower "
            "--max-steps, or "
            f"let --patience stop the run when validation stops improving (now {f.patience or 'off'})"
        )
    if f.device_memory_bytes and f.peak_memory_bytes > MEMORY_WARNING_SHARE * f.device_memory_bytes:
        found.append(
            f"peak memory {gib(f.peak_memory_bytes)} is above {MEMORY_WARNING_SHARE:.0%} of the device's "
            f"{gib(f.device_memory_bytes)}: lower --batch-size and keep --total-batch-size (more accumulation steps, "
            "the same training)"
        )
    on_drive = os.path.realpath(f.run_dir).startswith("/content/drive")
    if f.in_colab and seconds > COLAB_SESSION_HOURS * 3600 and not on_drive:
        found.append(
            f"the run takes {duration(seconds)}, longer than a free Colab session, and --run-dir {f.run_dir} is not "
            "on Drive: put it under /content/drive so checkpoints outlive the session, and rerun with --resume"
        )
    if f.run_dir_in_use:
        found.append(f"{f.run_dir_in_use} (a run started now would be refused)")
    if f.run_dir_holds_a_run and not f.resume:
        found.append(f"{f.run_dir} already holds a run, and the run would refuse it: pass --resume to continue it")
    return found


def plan_lines(f: Facts, plan: dict) -> list[str]:
    """The plan in words, a line per question."""
    lines = [
        f"model: {f.parameters:,} parameters ({f.model})",
        f"data: {f.train_tokens:,} training tokens, {f.val_tokens:,} validation tokens",
        f"batch: {f.batch_size} x {f.seq_len} tokens x {f.world_size} process(es) x {f.grad_accum_steps} "
        f"accumulation steps = {f.tokens_per_step:,} tokens a step",
        f"run: {plan['steps']:,} steps" + (f" (from step {f.start_step:,} of {f.max_steps:,})" if f.start_step else "")
        + f", {plan['total_tokens']:,} tokens in all: {plan['epochs']:.2f} passes over the training split, "
        f"{plan['tokens_per_parameter']:.1f} tokens per parameter (~{COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER} is "
        "compute-optimal)",
        f"device: {f.device} | precision {f.precision} ({f.why}) | compile {f.compiled} | attention {f.attention}",
        f"measured: {plan['ms_per_step']:,.0f} ms a step, {plan['tokens_per_second']:,.0f} tokens/s, MFU "
        f"{f.mfu:.0%}, peak memory {gib(f.peak_memory_bytes)}"
        + (f" of {gib(f.device_memory_bytes)}" if f.device_memory_bytes else ""),
        f"time: about {duration(plan['estimated_seconds'])} (steps and validation; samples, HellaSwag and writing "
        "checkpoints not counted)"
        + (f", {duration(plan['seconds_between_checkpoints'])} between checkpoints"
           if plan["seconds_between_checkpoints"] else ", one checkpoint at the end"),
        f"disk: {gib(plan['checkpoint_bytes'])} of checkpoints at the peak ({checkpoint_files(f)} files of "
        f"{gib(f.checkpoint_bytes_each)}: "
        + (f"{f.keep_last} kept, the next being written, best.pt)" if writes_past_keep_last(f)
           else f"{checkpoint_files(f) - 1} checkpoint(s) and best.pt)"),
    ]  # fmt: skip
    if f.largest_micro_batch:
        accumulation = f.tokens_per_step // (f.largest_micro_batch * f.seq_len * f.world_size)
        lines.append(
            f"memory: a micro batch of up to {f.largest_micro_batch} x {f.seq_len} fits this device: --batch-size "
            f"{f.largest_micro_batch} keeps {f.tokens_per_step:,} tokens a step with {accumulation} accumulation steps"
        )
    lines += [f"warning: {warning}" for warning in plan["warnings"]] or ["warnings: none"]
    return lines


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def physical_memory_bytes() -> int | None:
    """The machine's RAM, where the OS says (None on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def resident_peak_bytes() -> int:
    """The most resident memory this process has held so far (0 where the OS does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux kilobytes


def attention_kernel(config, batch_size: int, seq_len: int, dtype: torch.dtype, device: str) -> str:
    """The kernel scaled_dot_product_attention dispatches to at the run's shapes, precision and dropout, asked of
    PyTorch's own dispatcher (a private function: "unknown" where a version lacks it)."""
    from torch.nn.attention import SDPBackend

    # requires_grad, as in training: some kernels are ruled out for the backward pass alone
    q = torch.zeros(batch_size, config.n_head, seq_len, config.n_embd // config.n_head, dtype=dtype, device=device,
                    requires_grad=True)  # fmt: skip
    try:
        backend = SDPBackend(torch._fused_sdp_choice(q, q, q, None, config.dropout, True))
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"
    names = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "memory-efficient", "CUDNN_ATTENTION": "cuDNN",
             "MATH": "math (unfused)"}  # fmt: skip
    return names.get(backend.name, backend.name)


def memory_budget(device: str) -> int:
    """The bytes a micro batch may bring this process to: MEMORY_WARNING_SHARE of what PyTorch may allocate here,
    the card's memory within any per-process cap (torch.cuda.set_per_process_memory_fraction) and beside what
    other processes hold."""
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    fraction = memory_fraction(device) or 1.0
    return int(MEMORY_WARNING_SHARE * min(total * fraction, free + torch.cuda.memory_reserved(device)))


def device_index(device: str) -> int:
    """The GPU's index: the memory fraction's getter and setter refuse "cuda" without one."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def memory_fraction(device: str) -> float | None:
    """The per-process cap on PyTorch's allocator, as a share of the card; None where this torch cannot say (its
    getter came in 2.6): a cap set there is unknown to us, and must be left alone."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return None if getter is None else getter(device_index(device))


@contextlib.contextmanager
def allocator_capped_at(budget: int, device: str):
    """PyTorch's allocator capped at `budget` bytes while the block runs, and the earlier cap back after. A micro batch
    that does not fit then fails inside the allocator, at the budget, and leaves the memory above it free: uncapped,
    it would take the card to its limit, and the next need for memory the allocator does not manage (a CUDA kernel
    module loaded on first use, cuBLAS's workspace) would fail with a plain "CUDA error: out of memory"."""
    previous = memory_fraction(device)
    if previous is None:  # a torch before 2.6: the cap it may have cannot be put back, so none is set
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(previous, budget / total), device_index(device))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device_index(device))


def largest_power_of_two(sequences_per_step: int, fits: Callable[[int], bool]) -> int:
    """The largest micro batch of 1, 2, 4, ... sequences that divides a step's sequences and fits (0 if none does),
    trying each in turn until one does not."""
    largest, batch = 0, 1
    while batch <= sequences_per_step and sequences_per_step % batch == 0 and fits(batch):
        largest, batch = batch, batch * 2
    return largest


def step_fits(model: nn.Module, autocast, scaler, device: str, seq_len: int, batch: int, budget: int) -> bool:
    """Whether the forward and backward of a micro batch of `batch` sequences, twice (the second with every gradient
    held, as accumulation does), stay within budget: an out-of-memory error of any kind says no. Any other error is a
    bug, and propagates."""
    x = y = loss = None
    try:
        torch.cuda.reset_peak_memory_stats(device)
        # inputs and targets as two tensors, as wrap_model compiles: the compiled try's graph is then the run's
        x, y = torch.randint(0, model.config.vocab_size, (2, batch, seq_len), device=device)  # (B, T) each
        for _ in range(2):
            with autocast():
                _, loss = model(x, y)
            scaler.scale(loss).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) <= budget
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        return False
    finally:
        x = y = loss = None  # free the batch's activations before the next, larger one
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def compiled_step_fits(model: nn.Module, autocast, scaler, device: str, seq_len: int, batch: int,
                       budget: int) -> bool:  # fmt: skip
    """step_fits for the model compiled as the run compiles it, at this batch alone (dynamic=False: a graph for this
    shape). Compiling forgets everything compiled before, so the run's own compile starts clean (Inductor's cache on
    disk still serves it). A compile that fails for another reason than memory also says no: the run's own compile
    (wrap_model) meets it again, says why, and trains uncompiled, at the batch that fits eagerly."""
    try:
        return step_fits(torch.compile(model, dynamic=False), autocast, scaler, device, seq_len, batch, budget)
    except Exception:  # torch._dynamo and Inductor raise many kinds
        return False
    finally:
        torch._dynamo.reset()


def largest_micro_batch(model: nn.Module, autocast, scaler, device: str, seq_len: int, sequences_per_step: int,
                        reserve_bytes: int = 0, compiled: bool = False, say: Callable = print) -> int:  # fmt: skip
    """The largest power-of-two micro batch that divides a step's sequences and whose forward and backward, twice,
    fit this GPU's memory budget, with its headroom, beside what the run holds already (weights, gradients) and
    reserve_bytes held aside for what it will hold (the optimizer's state, allocated at its first step), at the run's
    sequence length and precision; 0 if not even one sequence fits. The allocator is capped at the budget meanwhile.

    Tried eagerly first: eager steps are quick to try. A compiled step keeps fewer activations (Inductor fuses
    elementwise work: 10.4 GiB against 16.5 at 16 x 1,024 in bf16 on the H200, README), so where `compiled` says
    the run compiles, twice the eager answer is tried compiled. Not four times: a compiled step's activations are
    about 0.6 of an eager one's, so four times would need more than the twice that did not fit eagerly, and each
    compiled try costs a compile (a minute or more)."""
    budget = memory_budget(device)
    with allocator_capped_at(budget, device):
        try:
            reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)  # held while the batches are tried
        except torch.cuda.OutOfMemoryError:
            return 0
        try:
            shapes = autocast, scaler, device, seq_len
            largest = largest_power_of_two(sequences_per_step, lambda b: step_fits(model, *shapes, b, budget))
            twice = 2 * largest
            if compiled and largest and twice <= sequences_per_step and sequences_per_step % twice == 0:
                say(f"--batch-size auto: {largest} x {seq_len} fits eagerly; trying {twice} x {seq_len} compiled, as "
                    "the run will be (compiling takes a minute or more)")  # fmt: skip
                if compiled_step_fits(model, *shapes, twice, budget):
                    largest = twice
        finally:
            del reserve
            torch.cuda.empty_cache()
    return largest


def probe_micro_batch(run, sequences_per_step: int) -> int:
    """largest_micro_batch for this run: its model and precision, compiled where the run compiles, with the
    optimizer's state still to come (and under DDP the gradient buckets, a copy of the gradients) held aside; the
    same on every process (the smallest any of them found)."""
    reserve = unallocated_state_bytes(run.optimizer)
    if run.world_size > 1 and run.model is None:  # before wrap_model, DDP's buckets are still to come
        reserve += sum(p.numel() * p.element_size() for p in run.raw_model.parameters())
    # before wrap_model, whether the run asks to compile; after it, whether compiling worked. Not under DDP: there
    # Dynamo splits the graph at DDP's gradient buckets, which keeps more activations than the bare model's graph
    compiled = run.world_size == 1 and (run.compiled or (run.model is None and run.wants_compile))
    found = largest_micro_batch(run.raw_model, run.autocast, run.scaler, run.device, run.args.seq_len,
                                sequences_per_step, reserve, compiled, run.say)  # fmt: skip
    found = torch.tensor(found, device=run.device)
    if run.world_size > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return int(found.item())


def fit_micro_batch(run):
    """--batch-size auto on CUDA: the largest micro batch that fits (probe_micro_batch); the training loader and the
    accumulation steps follow, so --total-batch-size, and the gradient, stay as they are. args.batch_size stays
    "auto", in the checkpoint too: a resume, on another card or with more processes, measures again."""
    args = run.args
    sequences_per_step = args.total_batch_size // (args.seq_len * run.world_size)  # one process's share of a step
    found = probe_micro_batch(run, sequences_per_step)
    budget = f"{gib(memory_budget(run.device))} of the {torch.cuda.get_device_name(run.device)}"
    if found == 0:
        raise InputError(
            f"--batch-size auto: not even one sequence of --seq-len {args.seq_len} fits {budget} beside the model and "
            "its optimizer: lower --seq-len, or train a smaller model"
        )
    run.train_loader = make_loader(type(run.train_loader), args, run.procs, "train", found)
    if eval_batch(found) < run.val_loader.B:  # validation's windows stay the same; only their batches get smaller
        run.val_loader = make_loader(type(run.val_loader), args, run.procs, "val", eval_batch(found))
    run.grad_accum_steps = accumulation_steps(args, found, run.world_size)
    run.say(
        f"--batch-size auto: {found} x {args.seq_len}, the largest power of two that divides a step's "
        f"{sequences_per_step} sequences and fits {budget}"
    )


# --- measuring the run: the chapter's own step, timed ----------------------------------------------------------


def slowest(run, seconds: float) -> float:
    """The slowest process's seconds: every process takes the same branch, since they all-reduce together."""
    if run.world_size == 1:
        return seconds
    seconds = torch.tensor(seconds, device=run.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def synchronize(device: str):
    """Wait for the device's queued work, so that a clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    elif torch.device(device).type == "mps":
        torch.mps.synchronize()


def one_micro_batch_step(run, step_seconds: Callable[[], float]) -> tuple[float, float]:
    """An optimizer step of a single micro batch: its seconds, and those of the optimizer's own step within it,
    timed by wrapping the optimizer's step for this one call (0 where fp16 skipped it and the step was not called;
    fused AdamW is called, and skips inside)."""
    optimizer_seconds = [0.0]

    @functools.wraps(run.optimizer.step)
    def timed_step(*args, **kwargs):
        synchronize(run.device)
        t0 = time.perf_counter()
        result = optimizer_step(*args, **kwargs)
        synchronize(run.device)
        optimizer_seconds[0] = time.perf_counter() - t0
        return result

    optimizer_step, run.optimizer.step = run.optimizer.step, timed_step
    accumulation, run.grad_accum_steps = run.grad_accum_steps, 1
    try:
        seconds = step_seconds()
    finally:
        run.grad_accum_steps = accumulation
        del run.optimizer.step  # the optimizer's own method again
    return slowest(run, seconds), slowest(run, optimizer_seconds[0])


def time_steps(run, step_seconds: Callable[[], float]) -> tuple[float, int]:
    """Seconds per optimizer step, and the peak memory: what CUDA's allocator reserved, or on a CPU the resident
    peak of this process times the processes sharing the machine.

    The warm-up is steps of one micro batch, until the optimizer holds its state (fp16 may skip the first steps).
    A short step is then timed whole, three times. A long one (a 124M step on a laptop takes minutes) is not run
    whole: a step is its micro batches, then the clipping and the optimizer's step, so the plan multiplies a micro
    batch (with the clipping: a little over) by the accumulation and adds the optimizer's step. Each stage says
    what it times, so a long plan shows its progress."""
    cuda = torch.device(run.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    accumulation = run.grad_accum_steps
    run.say(f"timing: a warm-up step of one micro batch ({run.micro_batch} x {run.args.seq_len} tokens)")
    first = one_micro_batch_step(run, step_seconds)
    for _ in range(4):  # an fp16 step skipped for overflow is skipped on every process alike
        if run.optimizer.state:
            break
        first = one_micro_batch_step(run, step_seconds)
    if first[0] * accumulation < LONG_STEP_SECONDS:
        run.say(f"timing: 3 whole steps of {accumulation} micro batch(es), after a warm-up step")
        step_seconds()
        seconds = statistics.median(step_seconds() for _ in range(3))
    else:  # a second and third look where a micro batch is quick, for the median
        looks = [first] + [one_micro_batch_step(run, step_seconds) for _ in range(2 if first[0] < 2 else 0)]
        micro_batch = statistics.median(total - optimizer for total, optimizer in looks)
        optimizer = statistics.median(optimizer for _, optimizer in looks)
        seconds = accumulation * micro_batch + optimizer
        run.say(
            f"timing: a micro batch took {micro_batch:.1f} s and the optimizer's step {optimizer:.1f} s; a step is "
            f"{accumulation} micro batches and one optimizer step: about {duration(seconds)}, not run whole"
        )
    if cuda:
        return seconds, torch.cuda.max_memory_reserved(run.device)
    return seconds, resident_peak_bytes() * int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def validation_batches(run) -> int:
    """The batches estimate_loss reads: run.val_windows windows (at most the split's), loader.rows to a batch."""
    return math.ceil(min(run.val_windows, sum(run.val_loader.windows_per_shard)) / run.val_loader.rows)


def time_validation(run, validate: Callable[[], object]) -> float:
    """Seconds of one validation: its first batch timed, then the whole of it where that is short, or the first
    batch times the number of batches where it is long."""
    args, batches = run.args, validation_batches(run)
    run.say(f"timing: validation's first batch of {batches}")
    eval_steps, args.eval_steps = args.eval_steps, math.ceil(run.val_loader.rows / EVAL_ROWS)  # about one batch
    try:
        piece = validation_batches(run)  # one, or a few where a batch's rows are not a multiple of EVAL_ROWS
        t0 = time.perf_counter()
        validate()
        first = slowest(run, (time.perf_counter() - t0) / piece)
    finally:
        args.eval_steps = eval_steps
    if first * batches < LONG_STEP_SECONDS:
        t0 = time.perf_counter()
        validate()
        return time.perf_counter() - t0
    return first * batches


def plan_run(run, step_seconds: Callable[[], float], validate: Callable[[], object]):
    """Time the run's steps (step_seconds takes one optimizer step of run.grad_accum_steps micro batches, and returns
    its seconds) and one validation, then print the plan, in words and as one line of JSON for the notebook and
    scripts to read."""
    args, config = run.args, run.raw_model.config
    seconds_per_step, peak_memory = time_steps(run, step_seconds)
    eval_seconds = time_validation(run, validate)
    if torch.device(run.device).type == "cuda":
        device = torch.cuda.get_device_name(run.device)
        memory = torch.cuda.get_device_properties(run.device).total_memory
        sequences_per_step = args.total_batch_size // (args.seq_len * run.world_size)  # one process's share of a step
        # under --batch-size auto the run has just measured it
        largest = run.micro_batch if args.batch_size == "auto" else probe_micro_batch(run, sequences_per_step)
    else:
        device, memory, largest = run.device, physical_memory_bytes(), None
    facts = Facts(
        parameters=sum(p.numel() for p in run.raw_model.parameters()),
        **{name: getattr(args, name) for name in RUN_SETTINGS},
        batch_size=run.micro_batch,
        model=f"{config.n_layer} layers, width {config.n_embd}, context {config.block_size}",
        train_tokens=run.train_loader.total_tokens,
        val_tokens=run.val_loader.total_tokens,
        world_size=run.world_size,
        grad_accum_steps=run.grad_accum_steps,
        start_step=run.step,
        device=device,
        precision=run.precision,
        why=run.why,
        compiled=run.compiled,
        attention=attention_kernel(config, run.micro_batch, args.seq_len, PRECISIONS[run.precision], run.device),
        seconds_per_step=seconds_per_step,
        eval_seconds=eval_seconds,
        mfu=run.mfu(args.total_batch_size / seconds_per_step),
        peak_memory_bytes=peak_memory,
        device_memory_bytes=memory,
        checkpoint_bytes_each=checkpoint_size(run.raw_model, **run.state(run.step)),  # counted, not written
        largest_micro_batch=largest,
        run_dir_holds_a_run=bool(step_checkpoints(args.run_dir)),
        checkpoints_kept=len(step_checkpoints(args.run_dir)) if args.resume else 0,
        run_dir_in_use=run.in_use,
        in_colab="COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules,
    )
    plan = make_plan(facts)
    for line in plan_lines(facts, plan):
        run.say(line)
    run.say(json.dumps(plan))

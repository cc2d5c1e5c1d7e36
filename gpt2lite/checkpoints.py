"""
The run directory: checkpoints that resume a run exactly, the log every event goes to, and the bookkeeping around
them (which checkpoint to resume, which to delete, where a resume would start, the summary that ends a run).

A run directory holds ckpt_NNNNNN.pt (the last --keep-last), best.pt (the lowest validation loss) and log.jsonl.
Every file is written under a temporary name and renamed, so a crash never leaves one half-written.
"""

import json
import os
import random
import re
import shlex
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from gpt2lite.cli import InputError, duration, first_line
from gpt2lite.files import write_atomically

# --- checkpoints ------------------------------------------------------------------------------------------------


def save_checkpoint(path: str, model: torch.nn.Module, **extra):
    """Write model weights, config and any extra state to `path` atomically: a crash leaves the old file intact.
    model is the bare module (never torch.compile's or DDP's wrapper, whose keys carry a prefix), with a
    dataclass `config`."""
    state = {"model": model.state_dict(), "model_config": asdict(model.config), **extra}
    write_atomically(path, lambda f: torch.save(state, f))


class ByteCounter:
    """A file that keeps nothing, only counts what is written to it."""

    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self):
        pass


def checkpoint_size(model: torch.nn.Module, **extra) -> int:
    """The bytes save_checkpoint would write for the same state, counted without writing them anywhere."""
    counter = ByteCounter()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), **extra}, counter)
    return counter.bytes


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by save_checkpoint, read with weights_only=True (no arbitrary code from the file)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, another format, a pickle that weights_only refuses, ...
        raise InputError(f"{path} is not a readable gpt2-lite checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError(f"{path} is not a gpt2-lite checkpoint (it has no 'model' and 'model_config')")
    return state


# --- the run directory ------------------------------------------------------------------------------------------

# One JSON object per line, each with "step" and "split":
#   {"split": "train", "loss", "lr", "norm", "ms", "tok_s", "skipped"}   after every optimizer step
#   {"split": "val", "loss"}                                             every --eval-interval steps
#   {"split": "sample", "text"}                                          every --sample-interval steps
#   {"split": "hellaswag", "acc", "acc_norm", "examples"}                every --hellaswag-interval steps
LOG_NAME = "log.jsonl"


def log_event(run_dir: str, **fields):
    """Append one event to log.jsonl, the machine-readable log that plot_losses.py reads."""
    with open(os.path.join(run_dir, LOG_NAME), "a") as f:
        f.write(json.dumps(fields) + "\n")


def read_log(path: str) -> tuple[list[dict], int]:
    """The events of a log.jsonl, and how many lines were not events (a line cut short by a crash, say)."""
    events, malformed = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("step"), int) and isinstance(event.get("split"), str):
                events.append(event)
            else:
                malformed += 1
    return events, malformed


def numeric(event: dict, *keys: str) -> bool:  # a line written by another version may lack a field
    return all(isinstance(event.get(key), (int, float)) for key in keys)


def truncate_log(run_dir: str, step: int):
    """Drop events of steps >= step: a resumed run logs them again, as if it had never stopped."""
    path = os.path.join(run_dir, LOG_NAME)
    if not os.path.isfile(path):
        return
    kept = [json.dumps(event) + "\n" for event in read_log(path)[0] if event["step"] < step]
    write_atomically(path, lambda f: f.write("".join(kept).encode()))


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:06d}.pt")


def step_checkpoints(run_dir: str) -> list[str]:
    """The run's periodic checkpoints, oldest first (best.pt, the best-validation one, is kept apart)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(os.path.join(run_dir, n) for n in names if re.fullmatch(r"ckpt_\d{6}\.pt", n))


def open_run(
    run_dir: str, resume: bool, first_checkpoint_step: int, say: Callable[..., None]
) -> tuple[dict | None, str | None]:
    """Continue the run directory (resume) or start it, never overwriting someone's run: the checkpoint to
    continue from and its path, or (None, None) for a run that starts at step 0. A log without checkpoints is
    started over only where it stops before the step of the first checkpoint (a run that died before writing one,
    on a Colab disconnect say); a longer one is a finished run's record (its checkpoints deleted, or logs kept
    apart like the README's reference runs), and stays."""
    if resume:
        checkpoint, path = latest_checkpoint(run_dir, say)
        if checkpoint is not None:
            return checkpoint, path
    elif step_checkpoints(run_dir):
        raise InputError(f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    log = os.path.join(run_dir, LOG_NAME)
    logged = max((event["step"] for event in read_log(log)[0]), default=None) if os.path.isfile(log) else None
    if logged is not None and logged >= first_checkpoint_step:
        raise InputError(
            f"{run_dir} holds the log of a run that reached step {logged} but no checkpoint to continue it from: "
            f"choose another --run-dir, or delete {log} to start over"
        )
    if logged is not None:
        say(f"{run_dir} holds a log but no checkpoint: starting that run again from step 0")
    elif resume:  # so one command serves a run's first start and every restart
        say(f"--resume: {run_dir} holds no checkpoint yet: starting the run at step 0")
    return None, None


def latest_checkpoint(run_dir: str, say: Callable[..., None]) -> tuple[dict | None, str | None]:
    """The newest of the run's checkpoints that loads, and its path; (None, None) when the run has none yet.

    Read on the CPU: RNG states must stay CPU tensors, the optimizer's load_state_dict moves its state to the
    parameters' device itself, and a GPU copy of the whole checkpoint would sit in memory for the entire run.
    A checkpoint that does not load (cut short by a full disk or a dead machine) is skipped, and left in place.
    """
    paths = step_checkpoints(run_dir)
    problems = []
    for path in reversed(paths):
        try:
            return load_checkpoint(path), path
        except InputError as e:
            say(f"--resume: skipping {e}; the file is left as it is")
            problems.append(str(e))
    if paths:
        raise InputError(f"--resume: none of the {len(paths)} checkpoints in {run_dir} loads ({problems[0]})")
    return None, None


def resume_hint(run_dir: str) -> str:
    """What `--resume` would do with this run directory now: for the line that ends an interrupted run."""
    checkpoints, command = step_checkpoints(run_dir), f"python train_gpt2.py --resume --run-dir {shlex.quote(run_dir)}"
    if not checkpoints:
        return f"{run_dir} holds no checkpoint yet, so `{command}` starts the run again from step 0"
    step = int(os.path.basename(checkpoints[-1])[len("ckpt_") : -len(".pt")])
    return f"`{command}` continues the run from step {step} ({checkpoints[-1]})"


def rotate_checkpoints(run_dir: str, keep_last: int):
    """Delete all but the newest keep_last periodic checkpoints (best.pt is kept apart)."""
    for old in step_checkpoints(run_dir)[:-keep_last]:
        remove_checkpoint(old)


def remove_checkpoint(path: str):
    """Delete a checkpoint that rotation drops. On a mounted Google Drive (Colab) a deleted file goes to Drive's
    trash and counts against the 15 GB quota for 30 days: ten rotations of a 1.39 GiB checkpoint fill it. Emptied
    first, the file goes to the trash at 0 bytes. Not if another hard link shares its data: that copy is someone's."""
    if os.stat(path).st_nlink == 1:
        os.truncate(path, 0)
    os.remove(path)


# --- random states ----------------------------------------------------------------------------------------------


def rng_states(device: str) -> dict:
    """Every random state training touches (dropout draws from torch's), in types weights_only loading accepts."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(random.getstate()[1]),
    }


def set_rng_states(states: dict, device: str):
    # torch wants RNG states as CPU byte tensors, whatever device a checkpoint was mapped to
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(states["python"]), None))


# --- the end of a run -------------------------------------------------------------------------------------------


def run_summary(run_dir: str, max_steps: int, stopped_early: bool, first_step: int, wall_seconds: float) -> list[str]:
    """What the run did, from its whole log (across resumes), then the commands a user types next, filled in."""
    events = read_log(os.path.join(run_dir, LOG_NAME))[0]
    train = [event for event in events if event["split"] == "train" and numeric(event, "loss", "ms", "tok_s")]
    val = [event for event in events if event["split"] == "val" and numeric(event, "loss")]
    reached = max((event["step"] for event in val), default=first_step)  # the loop's last step evaluates
    lines = [
        f"run done: step {reached:,} of {max_steps:,} in {run_dir}" + (" (stopped early)" if stopped_early else "")
    ]
    if val:
        best = min(val, key=lambda event: event["loss"])
        lines.append(f"  validation loss: best {best['loss']:.4f} at step {best['step']}, "
                     f"last {val[-1]['loss']:.4f} at step {val[-1]['step']}")  # fmt: skip
    if train:
        lines += train_lines(train)
    since = f"since the resume at step {first_step}" if first_step else "from start to end"
    lines.append(f"  wall time: {duration(wall_seconds)} {since}, with evaluations, samples and checkpoints")
    return lines + next_commands(run_dir)


def train_lines(train: list[dict]) -> list[str]:
    """The training steps' loss, tokens and speed; a step's tokens are its tok/s times its time, so a run resumed
    with another --total-batch-size counts each part at its own size."""
    recent = [event["loss"] for event in train[-10:]]  # one step's loss is one batch's: noisy
    tokens = sum(event["tok_s"] * event["ms"] / 1000 for event in train)
    seconds = sum(event["ms"] for event in train) / 1000
    skipped = sum(bool(event.get("skipped")) for event in train)
    return [
        f"  train loss: {train[-1]['loss']:.4f} at step {train[-1]['step']}, "
        f"{sum(recent) / len(recent):.4f} over the last {len(recent)} steps",
        f"  tokens: {tokens:,.0f} in {len(train):,} steps" + (f" ({skipped} skipped: fp16 overflow)" if skipped else "")
        + f", {tokens / seconds:,.0f} tok/s on average over the steps",
    ]  # fmt: skip


def next_commands(run_dir: str) -> list[str]:
    """Where the model to use is, and the commands that plot, sample, export and evaluate it, ready to paste."""
    best = os.path.join(run_dir, "best.pt")
    checkpoints = step_checkpoints(run_dir)
    model = best if os.path.isfile(best) else checkpoints[-1] if checkpoints else None
    if model is None:
        return []
    quoted = shlex.quote(model)
    return [
        f"  model to use: {model}" + ("" if model == best else " (no validation loss improved on step 0's)"),
        "next:",
        f"  python plot_losses.py {shlex.quote(run_dir)}",
        f"  python sample.py --init-from {quoted}",
        f"  python export.py {quoted} {shlex.quote(os.path.join(run_dir, 'hf'))}",
        f"  python evaluate.py --init-from {quoted} --task all",
    ]

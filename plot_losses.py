"""
Plot training runs from their log.jsonl: loss (train and validation), learning rate, gradient norm, throughput,
and HellaSwag accuracy for runs trained with --hellaswag-interval.

  python plot_losses.py runs/my-run                 # runs/my-run/my-run_loss.png, _lr.png, _norm.png, _speed.png
  python plot_losses.py runs/a runs/b --name a-vs-b  # two runs overlaid, one colour and legend entry each, in runs/a
  python plot_losses.py runs/cpu-demo reference/cpu-demo   # a rerun over the README's run: runs-cpu-demo_vs_...
  python plot_losses.py runs/a --out plots --smooth 0.95   # heavier smoothing of the train loss, PNGs in plots/

It prints each run's lowest train and validation loss and the step of each (the seed's "Min losses").
The train loss of one step is noisy (one batch); the plot shows it faint, with an exponential moving average
(weight --smooth, bias-corrected like TensorBoard's) drawn over it so the trend shows through the noise.
"""

import argparse
import math
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, on a server, in CI or in a notebook kernel

import matplotlib.pyplot as plt  # noqa: E402 (the backend is chosen before pyplot is imported)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from gpt2lite.checkpoints import LOG_NAME, numeric, read_log  # noqa: E402
from gpt2lite.cli import ArgumentParser, InputError, run_cli  # noqa: E402
from gpt2lite.evaluation import OPENAI_124M_HELLASWAG  # noqa: E402
from gpt2lite.files import write_atomically  # noqa: E402

UNIFORM_LOSS = math.log(50257)  # 10.82: the loss of a model that gives every GPT-2 token the same probability


@dataclass
class Run:
    """One run's log, as columns: steps[i] goes with the i-th value of the same split."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lr": [], "norm": [], "tok_s": []})
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    hellaswag_steps: list[int] = field(default_factory=list)
    hellaswag_acc_norm: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # fp16 steps GradScaler skipped for overflowing gradients
    malformed: int = 0


def run_names(run_dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path where two runs share a folder name (a rerun against its reference):
    relative to here when it lies below, else as given."""
    names = [os.path.basename(os.path.normpath(run_dir)) for run_dir in run_dirs]
    if len(set(names)) == len(names):
        return names
    paths = [(os.path.relpath(run_dir), os.path.normpath(run_dir)) for run_dir in run_dirs]
    return [relative if not relative.startswith("..") else given for relative, given in paths]


def file_prefix(names: list[str]) -> str:
    """The PNG files' shared name: the runs' names joined, a path's separators as dashes (none leading)."""
    return "_vs_".join(name.replace(os.sep, "-").lstrip("-.") for name in names)


def load_run(run_dir: str, name: str | None = None) -> Run:
    if not os.path.isdir(run_dir):
        raise InputError(f"no run directory {run_dir}: give the --run-dir of a train_gpt2.py run")
    path = os.path.join(run_dir, LOG_NAME)
    if not os.path.isfile(path):
        raise InputError(f"{run_dir} has no {LOG_NAME}: is it the --run-dir of a train_gpt2.py run?")
    events, malformed = read_log(path)
    run = Run(name=name or os.path.basename(os.path.normpath(run_dir)), malformed=malformed)
    for event in events:
        if event["split"] == "train" and numeric(event, *run.train):
            run.train_steps.append(event["step"])
            for key, column in run.train.items():
                column.append(float(event[key]))
            if event.get("skipped"):
                run.skipped_steps.append(event["step"])
        elif event["split"] == "val" and numeric(event, "loss"):
            run.val_steps.append(event["step"])
            run.val_loss.append(float(event["loss"]))
        elif event["split"] == "hellaswag" and numeric(event, "acc_norm"):
            run.hellaswag_steps.append(event["step"])
            run.hellaswag_acc_norm.append(float(event["acc_norm"]))
    if not run.train_steps and not run.val_steps:
        problem = "is empty" if not events and not malformed else "has no train or val loss to plot"
        raise InputError(f"{path} {problem}: the run has not logged a step yet")
    return run


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, divided by (1 - weight^n) so the first points are not dragged toward 0."""
    average, smoothed = 0.0, []
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**n))
    return smoothed


def lowest(steps: list[int], values: list[float]) -> tuple[float, int] | None:
    """(lowest finite value, its step), or None when there is none."""
    steps, values = finite_points(steps, values)
    return min(zip(values, steps)) if values else None


def summary(run: Run) -> str:
    parts = [run.name]
    for split, steps, values in (("train", run.train_steps, run.train["loss"]), ("val", run.val_steps, run.val_loss)):
        best = lowest(steps, values)
        parts.append(f"min {split} loss {best[0]:.4f} at step {best[1]}" if best else f"no {split} loss")
    if run.hellaswag_steps:
        best = max(zip(run.hellaswag_acc_norm, run.hellaswag_steps))
        parts.append(f"best hellaswag acc_norm {best[0]:.4f} at step {best[1]}")
    if run.skipped_steps:
        parts.append(f"{len(run.skipped_steps)} steps skipped by GradScaler")
    if run.malformed:
        parts.append(f"{run.malformed} malformed line{'s' if run.malformed > 1 else ''} skipped")
    return " | ".join(parts)


def finite_points(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """Drop NaN and inf (an fp16 step that overflowed has no norm): matplotlib would break the line there."""
    kept = [(step, value) for step, value in zip(steps, values) if math.isfinite(value)]
    return [step for step, _ in kept], [value for _, value in kept]


def plot_loss(runs: list[Run], weight: float) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run, color in zip(runs, colors()):
        steps, losses = finite_points(run.train_steps, run.train["loss"])
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(losses, weight), color=color, linewidth=1.8)
        ax.plot(run.val_steps, run.val_loss, color=color, linestyle="--", marker="o", markersize=4, linewidth=1.4)
    ax.axhline(UNIFORM_LOSS, color="grey", linewidth=0.8, linestyle=":")
    ax.text(0.01, UNIFORM_LOSS, " ln(50257) = 10.82: a uniform guess", transform=ax.get_yaxis_transform(),
            va="bottom", fontsize=8, color="grey")  # fmt: skip
    log_scale(ax)
    ax.set(title="Loss", xlabel="step (optimizer updates)", ylabel="cross-entropy (nats per token, log scale)")
    styles = [Line2D([], [], color="black", alpha=0.25, linewidth=0.8, label="train, one step"),
              Line2D([], [], color="black", linewidth=1.8, label=f"train, smoothed ({weight:g})"),
              Line2D([], [], color="black", linestyle="--", marker="o", markersize=4, label="validation")]  # fmt: skip
    ax.add_artist(ax.legend(handles=styles, loc="upper right"))
    if len(runs) > 1:
        ax.legend(handles=run_handles(runs), loc="lower left", title="run")
    return finish(fig, ax)


def plot_train_column(runs: list[Run], key: str, title: str, ylabel: str, log: bool) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, color in zip(runs, colors()):
        ax.plot(*finite_points(run.train_steps, run.train[key]), color=color, linewidth=1.2, label=run.name)
    if log:
        log_scale(ax)
    else:
        ax.set_ylim(bottom=0)  # from zero, so that noise does not look like a collapse
    ax.set(title=title, xlabel="step (optimizer updates)", ylabel=ylabel)
    ax.legend(loc="best")
    return finish(fig, ax)


def log_scale(ax):
    """A log y axis labelled with plain numbers (6, not 6 x 10^0); the ticks between powers of ten are labelled
    too when the data spans less than a decade, as a loss curve does."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    low, high = ax.get_ylim()
    if high / low < 10:
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def plot_hellaswag(runs: list[Run]) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, color in zip(runs, colors()):
        ax.plot(run.hellaswag_steps, run.hellaswag_acc_norm, color=color, marker="o", markersize=4, label=run.name)
    ax.axhline(0.25, color="grey", linewidth=0.8, linestyle=":", label="chance (1 in 4)")
    openai = OPENAI_124M_HELLASWAG
    ax.axhline(openai, color="black", linewidth=0.8, linestyle="--", label=f"GPT-2 124M, OpenAI's weights ({openai})")
    ax.set(title="HellaSwag", xlabel="step (optimizer updates)", ylabel="acc_norm (fraction right)")
    ax.legend(loc="best")
    return finish(fig, ax)


def colors() -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10


def run_handles(runs: list[Run]) -> list[Line2D]:
    return [Line2D([], [], color=color, linewidth=1.8, label=run.name) for run, color in zip(runs, colors())]


def finish(fig: Figure, ax) -> Figure:
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def draw(runs: list[Run], weight: float) -> dict[str, Figure]:
    """Every figure, by the suffix of its file name; HellaSwag's only for runs that evaluated it."""
    figures = {
        "loss": plot_loss(runs, weight),
        "lr": plot_train_column(runs, "lr", "Learning rate", "learning rate", log=False),
        "norm": plot_train_column(runs, "norm", "Gradient norm (before clipping)", "global L2 norm (log scale)",
                                  log=True),  # fmt: skip
        "speed": plot_train_column(runs, "tok_s", "Throughput", "tokens per second (all processes)", log=False),
    }
    if any(run.hellaswag_steps for run in runs):
        figures["hellaswag"] = plot_hellaswag(runs)
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Plot train_gpt2.py runs from their log.jsonl.")
    parser.add_argument("runs", nargs="+", help="run directories (the --run-dir of each training run)")
    parser.add_argument("--out", default=None,
                        help="directory for the PNG files (default: the first run's directory, beside its log.jsonl)")
    parser.add_argument("--name", default=None,
                        help="file name prefix (default: the run's name, or the names joined by _vs_)")
    parser.add_argument("--smooth", type=float, default=0.9,
                        help="weight of the moving average over the train loss, in [0, 1) (0 = no smoothing)")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    runs = [load_run(run_dir, name) for run_dir, name in zip(args.runs, run_names(args.runs))]
    for run in runs:
        print(summary(run))
    name = args.name or file_prefix([run.name for run in runs])
    out = args.out or args.runs[0]  # a run's plots stay with it, not among the README's figures in images/
    for suffix, fig in draw(runs, args.smooth).items():
        path = os.path.join(out, f"{name}_{suffix}.png")
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)

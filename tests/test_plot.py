"""plot_losses.py: PNGs from a log.jsonl, minimum losses, malformed lines, bad input.

  python -m pytest tests/test_plot.py -q
"""

import json
import math

import pytest

import plot_losses
from gpt2lite.checkpoints import LOG_NAME

SUFFIXES = ("loss", "lr", "norm", "speed")


def write_log(run_dir, events, extra_lines=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(event) for event in events] + list(extra_lines)
    (run_dir / LOG_NAME).write_text("\n".join(lines) + "\n")
    return run_dir


def synthetic_events(steps=60, offset=0.0):
    """A run whose train loss falls with a wobble, lowest at step 49 (2.0), and val every 10 steps, lowest at 40."""
    events = []
    for step in range(steps):
        loss = 8.0 * math.exp(-step / 20) + 2.2 + 0.1 * (-1) ** step + offset
        if step == 49:
            loss = 2.0 + offset
        events.append({"step": step, "split": "train", "loss": loss, "lr": 6e-4 * min(1, (step + 1) / 10),
                       "norm": 1.0 / (step + 1), "ms": 100.0, "tok_s": 1000.0 + step, "skipped": False})
        if step % 10 == 0:
            events.append({"step": step, "split": "val", "loss": 3.0 if step == 40 else 4.0 + offset})
    events.append({"step": 50, "split": "sample", "text": "hello"})
    return events


def test_a_log_gives_four_pngs_and_its_minimum_losses(tmp_path, capsys):
    run = write_log(tmp_path / "demo", synthetic_events())
    plot_losses.main([str(run), "--out", str(tmp_path / "images")])
    out = capsys.readouterr().out
    assert "demo | min train loss 2.0000 at step 49 | min val loss 3.0000 at step 40" in out
    for suffix in SUFFIXES:
        png = tmp_path / "images" / f"demo_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_without_out_the_plots_go_beside_the_run_not_into_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a clone's root, with the README's images/ folder
    (tmp_path / "images").mkdir()
    run = write_log(tmp_path / "runs" / "mine", synthetic_events())
    plot_losses.main(["runs/mine"])
    assert sorted(p.name for p in run.glob("*.png")) == sorted(f"mine_{suffix}.png" for suffix in SUFFIXES)
    assert not any((tmp_path / "images").iterdir())


def test_several_runs_are_overlaid_with_one_legend_entry_each(tmp_path, capsys):
    runs = [plot_losses.load_run(str(write_log(tmp_path / name, synthetic_events(offset=i))))
            for i, name in enumerate(["base", "dropout", "bigger"])]  # fmt: skip
    figures = plot_losses.draw(runs, weight=0.9)
    for suffix in ("lr", "norm", "speed"):
        legend = figures[suffix].axes[0].get_legend()
        assert [text.get_text() for text in legend.get_texts()] == ["base", "dropout", "bigger"]
    loss_axes = figures["loss"].axes[0]
    assert [text.get_text() for text in loss_axes.get_legend().get_texts()] == ["base", "dropout", "bigger"]
    assert loss_axes.get_yscale() == "log" and figures["norm"].axes[0].get_yscale() == "log"
    assert len(loss_axes.get_lines()) == 3 * 3 + 1  # raw, smoothed and val per run, and the uniform-guess line

    plot_losses.main([str(tmp_path / "base"), str(tmp_path / "dropout"), "--out", str(tmp_path / "images")])
    assert (tmp_path / "images" / "base_vs_dropout_loss.png").is_file()


def test_a_rerun_and_its_reference_share_a_folder_name_and_are_told_apart_by_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_log(tmp_path / "runs" / "cpu-demo", synthetic_events(offset=1))
    write_log(tmp_path / "reference" / "cpu-demo", synthetic_events())
    plot_losses.main(["runs/cpu-demo", "reference/cpu-demo"])
    out = capsys.readouterr().out
    assert "runs/cpu-demo | min train loss" in out and "reference/cpu-demo | min train loss" in out
    loss = tmp_path / "runs" / "cpu-demo" / "runs-cpu-demo_vs_reference-cpu-demo_loss.png"
    assert loss.is_file() and not list((tmp_path / "reference").rglob("*.png"))  # the reference folder is only read


def test_malformed_lines_are_counted_and_skipped(tmp_path, capsys):
    cut_short = '{"step": 60, "split": "train", "lo'  # what a crash in the middle of a write leaves
    run = write_log(tmp_path / "demo", synthetic_events(), extra_lines=[cut_short, "[1, 2]", '{"split": "val"}'])
    loaded = plot_losses.load_run(str(run))
    assert loaded.malformed == 3 and len(loaded.train_steps) == 60 and len(loaded.val_steps) == 6
    plot_losses.main([str(run), "--out", str(tmp_path / "images")])
    assert "3 malformed lines skipped" in capsys.readouterr().out


def test_non_finite_norms_and_skipped_steps_do_not_break_the_plot(tmp_path, capsys):
    events = synthetic_events()
    events[5].update(norm=float("inf"), skipped=True)  # json writes Infinity, as train_gpt2.py does for fp16
    run = plot_losses.load_run(str(write_log(tmp_path / "fp16", events)))
    assert run.skipped_steps == [events[5]["step"]]
    xs = plot_losses.draw([run], weight=0.9)["norm"].axes[0].get_lines()[0].get_xdata()
    assert events[5]["step"] not in list(xs) and len(xs) == 59
    assert "1 steps skipped by GradScaler" in plot_losses.summary(run)


def test_smoothing_is_a_bias_corrected_moving_average():
    assert plot_losses.smooth([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no pull toward zero
    assert plot_losses.smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    assert plot_losses.smooth([1.0, 5.0], 0.0) == [1.0, 5.0]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "no run directory"),
    (lambda d: d, "has no log.jsonl"),
    (lambda d: write_log(d / "empty", []), "is empty"),
    (lambda d: write_log(d / "junk", [], extra_lines=["not json", '{"step": 1}']), "has no train or val loss"),
    (lambda d: write_log(d / "samples", [{"step": 0, "split": "sample", "text": "hi"}]), "has no train or val loss"),
])  # fmt: skip
def test_bad_runs_get_one_line_and_a_non_zero_exit(tmp_path, capsys, make, message):
    run_dir = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        plot_losses.run_cli(plot_losses.main, [str(run_dir), "--out", str(tmp_path / "images")])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "images").exists()


def test_bad_smoothing_weight_is_refused(tmp_path, capsys):
    run = write_log(tmp_path / "demo", synthetic_events())
    with pytest.raises(SystemExit) as exit_info:
        plot_losses.main([str(run), "--smooth", "1"])
    assert exit_info.value.code != 0 and "--smooth must be in [0, 1)" in capsys.readouterr().err


def test_runs_trained_with_hellaswag_get_its_plot_and_best_accuracy(tmp_path, capsys):
    events = synthetic_events()
    events += [{"step": step, "split": "hellaswag", "acc": 0.26, "acc_norm": norm, "examples": 100}
               for step, norm in ((0, 0.25), (20, 0.27), (40, 0.31), (59, 0.29))]  # fmt: skip
    run = write_log(tmp_path / "hs", events)
    plot_losses.main([str(run), "--out", str(tmp_path / "images")])
    assert "best hellaswag acc_norm 0.3100 at step 40" in capsys.readouterr().out
    assert (tmp_path / "images" / "hs_hellaswag.png").stat().st_size > 10_000
    plain = plot_losses.load_run(str(write_log(tmp_path / "plain", synthetic_events())))
    assert "hellaswag" not in plot_losses.draw([plain], weight=0.9)

"""notebooks/colab.ipynb runs end to end on a CPU (nbclient), with tiny settings, a tiny random GPT-2 standing in for
OpenAI's and generated text, so that it cannot silently rot: Part 1 (sample, fine-tune, sample again), Part 2 (data,
plan, training, a disconnect and a resume, plots, samples, export), and, with ALLOW_CPU off, the one-line stop on a
runtime without a GPU.

  python -m pytest tests/test_notebook.py -q
"""

import ast
import json
import re
import shlex

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from test_data import make_text, write_files
from test_train import TINY_RUN

import prepare_data
import train_gpt2
from conftest import REPO
from gpt2lite.checkpoints import log_event

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"
# the fine-tune at the notebook's shape (one checkpoint, at the end; validation at step 0 and after), in seconds
TINY_FINETUNE = ["--seq-len", "32", "--batch-size", "4", "--total-batch-size", "256", "--warmup-steps", "1",
                 "--max-lr", "6e-5", "--min-lr", "6e-6", "--eval-interval", "1", "--eval-steps", "2",
                 "--ckpt-interval", "0", "--sample-interval", "0", "--no-compile", "--device", "cpu"]  # fmt: skip


@pytest.fixture(autouse=True)
def cpu_runtime(monkeypatch):
    """The kernel and the scripts it starts see no GPU, as on a CPU runtime, even where the tests run beside one; and
    they use one thread: tiny models gain nothing from a second, and on a busy machine two threads wait on each
    other (a sample took 13 s instead of 2)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_settings(tmp_path, base_model, text_file, max_steps: int, allow_cpu: bool = True) -> str:
    """The notebook's settings cell, for a CPU in seconds instead of a T4 in hours."""
    flags = [*TINY_RUN, "--max-steps", str(max_steps), "--eval-interval", "2", "--ckpt-interval", "2",
             "--sample-interval", "4", "--no-compile"]  # fmt: skip
    data_flags = f"--input {text_file} --val-fraction 0.1 --num-proc 1"
    return "\n".join([
        f"DRIVE_DIR = {str(tmp_path / 'drive')!r}",
        "REPO_URL = ''",
        f"ALLOW_CPU = {allow_cpu}",
        f"WORK_DIR = {str(tmp_path / 'work')!r}",
        f"BASE_MODEL = {str(base_model)!r}",
        "PROMPT_SHAKESPEARE = 'ROMEO:'",
        f"FINETUNE_DATA_FLAGS = {data_flags!r}",
        "FINETUNE_STEPS = 2",
        f"FINETUNE_FLAGS = {' '.join(TINY_FINETUNE)!r}",
        "DATASET = 'tiny'",
        f"PREPARE_FLAGS = {data_flags!r}",
        "DATA_NAME = 'tiny'",
        "RUN_NAME = 'colab-test'",
        f"TRAIN_FLAGS = {' '.join(flags)!r}",
        "PROMPT = 'The'",
    ])  # fmt: skip


def with_settings(settings: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    settings_cell(notebook).source = settings
    return notebook


def settings_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    (cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    return cell


def execute(notebook: nbformat.NotebookNode):
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()


def run_notebook(settings: str) -> dict[str, str]:
    """Run all, as a user would; each code cell's printed text, by cell id: its stdout, then its stderr (the two
    come in chunks, cut anywhere and interleaved as they came)."""
    notebook = with_settings(settings)
    execute(notebook)
    return {cell.id: "".join(output.text for name in ("stdout", "stderr") for output in cell.outputs
                             if output.output_type == "stream" and output.name == name)
            for cell in notebook.cells if cell.cell_type == "code"}  # fmt: skip


def sample_text(output: str) -> str:
    return re.sub(r"\n\d+ tokens in .*", "", output)  # without sample.py's speed


def assigned_names(source: str) -> list[str]:
    return [target.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for target in node.targets]


def test_the_notebooks_settings_are_the_ones_the_tests_set_and_flags_the_scripts_accept(tmp_path):
    real = settings_cell(nbformat.read(NOTEBOOK, as_version=4)).source
    assert assigned_names(real) == assigned_names(tiny_settings(tmp_path, "base", "text.txt", max_steps=4))
    settings = {}
    exec(real, settings)  # plain assignments: nothing runs
    assert settings["ALLOW_CPU"] is False and settings["WORK_DIR"] == "."
    finetune = ["--init-from", settings["BASE_MODEL"], "--max-steps", str(settings["FINETUNE_STEPS"])]
    for flags in (finetune + shlex.split(settings["FINETUNE_FLAGS"]), shlex.split(settings["TRAIN_FLAGS"])):
        train_gpt2.parse_args([*flags, "--resume"])
    for flags in (settings["FINETUNE_DATA_FLAGS"], settings["PREPARE_FLAGS"]):
        prepare_data.parse_args(shlex.split(flags))


def test_the_colab_notebook_fine_tunes_trains_resumes_plots_and_samples_on_a_cpu(tmp_path, gpt2_vocab_hf_dir):
    text_file = write_files(tmp_path / "text", {"tiny.txt": make_text(6000, seed=1)})[0]
    finetune = tmp_path / "work" / "runs" / "gpt2-shakespeare"
    run = tmp_path / "drive" / "runs" / "colab-test"
    loss_line = r"validation loss: \d+\.\d{3} before fine-tuning, \d+\.\d{3} after \(best\.pt, step [012]\)\n"

    finetune.mkdir(parents=True)  # a fine-tune stopped before its one checkpoint, as the ■ button leaves it
    log_event(str(finetune), step=0, split="val", loss=99.0)

    first = run_notebook(tiny_settings(tmp_path, gpt2_vocab_hf_dir, text_file, max_steps=4))
    # Part 1: a sample of the base model, the fine-tune (started over), a sample of its best.pt, the losses
    assert first["sample-before"].startswith("ROMEO:") and f"{gpt2_vocab_hf_dir} on cpu" in first["sample-before"]
    assert "starting at step 0 of 2" in first["train-fine-tune"] and "step 2/2 | val loss" in first["train-fine-tune"]
    assert "99.0" not in (finetune / "log.jsonl").read_text()
    assert (finetune / "best.pt").is_file() and (finetune / "ckpt_000002.pt").is_file()
    assert first["sample-after"].startswith("ROMEO:") and f"{finetune}/best.pt on cpu" in first["sample-after"]
    assert re.fullmatch(loss_line, first["losses"])
    # Part 2: the plan, first, then training
    assert "planning a run at step 0 of 4" in first["plan-run"] and '"tokens_per_step": 256' in first["plan-run"]
    assert "starting at step 0 of 4" in first["train-run"] and "step 3/4 | loss" in first["train-run"]
    assert (tmp_path / "drive" / "data" / "tiny" / "manifest.json").is_file() and (run / "ckpt_000004.pt").is_file()

    # Run all again: the finished fine-tune is skipped (its files are still on this machine, as on a warm runtime),
    # and the long run goes on as in a new session after a disconnect, here with a longer schedule
    second = run_notebook(tiny_settings(tmp_path, gpt2_vocab_hf_dir, text_file, max_steps=6))
    assert "tinyshakespeare is ready" in second["prepare-shakespeare"]
    skipped = f"{finetune} finished its 2 steps: skipped (delete that folder to fine-tune again)\n"
    assert second["train-fine-tune"] == skipped
    assert sample_text(second["sample-after"]) == sample_text(first["sample-after"])  # the same best.pt
    assert second["losses"] == first["losses"]
    assert "data/tiny is ready" in second["prepare"]
    assert "holds a run: no plan needed to continue it" in second["plan-run"]
    assert "resuming at step 4 of 6" in second["train-run"] and "step 5/6 | loss" in second["train-run"]
    events = [(e["step"], e["split"]) for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert len(set(events)) == len(events) and max(events)[0] == 6  # it went on where it stopped, nothing twice

    assert "min train loss" in second["plot"] and "min val loss" in second["plot"]
    for name in ("loss", "lr", "norm", "speed"):
        assert (run / "images" / f"colab-test_{name}.png").stat().st_size > 10_000
    assert second["sample-export"].count("The") >= 3  # the three samples
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "config.json").is_file()


def test_on_a_cpu_runtime_the_notebook_stops_at_setup_with_one_line(tmp_path):
    notebook = with_settings(tiny_settings(tmp_path, "gpt2", "text.txt", max_steps=4, allow_cpu=False))
    with pytest.raises(CellExecutionError):
        execute(notebook)
    codes = [cell for cell in notebook.cells if cell.cell_type == "code"]
    (setup,) = [cell for cell in codes if cell.id == "setup"]
    (error,) = [output for output in setup.outputs if output.output_type == "error"]
    assert error.ename == "SystemExit" and "\n" not in error.evalue
    assert error.evalue.startswith("no GPU: on Colab choose Runtime > Change runtime type > T4 GPU, then Run all again")
    assert all(not cell.outputs for cell in codes[codes.index(setup) + 1 :])  # Run all stopped there
    assert list(tmp_path.iterdir()) == []  # no data, no run, no Drive folder

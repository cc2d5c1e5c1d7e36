"""notebooks/colab.ipynb runs end to end on a CPU (nbclient), with a tiny configuration and generated text,
so that it cannot silently rot: data, training, a disconnect and a resume, plots, samples, export.

  python -m pytest tests/test_notebook.py -q
"""

import json

import nbformat
from nbclient import NotebookClient
from test_data import make_text, write_files
from test_train import TINY_RUN

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"


def tiny_settings(drive_dir, text_file, max_steps: int) -> str:
    """The notebook's settings cell, for a CPU in a few seconds instead of a T4 in hours."""
    flags = [*TINY_RUN, "--max-steps", str(max_steps), "--eval-interval", "2", "--ckpt-interval", "2",
             "--sample-interval", "4", "--no-compile"]  # fmt: skip
    return "\n".join([
        f"DRIVE_DIR = {str(drive_dir)!r}",
        "REPO_URL = ''",
        f"PREPARE_FLAGS = '--input {text_file} --val-fraction 0.1 --num-proc 1'",
        "DATA_NAME = 'tiny'",
        "RUN_NAME = 'colab-test'",
        f"TRAIN_FLAGS = {' '.join(flags)!r}",
        "PROMPT = 'The'",
    ])  # fmt: skip


def run_notebook(settings: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (settings_cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    settings_cell.source = settings
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook


def cell_text(notebook: nbformat.NotebookNode) -> str:
    # a cell's stream may come in several chunks, cut anywhere: joined as they came
    return "\n".join("".join(output.get("text", "") for output in cell.get("outputs", []))
                     for cell in notebook.cells if cell.cell_type == "code")  # fmt: skip


def test_the_colab_notebook_trains_resumes_plots_and_samples_on_a_cpu(tmp_path):
    text_file = write_files(tmp_path / "text", {"tiny.txt": make_text(6000, seed=1)})[0]
    drive = tmp_path / "drive"
    run = drive / "runs" / "colab-test"

    first = cell_text(run_notebook(tiny_settings(drive, text_file, max_steps=4)))
    assert "planning a run at step 0 of 4" in first and '"tokens_per_step": 256' in first  # the plan, first
    assert "starting at step 0 of 4" in first and "step 3/4 | loss" in first
    assert (drive / "data" / "tiny" / "manifest.json").is_file() and (run / "ckpt_000004.pt").is_file()

    # a new session after a disconnect: Run all again, here with a longer schedule
    second = cell_text(run_notebook(tiny_settings(drive, text_file, max_steps=6)))
    assert "data/tiny is ready" in second and "planning a run" not in second  # no plan again: minutes of a session
    assert "holds a run: no plan needed to continue it" in second
    assert "resuming at step 4 of 6" in second and "step 5/6 | loss" in second
    events = [(e["step"], e["split"]) for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert len(set(events)) == len(events) and max(events)[0] == 6  # it went on where it stopped, nothing twice

    assert "min train loss" in second and "min val loss" in second
    for name in ("loss", "lr", "norm", "speed"):
        assert (run / "images" / f"colab-test_{name}.png").stat().st_size > 10_000
    assert second.count("The") >= 3  # the three samples
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "config.json").is_file()

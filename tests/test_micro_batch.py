"""The micro batch and what may not depend on it: --batch-size auto (kept as "auto" in the checkpoint, so that a
resume on another card measures again), the probe's search (eagerly, then one size more compiled, under a cap on the
allocator, where any out-of-memory error means "does not fit"), and validation, whose windows depend on --eval-steps
and the data alone. The probe itself runs on CUDA: tests/test_gpu.py.

python -m pytest tests/test_micro_batch.py -q
"""

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import TINY_RUN, logged_events, logged_losses, no_scaler, run_train, small_shards

import train_gpt2
from gpt2lite import planning
from gpt2lite.cli import InputError
from gpt2lite.devices import is_out_of_memory
from gpt2lite.run import Processes
from train_gpt2 import GPT, GPTConfig

AUTO_RUN = TINY_RUN[: TINY_RUN.index("--batch-size")] + TINY_RUN[TINY_RUN.index("--batch-size") + 2 :]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("micro-batch-data"))


def val_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in logged_events(run_dir) if e["split"] == "val"}


# --- --batch-size auto across a resume ----------------------------------------------------------------------------


def test_auto_is_the_default_off_cuda_the_seeds_4_and_the_checkpoint_keeps_auto(tmp_path, data):
    """The checkpoint holds "auto", not the number it came to: a resume measures again (on CUDA), so a run started
    on an H100 and resumed on a T4, or under torchrun with more processes, fits what it runs on."""
    args, _ = train_gpt2.parse_args(AUTO_RUN)
    assert args.batch_size == "auto"
    run = tmp_path / "run"
    result = run_train(*AUTO_RUN, "--data-dir", str(data), "--run-dir", str(run), "--max-steps", "4",
                       "--ckpt-interval", "4", "--eval-interval", "4", "--sample-interval", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "batch 256 tokens = 4 x 32 x 1 process(es) x 2 accumulation steps" in result.stdout
    assert "--batch-size auto" not in result.stdout, "nothing measured, nothing to say"
    assert torch.load(run / "ckpt_000004.pt", weights_only=True)["args"]["batch_size"] == "auto"
    resumed = run_train("--resume", "--run-dir", str(run), "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert "batch 256 tokens = 4 x 32 x 1 process(es) x 2 accumulation steps" in resumed.stdout
    assert torch.load(run / "ckpt_000006.pt", weights_only=True)["args"]["batch_size"] == "auto"


def test_validation_reads_the_same_windows_whatever_the_micro_batch(tmp_path, data):
    """--eval-steps x 4 windows, at any micro batch: the same initial weights score the same loss at step 0 (the
    windows are grouped in batches of 4, or of the micro batch where smaller, and IGNORE pads the last)."""
    out, losses = {}, {}
    for batch in (1, 2, 4, 8):
        run = tmp_path / f"batch-{batch}"
        result = run_train(*AUTO_RUN, "--batch-size", str(batch), "--data-dir", str(data), "--run-dir", str(run),
                           "--max-steps", "4", "--eval-interval", "4", "--eval-steps", "3",
                           "--sample-interval", "0", "--ckpt-interval", "0")  # fmt: skip
        assert result.returncode == 0, result.stderr
        out[batch] = re.search(r"validation: .*", result.stdout)[0]
        losses[batch] = val_losses(run)[0]
    assert len(set(out.values())) == 1 and out[4].startswith("validation: 12 of the split's "), out
    for batch in (1, 2, 8):
        assert losses[batch] == pytest.approx(losses[4], rel=1e-6), losses  # summed in another order


def test_a_resume_at_another_micro_batch_repeats_the_steps_evaluation_and_trains_on(tmp_path, data):
    """What a resume on another card does, with the micro batch given instead of measured: 4 sequences a micro batch,
    then 8. The resumed run repeats the evaluation of the step it resumes at exactly (the same windows, in the same
    batches) and logs the losses of a run never stopped, to float tolerance: the same gradient, summed over other
    micro batches."""
    settings = [*AUTO_RUN, "--data-dir", str(data), "--eval-interval", "4", "--ckpt-interval", "4",
                "--sample-interval", "0"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(*settings, "--run-dir", str(straight), "--max-steps", "8").returncode == 0
    first = run_train(*settings, "--run-dir", str(stopped), "--max-steps", "4")
    assert first.returncode == 0, first.stderr
    at_the_stop = val_losses(stopped)[4]
    resumed = run_train("--resume", "--run-dir", str(stopped), "--max-steps", "8", "--batch-size", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert "batch 256 tokens = 8 x 32 x 1 process(es) x 1 accumulation steps" in resumed.stdout
    assert val_losses(stopped)[4] == at_the_stop, "the step's evaluation, repeated exactly"
    one, two = logged_losses(straight), logged_losses(stopped)
    assert [e[:2] for e in one] == [e[:2] for e in two]
    for (_, _, a), (_, _, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)


# --- what the probe found, put to use ---------------------------------------------------------------------------


def fake_card_run(data: Path, args, model: GPT) -> SimpleNamespace:
    """A run as check_inputs and prepare_model leave it before fit_micro_batch, on a CUDA card (faked)."""
    return SimpleNamespace(args=args, procs=Processes(0, 0, 1), world_size=1, raw_model=model, device="cpu",
                           autocast=contextlib.nullcontext, scaler=no_scaler(), model=None, compiled=False,
                           wants_compile=True, optimizer=model.configure_optimizers(0.1, 1e-3), say=print,
                           train_loader=train_gpt2.DataLoader(str(data), "train", 1, 32),
                           val_loader=train_gpt2.DataLoader(str(data), "val", 4, 32))  # fmt: skip


def test_fit_micro_batch_rebuilds_the_loaders_keeps_the_tokens_per_step_and_leaves_auto(data, monkeypatch, capsys):
    """What --batch-size auto does with what the GPU probe found: training takes the micro batch found, validation
    its batches of 4 unless fewer fit, and args keeps "auto" for the checkpoint."""
    found = {"largest": 8}

    def probe(model, autocast, scaler, device, seq_len, sequences_per_step, reserve_bytes, compiled, say):
        found.update(sequences=sequences_per_step, reserve=reserve_bytes, compiled=compiled)
        return found["largest"]

    monkeypatch.setattr(planning, "largest_micro_batch", probe)
    monkeypatch.setattr(planning, "memory_budget", lambda device: 14 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    args, _ = train_gpt2.parse_args([*AUTO_RUN, "--data-dir", str(data), "--total-batch-size", "512"])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    for largest, val_rows in ((8, 4), (2, 2)):
        found["largest"] = largest
        run = fake_card_run(data, args, model)
        planning.fit_micro_batch(run)
        assert found["sequences"] == 16 and found["reserve"] == 8 * sum(p.numel() for p in model.parameters())
        assert found["compiled"], "the run compiles, so the probe tries what it will run"
        assert args.batch_size == "auto" and run.grad_accum_steps == 16 // largest
        assert run.train_loader.B == largest and run.train_loader.seed == args.seed and run.val_loader.B == val_rows
    assert capsys.readouterr().out.splitlines()[0] == (
        "--batch-size auto: 8 x 32, the largest power of two that divides a step's 16 sequences and fits 14.00 GiB "
        "of the Tesla T4"
    )
    found["largest"] = 0
    with pytest.raises(InputError, match=r"--batch-size auto: not even one sequence of --seq-len 32 fits 14.00 GiB"):
        planning.fit_micro_batch(fake_card_run(data, args, model))


# --- the probe's search -----------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "compiled, sequences, eager_fits, compiled_fits, expected, compiled_tries",
    [
        (True, 64, 8, 16, 16, [16]),  # the compiled step keeps fewer activations: twice fits
        (True, 64, 8, 8, 8, [16]),  # it does not
        (False, 64, 8, 16, 8, []),  # an uncompiled run is measured as it runs, eagerly
        (True, 8, 8, 16, 8, []),  # 16 is more than a step's 8 sequences
        (True, 24, 8, 16, 8, []),  # 16 does not divide 24
        (True, 64, 0, 16, 0, []),  # nothing fits, not even compiled: no compile for nothing
    ],
)  # fmt: skip
def test_the_probe_tries_twice_the_eager_answer_compiled_where_the_run_compiles(
    monkeypatch, compiled, sequences, eager_fits, compiled_fits, expected, compiled_tries
):  # fmt: skip
    """largest_micro_batch's search on a faked card: eager steps up to the first that does not fit, then one
    compiled try; all of it under the allocator's cap."""
    caps, tries, said = [], [], []
    monkeypatch.setattr(planning, "memory_budget", lambda device: 1000)
    monkeypatch.setattr(planning, "allocator_capped_at", lambda budget, device: caps.append(budget) or
                        contextlib.nullcontext())  # fmt: skip
    monkeypatch.setattr(planning, "step_fits", lambda model, *shapes: shapes[-2] <= eager_fits)
    monkeypatch.setattr(planning, "compiled_step_fits", lambda model, *shapes: tries.append(shapes[-2]) or
                        shapes[-2] <= compiled_fits)  # fmt: skip
    found = planning.largest_micro_batch(None, None, None, "cpu", 1024, sequences, 0, compiled, said.append)
    assert found == expected and tries == compiled_tries and caps == [1000]
    assert len(said) == len(tries), "a compiled try says so first: it takes a compile"


def test_any_out_of_memory_error_is_one_and_nothing_else_is():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously..."))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    try:  # the compiler wraps what happened inside it in an error of its own
        try:
            raise oom
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError("backend='inductor' raised: ...") from e
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    try:  # raised "from None": the out-of-memory it happened beside is not its cause
        try:
            raise oom
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("CUDA error: an illegal memory access was encountered") from None
    except RuntimeError as unrelated:
        assert not is_out_of_memory(unrelated)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not is_out_of_memory(RuntimeError("out of resource: shared memory, Required: 98304, Hardware limit: 65536"))


def test_a_probe_step_that_runs_out_of_memory_does_not_fit_and_any_other_error_propagates(monkeypatch):
    """step_fits on a faked card: a plain "CUDA error: out of memory" (memory outside the allocator) counts as not
    fitting, as the allocator's own error does; a bug is not hidden as a micro batch that does not fit."""
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 10)

    class Failing(torch.nn.Module):
        config = SimpleNamespace(vocab_size=64)

        def __init__(self, error: Exception | None):
            super().__init__()
            self.error, self.weight = error, torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            if self.error:
                raise self.error
            return None, self.weight * x.float().mean()

    errors = [None, RuntimeError("CUDA error: out of memory"), torch.cuda.OutOfMemoryError("...")]
    fits = [planning.step_fits(Failing(e), contextlib.nullcontext, no_scaler(), "cpu", 8, 2, 100) for e in errors]
    assert fits == [True, False, False]
    model = Failing(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        planning.step_fits(model, contextlib.nullcontext, no_scaler(), "cpu", 8, 2, 100)
    assert planning.step_fits(Failing(None), contextlib.nullcontext, no_scaler(), "cpu", 8, 2, 5) is False, (
        "reserved above the budget: does not fit"
    )

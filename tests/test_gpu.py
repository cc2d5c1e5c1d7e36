"""The CUDA path, proven on a GPU: GPT-2 124M at the Colab T4's and the RTX 4080's settings within a 16 GB card's
memory, with AdamW and with Muon (fp16 with a GradScaler on the T4's, bf16 with WSD on the 4080's), --batch-size auto
driven into a real out-of-memory and resumed under a smaller cap, --plan's largest micro batch within a T4's memory,
a run killed and resumed on the GPU, checkpoints mapped to the GPU, sampling and evaluation there, and two-process
NCCL DDP with torch.compile (AdamW and sharded Muon) where two GPUs exist.

Every test is marked `gpu` and skips where CUDA is absent, so the CPU suite stays green. With a GPU, the whole proof
(these tests, then the speed and memory of each setting):

  python -m pytest tests/test_gpu.py -v && python bench.py gpu
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_data import make_text, write_files
from test_train import TINY_RUN, interrupt_when, logged_events, logged_losses, run_train

import prepare_data
import train_gpt2
from conftest import REPO, random_hf_model, tiny_config
from gpt2lite import checkpoints, planning
from train_gpt2 import GPT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, and this machine has none"),
]

GIB = 2**30
# What PyTorch's allocator may use on each card: the whole card less the ~0.5 GiB the CUDA context takes outside
# it (a T4 reports 14.7 GiB in all, an RTX 4080 16.0 GiB, of which a desktop also keeps some for the display).
CARDS = {"T4": ("fp16", 14.0, (7, 5)), "RTX 4080": ("bf16", 15.0, (8, 9))}
STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss (\S+) \| lr \S+ \| norm (\S+) \|.*")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """Shards of generated text (a 24-word vocabulary: a model learns it within a few steps), about 300K tokens."""
    folder = tmp_path_factory.mktemp("gpu-data")
    text = write_files(folder / "text", {"text.txt": make_text(300_000, seed=0)})
    prepare_data.main(["--input", *text, "--val-fraction", "0.05", "--out-dir", str(folder / "data"),
                       "--num-proc", "4"])  # fmt: skip
    return folder / "data"


@pytest.fixture(scope="module")
def card_cache(tmp_path_factory) -> Callable[[str], Path]:
    """An Inductor cache for each card's settings, shared by its AdamW and Muon tests (the same graphs: the second
    compile is served from disk), and by no other: torch.compile's cache key leaves out which attention kernels are
    allowed (pytorch/pytorch#185449), so a graph compiled under another choice could stand in for the kernel a test
    asks for."""
    caches = {}
    return lambda card: caches.setdefault(card, tmp_path_factory.mktemp(f"compile-cache-{card.replace(' ', '-')}"))


def train_within(memory_gib: float | None, argv: list[str], monkeypatch, cache: Path, capsys) -> str:
    """train_gpt2.main(argv) with PyTorch's allocator capped at memory_gib (past it, allocating raises
    torch.cuda.OutOfMemoryError; None: no cap), compiling with the Inductor cache in `cache`; its output. What main()
    changes for the process (TF32, the cap, what Dynamo compiled) is put back after."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if memory_gib is None else min(1.0, memory_gib * GIB / total))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # main() turns them on
    try:
        train_gpt2.main(argv)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch._dynamo.reset()
    return capsys.readouterr().out


# what --batch-size auto and --plan know of a cap set with set_per_process_memory_fraction: its getter came in 2.6
NEEDS_THE_CAP = pytest.mark.skipif(not hasattr(torch.cuda, "get_per_process_memory_fraction"),
                                   reason="the memory cap's getter needs torch 2.6")  # fmt: skip


@pytest.mark.parametrize("card", CARDS)
def test_the_124m_model_learns_at_a_cards_settings_within_its_memory(card, text_data, tmp_path, monkeypatch,
                                                                      capsys, card_cache):  # fmt: skip
    """The seed's step 11 on that card: micro batch 4 x 1,024, its precision, torch.compile, fused AdamW, and the
    attention kernel the card runs (a T4 has no flash attention: it needs compute capability 8.0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    precision, memory_gib, capability = CARDS[card]
    if torch.cuda.get_device_capability() < capability:
        pytest.skip(f"the {card}'s settings need compute capability {capability[0]}.{capability[1]} or above")
    kernel = SDPBackend.EFFICIENT_ATTENTION if card == "T4" else SDPBackend.FLASH_ATTENTION
    run = tmp_path / "run"
    argv = ["--data-dir", str(text_data), "--run-dir", str(run), "--batch-size", "4", "--seq-len", "1024",
            "--total-batch-size", "8192", "--max-steps", "12", "--warmup-steps", "2", "--max-lr", "1e-3",
            "--eval-interval", "12", "--eval-steps", "2", "--sample-interval", "12", "--ckpt-interval", "12",
            "--dtype", precision, "--compile"]  # fmt: skip
    with sdpa_kernel(kernel):
        out = train_within(memory_gib, argv, monkeypatch, card_cache(card), capsys)
    assert f"precision {precision}" in out and "compile True" in out and "fused AdamW True" in out, out
    lines = [line for line in out.splitlines() if STEP_LINE.fullmatch(line)]
    assert [int(STEP_LINE.fullmatch(line)[1]) for line in lines] == list(range(12))
    # GradScaler may skip an early fp16 step while it finds its scale (the norm of such a step is inf)
    kept = [(float(m[2]), float(m[3])) for m in map(STEP_LINE.fullmatch, lines) if "skipped" not in m[0]]
    assert len(kept) >= 10, out
    assert kept[-1][0] < kept[0][0] - 2.0, "twelve steps on a 24-word vocabulary bring the loss well down"
    # the norm is measured on unscaled gradients (about 33 at the first step, on a CPU in fp32): GradScaler's
    # scale, 65,536 at the start, would show here
    assert all(norm < 1000 for _, norm in kept), [norm for _, norm in kept]
    assert (run / "ckpt_000012.pt").is_file() and "step 12 sample:" in out


@pytest.mark.parametrize("card", CARDS)
def test_muon_learns_at_a_cards_settings_within_its_memory(card, text_data, tmp_path, monkeypatch, capsys,
                                                            card_cache):  # fmt: skip
    """--optimizer muon at the card's settings under its cap, compiled, micro batch 4 x 1,024: on the T4's, fp16 with
    a GradScaler (whose one inf check covers Muon's matrices and AdamW's tensors) and Newton-Schulz's bf16 matmuls,
    emulated below compute capability 8.0; on the 4080's, bf16 with the WSD schedule. Both states in the
    checkpoint."""
    precision, memory_gib, capability = CARDS[card]
    if torch.cuda.get_device_capability() < capability:
        pytest.skip(f"the {card}'s settings need compute capability {capability[0]}.{capability[1]} or above")
    run = tmp_path / "run"
    argv = ["--data-dir", str(text_data), "--run-dir", str(run), "--batch-size", "4", "--seq-len", "1024",
            "--total-batch-size", "8192", "--max-steps", "12", "--warmup-steps", "2", "--max-lr", "1e-3",
            "--optimizer", "muon", "--eval-interval", "12", "--eval-steps", "2", "--sample-interval", "0",
            "--ckpt-interval", "12", "--dtype", precision, "--compile",
            *(["--schedule", "wsd"] if card == "RTX 4080" else [])]  # fmt: skip
    out = train_within(memory_gib, argv, monkeypatch, card_cache(card), capsys)
    assert "Muon: the blocks' 48 matrices (84,934,656 parameters)" in out and "compile True" in out, out
    assert f"precision {precision}" in out, out
    steps = [m for m in map(STEP_LINE.fullmatch, out.splitlines()) if m]
    kept = [(float(m[2]), float(m[3])) for m in steps if "skipped" not in m[0]]  # fp16 may skip while finding its scale
    assert len(steps) == 12 and len(kept) >= 10 and kept[-1][0] < kept[0][0] - 2.0, out
    assert all(norm < 1000 for _, norm in kept), "the norm of unscaled gradients"
    muon, adamw = torch.load(run / "ckpt_000012.pt", weights_only=True)["optimizer"]["optimizers"]
    assert len(muon["state"]) == 48 and len(adamw["state"]) == 100


def plan_of(memory_gib: float, argv: list[str], monkeypatch, tmp_path: Path, capsys) -> tuple[dict, str]:
    out = train_within(memory_gib, [*argv, "--plan"], monkeypatch, tmp_path / "compile-cache", capsys)
    return json.loads(out.strip().splitlines()[-1]), out


@NEEDS_THE_CAP
def test_the_auto_probe_meets_a_real_out_of_memory_and_the_run_goes_on(text_data, tmp_path, monkeypatch, capsys):
    """No cap from the test: the probe climbs until a micro batch runs out of memory, under the cap it sets itself at
    its budget (90% of the card, so that memory outside PyTorch's allocator stays free), and the run then trains at
    the micro batch found. Afterwards the allocator has its own cap back."""
    seen = []  # what each error the probe met was taken for (not the errors: they would hold the batch's memory)
    real = planning.is_out_of_memory
    monkeypatch.setattr(planning, "is_out_of_memory", lambda error: seen.append(real(error)) or seen[-1])
    precision = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    sequences = 512  # 524,288 tokens a step: more sequences than fit 90% of an 80 GB card, or of a 141 GB one
    argv = ["--data-dir", str(text_data), "--run-dir", str(tmp_path / "run"), "--seq-len", "1024",
            "--total-batch-size", str(sequences * 1024), "--max-steps", "1", "--warmup-steps", "0", "--eval-steps",
            "1", "--sample-interval", "0", "--ckpt-interval", "0", "--dtype", precision, "--no-compile"]  # fmt: skip
    caps = []  # the allocator's cap as the run leaves it, before train_within lifts it
    monkeypatch.setattr(train_gpt2, "describe_run", lambda run, describe=train_gpt2.describe_run: caps.append(
        torch.cuda.get_per_process_memory_fraction()) or describe(run))  # fmt: skip
    out = train_within(None, argv, monkeypatch, tmp_path / "compile-cache", capsys)
    chosen = int(re.search(r"--batch-size auto: (\d+) x 1024, the largest power of two", out)[1])
    assert 4 <= chosen < sequences and any(seen), (chosen, seen)
    assert caps == [1.0], "the probe's own cap is lifted before the run's first step"
    assert re.search(r"step 0/1 \| loss \S+", out) and "step 1/1 | val loss" in out, out


@NEEDS_THE_CAP
def test_an_auto_run_resumed_under_a_smaller_cap_measures_again(text_data, tmp_path, monkeypatch, capsys):
    """The default path on a GPU: --batch-size auto with torch.compile. A run started where more memory is free and
    resumed where less is (a Colab session that comes back on a smaller card) measures again, takes a smaller micro
    batch that fits, repeats the evaluation of the step it resumes at and trains on. (That validation reads the same
    windows at any micro batch is test_micro_batch.py's: this generated text scores alike in any window.) A 4-layer
    model: compiling 124M twice over would take minutes, and the logic is the same."""
    precision = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    run = tmp_path / "run"
    argv = ["--data-dir", str(text_data), "--run-dir", str(run), "--n-layer", "4", "--seq-len", "1024",
            "--total-batch-size", "131072", "--max-steps", "4", "--warmup-steps", "1", "--eval-interval", "2",
            "--eval-steps", "4", "--sample-interval", "0", "--ckpt-interval", "2", "--dtype", precision]  # fmt: skip
    monkeypatch.setattr(train_gpt2, "train_step", stop_after(train_gpt2.train_step, 2))
    with pytest.raises(KeyboardInterrupt):
        train_within(12.0, argv, monkeypatch, tmp_path / "compile-cache", capsys)
    first = capsys.readouterr().out
    monkeypatch.undo()
    large = int(re.search(r"--batch-size auto: (\d+) x 1024, the largest power of two", first)[1])
    assert "compile True" in first and (run / "ckpt_000002.pt").is_file(), first
    tried = re.search(r"--batch-size auto: (\d+) x 1024 fits eagerly; trying (\d+) x 1024 compiled", first)
    if tried:  # what the compiled try found: twice the eager answer, or the eager answer
        assert int(tried[2]) == 2 * int(tried[1]) and large in (int(tried[1]), int(tried[2])), first
    else:  # it is made unless twice the eager answer does not divide a step's 128 sequences
        assert 2 * large > 128, first
    val_at_2 = {e["step"]: e["loss"] for e in logged_events(run) if e["split"] == "val"}[2]

    out = train_within(4.0, ["--resume", "--run-dir", str(run)], monkeypatch, tmp_path / "compile-cache", capsys)
    small = int(re.search(r"--batch-size auto: (\d+) x 1024, the largest power of two", out)[1])
    assert 1 <= small < large and "resuming at step 2 of 4" in out, out
    assert f"batch 131,072 tokens = {small} x 1024 x 1 process(es) x {128 // small} accumulation steps" in out
    again = {e["step"]: e["loss"] for e in logged_events(run) if e["split"] == "val"}
    assert again[2] == pytest.approx(val_at_2, rel=1e-4)
    assert sorted(again) == [0, 2, 4] and torch.load(run / "ckpt_000004.pt", weights_only=True)["args"][
        "batch_size"] == "auto"  # fmt: skip


def stop_after(train_step, steps: int):
    """train_step, with a Ctrl-C once `steps` steps are done (the run has checkpointed at step `steps`)."""
    done = []

    def step(run, number):
        if len(done) == steps:
            raise KeyboardInterrupt
        done.append(number)
        return train_step(run, number)

    return step


@NEEDS_THE_CAP
def test_the_plan_finds_the_largest_micro_batch_that_fits_a_t4(text_data, tmp_path, monkeypatch, capsys):
    """--plan at the T4's settings within a T4's memory: the seed's micro batch of 4 fits, the largest one the plan
    reports trains real steps there, and twice that does not fit with the 10% headroom (or at all)."""
    argv = ["--data-dir", str(text_data), "--run-dir", str(tmp_path / "run"), "--seq-len", "1024",
            "--total-batch-size", "65536", "--max-steps", "10", "--warmup-steps", "2", "--eval-steps", "1",
            "--sample-interval", "0", "--dtype", "fp16", "--no-compile"]  # fmt: skip
    plan, out = plan_of(14.0, [*argv, "--batch-size", "4"], monkeypatch, tmp_path, capsys)
    largest = plan["largest_micro_batch"]
    assert largest >= 4 and f"--batch-size {largest} keeps 65,536 tokens a step" in out, out
    assert plan["peak_memory_bytes"] < 14 * GIB and not (tmp_path / "run").exists()
    train_within(14.0, [*argv, "--batch-size", str(largest), "--max-steps", "3"], monkeypatch, tmp_path / "cache",
                 capsys)  # fmt: skip
    try:
        twice, _ = plan_of(14.0, [*argv, "--batch-size", str(2 * largest)], monkeypatch, tmp_path, capsys)
        assert twice["peak_memory_bytes"] > 0.9 * 14 * GIB, twice
    except torch.cuda.OutOfMemoryError:
        pass


def test_rng_states_mapped_to_the_gpu_restore_both_generators(tmp_path):
    states = checkpoints.rng_states("cuda")
    expected = torch.rand(3), torch.rand(3, device="cuda")
    torch.save(states, tmp_path / "states.pt")
    checkpoints.set_rng_states(torch.load(tmp_path / "states.pt", map_location="cuda", weights_only=True), "cuda")
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, device="cuda"), expected[1])


def test_a_run_killed_after_a_checkpoint_resumes_on_the_gpu(tmp_path, text_data):
    """Dropout draws from the CUDA generator, so a wrong RNG state or loader position after the resume changes
    the losses by about 1e-2. fp32 (TF32 matmuls) keeps the rest tight: the kernels that add with atomics (the
    embedding's and attention's backward) are not deterministic, and move a loss by far less than 1e-4 in 24 steps."""
    settings = [*TINY_RUN, "--device", "cuda", "--dtype", "fp32", "--no-compile", "--data-dir", str(text_data),
                "--max-steps", "24", "--eval-interval", "8", "--ckpt-interval", "6", "--sample-interval", "0",
                "--dropout", "0.1"]  # fmt: skip
    assert run_train(*settings, "--run-dir", str(tmp_path / "straight")).returncode == 0

    killed = tmp_path / "killed"
    interrupt_when((killed / "ckpt_000012.pt").exists, [*settings, "--run-dir", str(killed)])
    assert not (killed / "ckpt_000024.pt").exists(), "the run finished before it could be killed"

    resumed = run_train("--resume", "--run-dir", str(killed), "--device", "cuda")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    straight, again = logged_losses(tmp_path / "straight"), logged_losses(killed)
    assert [e[:2] for e in again] == [e[:2] for e in straight]
    for (_, _, a), (_, _, b) in zip(straight, again):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.fixture(scope="module")
def gpu_checkpoint(text_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gpu-run")
    result = run_train(*TINY_RUN, "--device", "cuda", "--data-dir", str(text_data), "--run-dir", str(run),
                       "--max-steps", "20", "--eval-interval", "20", "--ckpt-interval", "20", "--sample-interval", "0")
    assert result.returncode == 0, result.stderr
    return run / "ckpt_000020.pt"


def test_sample_py_on_the_gpu(gpu_checkpoint):
    result = subprocess.run([sys.executable, "sample.py", "--init-from", str(gpu_checkpoint), "--device", "cuda",
                             "--prompt", "The", "--num-samples", "2", "--max-new-tokens", "24", "--seed", "0"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("The") >= 2


def test_greedy_generation_with_the_kv_cache_equals_without_it_on_the_gpu():
    config = tiny_config(n_embd=64, n_head=4, block_size=128, vocab_size=256)
    model = GPT(config)
    model.load_hf_state_dict(random_hf_model(config, seed=1, init_std=0.2).state_dict())  # peaky, varied logits
    model.to("cuda").eval()
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0)).to("cuda")
    cached = model.generate(prompt, 64, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 64, temperature=0, use_cache=False))
    assert all(len(set(row[9:].tolist())) > 10 for row in cached), "a degenerate continuation would prove little"


def test_evaluate_py_on_the_gpu_scores_as_on_the_cpu(gpu_checkpoint, tmp_path):
    text = write_files(tmp_path, {"wiki.txt": make_text(3000, seed=3)})[0]
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": make_text(60, seed=i).strip()}) + "\n" for i in range(20)))
    scores = {}
    for device in ("cpu", "cuda"):
        for task, data in (("wikitext", text), ("lambada", str(lambada))):
            out = tmp_path / f"{task}-{device}.json"
            result = subprocess.run([sys.executable, "evaluate.py", "--init-from", str(gpu_checkpoint), "--task", task,
                                     "--data", data, "--device", device, "--dtype", "fp32", "--out", str(out)],
                                    cwd=REPO, capture_output=True, text=True)  # fmt: skip
            assert result.returncode == 0, result.stderr
            scores[task, device] = json.loads(out.read_text())["tasks"][task]
    for key in ("token_ppl", "word_ppl"):
        assert scores["wikitext", "cuda"][key] == pytest.approx(scores["wikitext", "cpu"][key], rel=1e-3)
    assert scores["lambada", "cuda"]["ppl"] == pytest.approx(scores["lambada", "cpu"]["ppl"], rel=1e-3)
    # greedy accuracy: one passage of the 20 may flip where two words are all but tied
    assert abs(scores["lambada", "cuda"]["acc"] - scores["lambada", "cpu"]["acc"]) <= 1 / 20


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two-process NCCL DDP needs two GPUs")
@pytest.mark.parametrize("optimizer", [[], ["--optimizer", "muon"]], ids=["adamw", "muon"])
def test_two_gpus_with_nccl_and_compile_equal_one_with_twice_the_accumulation(tmp_path, text_data, optimizer):
    """With Muon, each GPU orthogonalises half the matrices and broadcasts them over NCCL (ShardedMuon); the resume
    loads the momentum that state_dict gathered."""
    settings = [*TINY_RUN, "--device", "cuda", "--dtype", "fp32", "--compile", "--data-dir", str(text_data),
                "--max-steps", "6", "--eval-interval", "3", "--sample-interval", "0", "--ckpt-interval", "3",
                *optimizer]  # fmt: skip
    single = run_train(*settings, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *settings, "--run-dir", str(tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 process(es) x 1 accumulation steps" in ddp.stdout and "compile True" in ddp.stdout
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert [e[:2] for e in one] == [e[:2] for e in two]
    for (_, _, a), (_, _, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-3)  # the same tokens, summed in another order, in TF32
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train_gpt2.py", "--resume", "--run-dir", str(tmp_path / "two"), "--max-steps", "8"],
                             cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6 of 8" in resumed.stdout

"""
Every performance figure gpt2-lite states, measured here: side by side, in one run, never in a timed test; and the
learning curves that the token-efficient recipe is judged by.

  python bench.py                       # every speed benchmark (all but recipe)
  python bench.py generate              # generate() against transformers' generate(), GPT-2 124M
  python bench.py data                  # prepare_data against fineweb.py, in memory and streamed; the loader
  python bench.py train                 # a training step against transformers' GPT2LMHeadModel, fp32 and bf16
  python bench.py eval                  # evaluate.py's scoring, batched, against transformers one example at a time
  python bench.py gpu                   # 124M training steps on a CUDA GPU: eager/compiled, fused/math attention,
                                        # Muon, and the micro batch --batch-size auto picks
  python bench.py recipe                # AdamW against Muon, rates bracketed, several budgets (37 min on 2 cores)
  python bench.py generate --repeats 9 --device cuda

How: each contender runs once to warm up (this machine hands freed memory back to its host, so memory touched
for the first time is slow), then the contenders take turns, `--repeats` rounds, the order rotating each round.
A ratio is computed within each round and the median ratio is reported, so a slow moment of the machine hits
both sides of a ratio alike. The tables print as Markdown, ready for the README.
"""

import argparse
import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import train_gpt2
from gpt2lite import cpu_decode, planning, text_data
from gpt2lite.cli import ArgumentParser, InputError, first_line, run_cli
from gpt2lite.devices import is_out_of_memory, peak_flops, pick_device
from gpt2lite.evaluation import LAMBADA_SHA256, LAMBADA_URL, completion_losses, lambada_pairs, sliding_windows
from gpt2lite.gpt2_files import EOT_TOKEN, get_tokenizer
from gpt2lite.optimizers import MUON_LR, set_muon_momentum, unallocated_state_bytes
from gpt2lite.run import resolve_recipe
from gpt2lite.shards import shard_bytes
from train_gpt2 import GPT, DataLoader, GPTConfig


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of fn takes; the GPU is synchronised before reading the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(contenders: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each contender: one warm-up call each, then `repeats` rounds in rotating order."""
    for fn in contenders.values():
        fn()
    names = list(contenders)
    seconds = {name: [] for name in names}
    for r in range(repeats if names else 0):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(timed(contenders[name], device))
    return seconds


def median_ratio(slower: list[float], faster: list[float]) -> float:
    return statistics.median(s / f for s, f in zip(slower, faster))


def machine_line(device: str) -> str:
    import transformers

    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return f"{where}; {versions}, Python {platform.python_version()}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------
# generate(): new tokens per second against transformers, the same 124M weights


def bench_generate(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = args.device
    torch.manual_seed(0)
    # random weights (no download): speed does not depend on their values, and both models hold the same ones
    hf_model = GPT2LMHeadModel(GPT2Config()).to(device).eval()
    hf_model.generation_config.eos_token_id = None  # every run makes exactly max_new_tokens tokens
    hf_model.generation_config.pad_token_id = 50256
    model = GPT(GPTConfig())
    model.load_hf_state_dict(hf_model.state_dict())
    model.to(device).eval()
    prompt = get_tokenizer().encode_ordinary("Hello World ! I'm LLM")  # the seed's example prompt

    print(f"\n## generate(): GPT-2 124M, top-k 50 sampling, new tokens/s ({machine_line(device)})\n")
    print("| batch x new tokens | gpt2-lite | transformers | gpt2-lite, plain nn.Linear | gpt2-lite without cache "
          "| vs transformers | vs plain nn.Linear | vs no cache |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, new_tokens in ((5, 32), (1, 256)):
        idx = torch.tensor([prompt] * batch, device=device)  # (B, T)

        def ours(use_cache: bool = True):
            model.generate(idx, new_tokens, temperature=1.0, top_k=50, seed=0, use_cache=use_cache)

        def ours_plain_linear():  # the same, with every matmul through nn.Linear: what the W @ x^T route buys
            few_rows, cpu_decode.FEW_ROWS = cpu_decode.FEW_ROWS, 0
            try:
                ours()
            finally:
                cpu_decode.FEW_ROWS = few_rows

        def theirs():
            with torch.inference_mode():
                hf_model.generate(
                    idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=50, use_cache=True,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                )  # fmt: skip

        seconds = race({"ours": ours, "transformers": theirs, "plain": ours_plain_linear}, args.repeats, device)
        # without the cache every step reruns the whole prefix: far too slow to repeat, so it is timed once
        no_cache = timed(lambda: ours(use_cache=False), device)
        n = batch * new_tokens
        tokens_per_s = {name: n / statistics.median(times) for name, times in seconds.items()}
        print(
            f"| {batch} x {new_tokens} | {tokens_per_s['ours']:,.1f} | {tokens_per_s['transformers']:,.1f} "
            f"| {tokens_per_s['plain']:,.1f} | {n / no_cache:,.1f} "
            f"| **{median_ratio(seconds['transformers'], seconds['ours']):.2f}x** "
            f"| {median_ratio(seconds['plain'], seconds['ours']):.2f}x "
            f"| {no_cache / statistics.median(seconds['ours']):.1f}x |",
            flush=True,
        )
    print(f"\nmedian of {args.repeats} alternating rounds after a warm-up; 'without cache' is one run.")


# ----------------------------------------------------------------------------------------------------------------
# prepare_data: tokens per second against build-nanogpt's fineweb.py; the loader against a training step


def fineweb_tokenize(doc: str) -> np.ndarray:
    """build-nanogpt's fineweb.py tokenize(), as published: one document per task, <|endoftext|> first."""
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def fineweb_prepare(docs: Iterable, out_dir: str, shard_size: int, num_proc: int, tokenize: Callable) -> int:
    """fineweb.py's loop: Pool.imap over documents (chunksize 16), filling and writing fixed-size shards."""
    buffer, filled, index, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    with multiprocessing.Pool(num_proc) as pool:
        for tokens in pool.imap(tokenize, docs, chunksize=16):
            total += len(tokens)
            while len(tokens):
                n = min(len(tokens), shard_size - filled)
                buffer[filled : filled + n], filled, tokens = tokens[:n], filled + n, tokens[n:]
                if filled == shard_size:
                    Path(out_dir, f"fineweb_{index:06d}.bin").write_bytes(shard_bytes(buffer))
                    filled, index = 0, index + 1
        if filled:
            Path(out_dir, f"fineweb_{index:06d}.bin").write_bytes(shard_bytes(buffer[:filled]))
    return total


def fineweb_tokenize_row(row: dict) -> np.ndarray:
    """fineweb.py's tokenize() takes a row of the dataset, as here."""
    return fineweb_tokenize(row["text"])


def ours_prepare(docs: Callable[[int], Iterator[str]], out_dir: str, shard_size: int, num_proc: int) -> int:
    """prepare_data.py's tokenizing and writing (ordered, batched, atomic, resumable), on the same documents."""
    writer = text_data.ShardWriter(out_dir, "ours", "train", shard_size)
    with multiprocessing.Pool(num_proc) as pool, contextlib.redirect_stderr(io.StringIO()):  # no progress bar
        text_data.tokenize_part(text_data.Part("train", docs), writer, pool, num_proc)
    return writer.tokens


SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # the project's copy, where it sits beside
# the real text the benchmarks read: its name under SHARED_DATA or the cache, and where a clone downloads it
REAL_TEXT = {
    "tinyshakespeare/input.txt": (*text_data.TINY_SHAKESPEARE, None),
    "lambada/lambada_test.jsonl": (LAMBADA_URL, LAMBADA_SHA256, None),
    "wikitext-2-raw/wiki.valid.raw": (text_data.WIKITEXT2_RAW_ZIP, text_data.WIKITEXT2_VALID[1],
                                      text_data.WIKITEXT2_VALID[0]),  # a member of the zip
}  # fmt: skip
COMMON_WORDS = "the of and to in a is was for on as with by he at from his an were are which".split()


def real_text_dir() -> Path | None:
    """The folder of the benchmarks' real text: the project's copy where it sits beside the clone, else the download
    cache, filled once and checked against each file's sha256. None where neither can be had (no network): the
    benchmarks then run on generated text, and say so."""
    if all((SHARED_DATA / name).is_file() for name in REAL_TEXT):
        return SHARED_DATA
    try:
        for name, (url, sha256, member) in REAL_TEXT.items():
            text_data.cached_download(url, sha256, name, member)
    except InputError as e:
        print(f"no real text for the benchmarks ({e})", file=sys.stderr)
        return None
    return Path(text_data.cache_dir())


def generated_texts(count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` texts of low to high common English words: the stand-in for real text where none can be had."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(COMMON_WORDS, size=rng.integers(low, high))) for _ in range(count)]


def benchmark_documents() -> tuple[list[str], str]:
    """Real text in many documents of varied size: WikiText-2 articles, Shakespeare's speeches, LAMBADA passages."""
    shared = real_text_dir()
    if shared is None:
        return generated_texts(6000, 20, 2000, seed=0), "6,000 GENERATED documents, not real text (none to be had)"
    docs = list(text_data.file_documents([str(shared / "wikitext-2-raw" / "wiki.valid.raw")]))
    docs += [s + "\n" for s in (shared / "tinyshakespeare" / "input.txt").read_text().split("\n\n")]
    docs += [json.loads(line)["text"] for line in (shared / "lambada" / "lambada_test.jsonl").read_text().splitlines()]
    return docs, "WikiText-2 valid articles, Tiny Shakespeare speeches and LAMBADA passages"


def bench_data(args: argparse.Namespace):
    """Both pipelines on the same documents, from a list in memory and streamed by the datasets library from a
    local parquet file (the code path a hub dataset takes, without the network)."""
    docs, what = benchmark_documents()
    num_proc, shard_size = os.cpu_count(), 1_000_000
    print(f"\n## prepare_data: GPT-2 tokens per second, {num_proc} processes each ({cpu_name()})\n")
    print(f"{len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text: {what}.\n")
    print(f"| input | prepare_data.py (ordered batches of ~{text_data.BATCH_CHARS // 1024} KB of text per task) "
          "| build-nanogpt fineweb.py (Pool.imap, one document per task, chunksize 16) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        parquet = os.path.join(tmp, "parquet")
        os.makedirs(parquet)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), os.path.join(parquet, "docs.parquet"), row_group_size=1000)
        stream = text_data.hf_stream(parquet, None, "train", "text")
        inputs = {"a list in memory": (lambda skip: iter(docs[skip:]), docs, fineweb_tokenize),
                  "streamed from parquet by datasets": (stream.documents, parquet_rows(parquet), fineweb_tokenize_row)}
        for name, (ours_docs, their_docs, their_tokenize) in inputs.items():
            tokens = {}

            def ours():
                tokens["ours"] = ours_prepare(ours_docs, fresh_dir(tmp, "ours"), shard_size, num_proc)

            def theirs():
                out_dir = fresh_dir(tmp, "theirs")
                tokens["theirs"] = fineweb_prepare(their_docs, out_dir, shard_size, num_proc, their_tokenize)

            seconds = race({"ours": ours, "theirs": theirs}, args.repeats, "cpu")
            assert tokens["ours"] == tokens["theirs"], "both must produce the same tokens"
            rate = {who: tokens[who] / statistics.median(times) for who, times in seconds.items()}
            print(f"| {name} | {rate['ours']:,.0f} | {rate['theirs']:,.0f} "
                  f"| **{median_ratio(seconds['theirs'], seconds['ours']):.2f}x** |", flush=True)  # fmt: skip
    print(f"\ntokens/s; median of {args.repeats} alternating rounds, {tokens['ours']:,} tokens each.")
    bench_loader(args, docs)


def parquet_rows(folder: str):
    """fineweb.py's input, streamed: the dataset's rows, as it iterates them."""
    import datasets

    return datasets.load_dataset(folder, split="train", streaming=True)


def fresh_dir(tmp: str, name: str) -> str:
    path = os.path.join(tmp, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def bench_loader(args: argparse.Namespace, docs: list[str]):
    """The loader's time per batch, next to one training step of a small model: it should be a rounding error."""
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50304)
    B, T = 8, 256
    with tempfile.TemporaryDirectory() as tmp:
        writer = text_data.ShardWriter(tmp, "bench", "train", 200_000)
        with contextlib.redirect_stderr(io.StringIO()):
            text_data.tokenize_part(text_data.Part("train", lambda skip: iter(docs[skip:])), writer, None)
        loader = DataLoader(tmp, "train", B, T)
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def train_step():
            x, y = loader.next_batch()
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        n_batches = 200
        loader_s = race({"loader": lambda: [loader.next_batch() for _ in range(n_batches)]}, args.repeats, "cpu")
        step_s = race({"step": train_step}, args.repeats, "cpu")
    per_batch = statistics.median(loader_s["loader"]) / n_batches
    per_step = statistics.median(step_s["step"])
    print(f"\n## DataLoader: one batch of {B} x {T} tokens against one training step of a "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model ({cpu_name()})\n")
    print("| next_batch() | training step (forward, backward, AdamW) | share of the step |")
    print("| ---: | ---: | ---: |")
    print(f"| {per_batch * 1e6:,.0f} µs | {per_step * 1e3:,.1f} ms | {per_batch / per_step:.3%} |")


# ----------------------------------------------------------------------------------------------------------------
# training: tokens per second of a full step against transformers' GPT2LMHeadModel


def bench_train(args: argparse.Namespace):
    """Forward, backward and AdamW step on the same shapes and precision, ours against GPT2LMHeadModel.

    GPT.forward hands the logits back detached when it computes the loss: training differentiates the loss, never
    the logits, and an output that needs a gradient makes torch.compile's backward start from a materialised zero
    gradient of its full size (B x T x 50,304 floats: 412 MB at 8 x 256), about 10% of the small model's compiled
    step on a CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = args.device
    shapes = {"small (4 x 128 wide, batch 8 x 256)": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256,
                                                                vocab_size=50304), 8, 256),
              "124M (batch 1 x 1024)": (GPTConfig(vocab_size=50304), 1, 1024)}  # fmt: skip
    print(f"\n## training step: tokens/s, ours against transformers' GPT2LMHeadModel ({machine_line(device)})\n")
    print("| model | precision | mode | gpt2-lite | transformers | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for shape_name, (config, B, T) in shapes.items():
        for precision in args.train_precisions:
            for mode in args.train_modes:
                ours, theirs = training_steps(config, B, T, precision, mode == "compiled", device,
                                              GPT2Config, GPT2LMHeadModel)  # fmt: skip
                seconds = race({"ours": ours, "theirs": theirs}, args.repeats, device)
                rate = {name: B * T / statistics.median(times) for name, times in seconds.items()}
                print(f"| {shape_name} | {precision} | {mode} | {rate['ours']:,.0f} | {rate['theirs']:,.0f} "
                      f"| **{median_ratio(seconds['theirs'], seconds['ours']):.2f}x** |", flush=True)
    print(f"\nmedian of {args.repeats} alternating rounds after a warm-up step (and compilation) for each.")


def training_steps(config: GPTConfig, B: int, T: int, precision: str, compiled: bool, device: str,
                   GPT2Config, GPT2LMHeadModel) -> tuple[Callable[[], None], Callable[[], None]]:  # fmt: skip
    """One training step of each model, as zero-argument functions: same weights, data, optimizer and autocast."""
    torch.manual_seed(0)
    hf_config = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                           n_positions=config.block_size, vocab_size=config.vocab_size,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    hf_model = GPT2LMHeadModel(hf_config).to(device).train()
    model = GPT(config)
    model.load_hf_state_dict(hf_model.state_dict())
    model.to(device).train()
    tokens = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
    autocast = train_gpt2.autocast_for(device, precision)

    def step_fn(module: torch.nn.Module, loss_of: Callable) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        run = torch.compile(module) if compiled else module

        def step():
            with autocast():
                loss = loss_of(run)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    ours = step_fn(model, lambda m: m(tokens[:, :-1], tokens[:, 1:])[1])
    theirs = step_fn(hf_model, lambda m: m(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss)
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py: examples per second, batched, against transformers one example at a time


def eval_tasks() -> tuple[dict[str, list[tuple[list[int], list[int]]]], str]:
    """(context, completion) pairs per task, from real text where it can be had: HellaSwag-shaped examples
    (a context, then four endings; HellaSwag itself is not stored here) made of consecutive Tiny Shakespeare
    lines, LAMBADA's first 400 passages, and WikiText-2 validation text cut into windows of 256 with stride 128."""
    enc, shared = get_tokenizer(), real_text_dir()
    if shared is not None:
        lines = [line for line in (shared / "tinyshakespeare" / "input.txt").read_text().splitlines() if line.strip()]
        passages = [json.loads(line)["text"] for line in (shared / "lambada" / "lambada_test.jsonl").open()][:400]
        wiki_text = (shared / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:200_000]
        made_of = "real text: Tiny Shakespeare lines, LAMBADA's passages, WikiText-2 valid"
    else:  # offline, without the project's copy: generated text of the same shapes
        lines, passages = generated_texts(1500, 4, 16, seed=1), generated_texts(400, 60, 100, seed=2)
        wiki_text = " ".join(generated_texts(400, 50, 150, seed=3))[:200_000]
        made_of = "GENERATED text, not real text (none to be had), in the shapes of the real tasks"
    hellaswag = []
    for i in range(0, 5 * 300, 5):  # 300 examples of 4 endings
        context = enc.encode_ordinary(lines[i] + " " + lines[i + 1])
        hellaswag += [(context, enc.encode_ordinary(" " + lines[i + 2 + k % 3] + " " + str(k))) for k in range(4)]
    lambada = lambada_pairs([{"text": text} for text in passages], enc)
    wiki = [EOT_TOKEN] + enc.encode_ordinary(wiki_text)
    wikitext = sliding_windows(wiki, 256, 128)
    return {"hellaswag": hellaswag, "lambada": lambada, "wikitext": wikitext}, (
        f"{made_of}: HellaSwag-shaped, 300 examples x 4 endings; LAMBADA-shaped, 400 passages; "
        f"WikiText-shaped, {len(wiki) - 1:,} tokens in {len(wikitext)} windows")


def bench_eval(args: argparse.Namespace):
    """Every task's scoring with the small model: ours in token-budget batches, transformers one example (the four
    endings of a HellaSwag example, a LAMBADA passage, a WikiText window) per forward pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    device = args.device
    tasks, what = eval_tasks()
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50257)
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=256)).to(device).eval()
    model = GPT(config)
    model.load_hf_state_dict(hf_model.state_dict())
    model.to(device).eval()
    print(f"\n## evaluate.py: examples per second, small model (4 x 128 wide, block 256), ours batched against "
          f"transformers one example at a time ({machine_line(device)})\n")
    print(f"{what}.\n")
    print("| task | examples | gpt2-lite | transformers | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for task, pairs in tasks.items():
        per_example = 4 if task == "hellaswag" else 1  # pairs that make one example
        results = {}

        def ours():
            results["ours"] = [c.loss for c in completion_losses(model, pairs, device)]

        def theirs():
            examples = [pairs[i : i + per_example] for i in range(0, len(pairs), per_example)]
            results["theirs"] = [loss for example in examples for loss in hf_example_losses(hf_model, example, device)]

        seconds = race({"ours": ours, "theirs": theirs}, args.repeats, device)
        np.testing.assert_allclose(results["ours"], results["theirs"], rtol=1e-3)  # the same computation
        n = len(pairs) // per_example
        rate = {name: n / statistics.median(times) for name, times in seconds.items()}
        print(f"| {task} | {n:,} | {rate['ours']:,.1f} | {rate['theirs']:,.1f} "
              f"| **{median_ratio(seconds['theirs'], seconds['ours']):.2f}x** |", flush=True)
    print(f"\nexamples per second; median of {args.repeats} alternating rounds after a warm-up.")


@torch.no_grad()
def hf_example_losses(hf_model, pairs: list[tuple[list[int], list[int]]], device: str) -> list[float]:
    """The plain way (build-nanogpt's HellaSwag loop): one padded forward pass for one example's rows, the loss
    of each row's completion tokens summed."""
    longest = hf_model.config.n_positions + 1  # block_size inputs, and the last token as a target
    rows = [(context + completion)[-longest:] for context, completion in pairs]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)  # where a completion token is predicted
    for i, ((_, completion), row) in enumerate(zip(pairs, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - len(completion) : len(row)] = True
    ids, mask = ids.to(device), mask.to(device)
    logits = hf_model(ids[:, :-1]).logits  # (rows, width - 1, V)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (losses * mask[:, 1:]).sum(dim=1).tolist()


# ----------------------------------------------------------------------------------------------------------------
# recipe: AdamW against Muon beside AdamW, both with WSD, each at rates bracketed on both sides, fully decayed at
# several budgets, on a few small GPT-2s


class Scale(NamedTuple):
    """Where the recipe bench runs, and how big."""

    sizes: dict[str, tuple[int, int, int]]  # name: (layers, heads, width)
    vocab: int  # the model's vocabulary: GPT-2's commonest tokens (the rest share one id), or GPT-2's padded 50,304
    B: int  # micro batch, windows
    T: int  # context
    accumulation: int  # micro batches a step
    device: str
    precision: str
    tokens_per_parameter: float | None  # the longest budget's tokens per non-embedding parameter; None: one pass


# CPU: the vocabulary cut to the 1,023 commonest tokens (74% of the text) and one id for the rest, so the embedding
# is 87% to 44% as large as the blocks, where GPT-2 124M's is 45% of its blocks': cut less, the bench would mostly
# measure how fast AdamW learns an embedding. Sizes whose one pass over the text is 6 to 16 tokens a block parameter.
CPU_SCALE = Scale({"2 x 48": (2, 3, 48), "2 x 64": (2, 4, 64), "3 x 64": (3, 4, 64)}, 1024, 32, 256, 1, "cpu",
                  "fp32", None)  # fmt: skip
# GPU: GPT-2's vocabulary and widths, 65,536 tokens a step as train_gpt2.py's default, 20 tokens a block parameter
GPU_SCALE = Scale({"6 x 384": (6, 6, 384), "8 x 512": (8, 8, 512), "12 x 768": (12, 12, 768)}, 50304, 16, 1024, 4,
                  "cuda", "bf16", 20.0)  # fmt: skip
BUDGETS = (0.125, 0.25, 0.5, 1.0)  # shares of the longest run: each fully decayed, branched from one flat run
RECIPE_SEEDS = (0, 1, 2, 3, 4)  # seed 0 tunes the rates; every seed runs the chosen ones, paired by seed
DECAY_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # the decay's share of the longest budget
DECAY_SEEDS = (0, 1)  # the seeds that try each decay share, at the chosen rates
GRID_STEP = 2  # a rate grid's points are a factor 2 apart
MOST_POINTS = 8  # a grid gives up widening after this many points, and says the rate is not bracketed
GENERATED_TEXTS = 16000  # without real text: about as many tokens as the real text has


class Recipe(NamedTuple):
    optimizer: str  # "adamw": AdamW for everything; "muon": Muon for the blocks' matrices, AdamW for the rest
    lr: float  # AdamW's peak: of every parameter, or under Muon of the embedding, head and vectors
    muon_lr: float = 0.0

    def label(self) -> str:
        if self.optimizer == "adamw":
            return f"AdamW {self.lr:.3g}"
        return f"Muon {self.muon_lr:.3g}, embedding {self.lr:.3g}"


class Branch(NamedTuple):
    """One fully decayed run: flat at the peak until `end - decay`, then linearly down to `final` x the peak."""

    end: int  # steps
    decay: int  # steps
    final: float = 0.0

    @classmethod
    def decayed(cls, end: int, fraction: float, final: float = 0.0) -> "Branch":
        """A run of `end` steps whose last `fraction` decays, over one step at least (as get_lr counts it)."""
        return cls(end, max(1, round(fraction * end)), final)

    def label(self, steps: bool) -> str:
        if steps:
            return f"{self.end} steps"
        return f"decay {self.decay / self.end:.0%}" + (" to 0.1x" if self.final else "")


def seed_lr(width: int) -> float:
    """A first guess for AdamW's rate at a width: the seed's 6e-4 at GPT-2's 768, as 1/width (the grid moves on
    from it by itself)."""
    return 6e-4 * 768 / width


def block_parameters(layers: int, width: int) -> int:
    """The parameters of a GPT-2's blocks: what "tokens per parameter" counts, as the embedding's size is the
    vocabulary's choice (Kaplan et al. 2020 count the same)."""
    return layers * (12 * width * width + 13 * width)


GPT2_BLOCK_PARAMETERS = block_parameters(12, 768)  # GPT-2 124M's 85.1M, the size the speedup is carried to


def recipe_shards(folder: str, vocab: int) -> str:
    """The bench's token shards in folder, and what they hold. Each text's first 90% (cut at a line) is training text,
    its last 10% held out. GPT-2's tokens are renumbered by how often the training text uses them, the commonest
    vocab - 1 kept and the rest one shared id."""
    enc, shared = get_tokenizer(), real_text_dir()
    if shared is not None:
        lambada = (shared / "lambada" / "lambada_test.jsonl").read_text().splitlines()
        texts = [(shared / "wikitext-2-raw" / "wiki.valid.raw").read_text(),
                 (shared / "tinyshakespeare" / "input.txt").read_text(),
                 "\n\n".join(json.loads(line)["text"] for line in lambada)]  # fmt: skip
        made_of = "WikiText-2 valid, Tiny Shakespeare and LAMBADA"
    else:  # offline, without the project's copy: generated text
        texts = ["\n".join(generated_texts(GENERATED_TEXTS, 20, 200, seed=4))]
        made_of = "GENERATED text, not real text (none to be had: these figures say little)"
    splits = {"train": [], "val": []}
    for text in tqdm(texts, desc="tokenizing", unit="text"):
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
        splits["train"] += [EOT_TOKEN, *enc.encode_ordinary(text[:cut])]
        splits["val"] += [EOT_TOKEN, *enc.encode_ordinary(text[cut:])]
    counts = np.bincount(splits["train"], minlength=enc.n_vocab)
    renumber = np.full(enc.n_vocab, vocab - 1, dtype=np.int64)
    renumber[np.argsort(-counts, kind="stable")[: vocab - 1]] = np.arange(vocab - 1)
    for split, tokens in splits.items():
        with open(os.path.join(folder, f"recipe_{split}_000000.bin"), "wb") as f:
            f.write(shard_bytes(renumber[np.array(tokens)]))
    kept = np.sort(counts)[::-1][: vocab - 1].sum() / counts.sum()
    return (f"{made_of}: {len(splits['train']):,} training tokens, {len(splits['val']):,} held out; the {vocab - 1:,} "
            f"commonest tokens are {kept:.1%} of the training text, the rest share one id")  # fmt: skip


class Bench:
    """Everything one `python bench.py recipe` measures: {(size, recipe, seed): {branch: final validation loss}},
    and the means of running and printing it."""

    def __init__(self, scale: Scale, data_dir: str, planned_runs: int):
        self.scale, self.data_dir = scale, data_dir
        self.step_tokens = scale.B * scale.T * scale.accumulation
        self.val = DataLoader(data_dir, "val", scale.B, scale.T)
        self.val_windows = min(sum(self.val.windows_per_shard), 2048)  # all of the CPU's held-out text
        windows = DataLoader(data_dir, "train", scale.B, scale.T).windows_per_shard
        # steps that read no window twice, at any of the loader's offsets (one costs a shard a window at most)
        self.one_pass = sum(max(0, n - 1) for n in windows) // (scale.B * scale.accumulation)
        self.results: dict[tuple[str, Recipe, int], dict[Branch, float]] = {}
        self.runs, self.planned, self.started = 0, planned_runs, time.perf_counter()

    def longest(self, size: str) -> int:
        """The longest budget's steps for a size: one pass, or the scale's tokens per block parameter."""
        if self.scale.tokens_per_parameter is None:
            return self.one_pass
        layers, _, width = self.scale.sizes[size]
        steps = round(self.scale.tokens_per_parameter * block_parameters(layers, width) / self.step_tokens)
        if steps > self.one_pass:
            raise InputError(f"{size} needs {steps * self.step_tokens:,} training tokens for its longest budget, "
                             f"and {self.data_dir} holds {self.one_pass * self.step_tokens:,}: prepare more shards")
        return steps

    def budgets(self, size: str, decay_fraction: float) -> list[Branch]:
        """A size's budgets, each decayed to zero over its last decay_fraction."""
        return [Branch.decayed(round(share * self.longest(size)), decay_fraction) for share in BUDGETS]

    def run(self, size: str, recipe: Recipe, seed: int, branches: list[Branch]) -> dict[Branch, float]:
        """The recipe's runs at these branches, from one flat run, with progress; kept in results (and taken from
        there when a grid comes back to a point it has)."""
        known = self.results.get((size, recipe, seed), {})
        if all(branch in known for branch in branches):
            return {branch: known[branch] for branch in branches}
        t0 = time.perf_counter()
        losses = branched_run(self, size, recipe, seed, branches)
        for branch, loss in losses.items():  # a branch measured before keeps its figure: every table shows one
            known.setdefault(branch, loss)
        self.results[size, recipe, seed] = known
        self.runs += 1
        minutes = (time.perf_counter() - self.started) / 60
        by_steps = len({b.end for b in branches}) > 1  # budgets; else the decay study, all of one length
        shown = ", ".join(f"{b.label(by_steps)} {loss:.4f}" for b, loss in losses.items())
        print(f"  [{self.runs}/~{self.planned}, {minutes:.0f} min] {size}, {recipe.label()}, seed {seed}: {shown} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        return losses


def branched_run(bench: Bench, size: str, recipe: Recipe, seed: int, branches: list[Branch]) -> dict[Branch, float]:
    """train_gpt2.py's own pieces (model, loader, schedule, optimizers, momentum warmup, step and validation) with
    the chapter's defaults for the recipe, no checkpoints: one run flat at the peak rate, and at each branch's start a
    copy that decays to its end (WSD's decay depends on nothing before it, so a copy gives the loss a run of that
    length would, with the same warmups). The warmups and weight decays are train_gpt2.py's defaults for a run of the
    size's longest budget, whichever branches run: a shorter budget shares them, as a branch of a real run does
    (README, Recipe). Each branch is validated on the same held-out windows."""
    scale, (layers, heads, width) = bench.scale, bench.scale.sizes[size]
    flags = ["--optimizer", recipe.optimizer, "--max-steps", str(bench.longest(size))]
    defaults, _ = train_gpt2.parse_args([*flags, "--total-batch-size", str(bench.step_tokens), "--schedule", "wsd"])
    resolve_recipe(defaults)
    torch.manual_seed(seed)
    config = GPTConfig(block_size=scale.T, vocab_size=scale.vocab, n_layer=layers, n_head=heads, n_embd=width)
    model = GPT(config).to(scale.device)
    muon_lr = recipe.muon_lr if recipe.optimizer == "muon" else None
    optimizer = model.configure_optimizers(defaults.weight_decay, recipe.lr, muon_lr, defaults.muon_weight_decay)
    train = DataLoader(bench.data_dir, "train", scale.B, scale.T, seed=seed)
    autocast = train_gpt2.autocast_for(scale.device, scale.precision)
    scaler = torch.amp.GradScaler(torch.device(scale.device).type, enabled=False)

    def step(model, optimizer, loader, index: int, branch: Branch):
        train_gpt2.accumulate_gradients(model, loader, scale.accumulation, autocast, scaler, scale.device)
        lr = train_gpt2.get_lr(index, defaults.warmup_steps, branch.end, recipe.lr, branch.final * recipe.lr, "wsd",
                               branch.decay / branch.end)  # fmt: skip
        set_muon_momentum(optimizer, index, defaults.muon_momentum_warmup)
        train_gpt2.clip_and_step(model, optimizer, scaler, lr, 1.0)

    losses, done = {}, 0
    for branch in sorted(branches, key=lambda b: b.end - b.decay):
        for index in range(done, branch.end - branch.decay):  # flat: the same in every branch's schedule
            step(model, optimizer, train, index, branch)
        done = branch.end - branch.decay
        copy_model, copy_optimizer = copy.deepcopy((model, optimizer))
        copy_train = DataLoader(bench.data_dir, "train", scale.B, scale.T, seed=seed)
        copy_train.load_state_dict(train.state_dict())
        for index in range(done, branch.end):
            step(copy_model, copy_optimizer, copy_train, index, branch)
        losses[branch] = train_gpt2.estimate_loss(copy_model, bench.val, bench.val_windows, autocast, scale.device)
    return losses


DECAY_FRACTION = 0.2  # the decay's share in every run but the decay-fraction study (train_gpt2.py's default)


def bracket(measure: Callable[[float], float], first: float) -> dict[float, float]:
    """{rate: loss} over a grid a factor GRID_STEP apart, from first / GRID_STEP to first x GRID_STEP, widened on the
    side of the best point until a worse point stands on each side of it (or MOST_POINTS are spent)."""
    losses = {rate: measure(rate) for rate in (first / GRID_STEP, first, first * GRID_STEP)}
    while len(losses) < MOST_POINTS:
        best = min(losses, key=losses.get)
        if best == min(losses):
            losses[best / GRID_STEP] = measure(best / GRID_STEP)
        elif best == max(losses):
            losses[best * GRID_STEP] = measure(best * GRID_STEP)
        else:
            break
    return dict(sorted(losses.items()))


def is_bracketed(losses: dict[float, float]) -> bool:
    best = min(losses, key=losses.get)
    return min(losses) < best < max(losses)


class Tuned(NamedTuple):
    adamw: Recipe
    muon: Recipe
    grids: dict[str, dict[float, float]]  # "AdamW lr", "Muon lr", "embedding lr under Muon": {rate: seed 0's loss}


def tune(bench: Bench, size: str) -> Tuned:
    """Seed 0's brackets at the longest budget: AdamW's rate; then Muon's, its AdamW part at AdamW's best; then the
    embedding's under Muon, at Muon's best."""
    budgets, width = bench.budgets(size, DECAY_FRACTION), bench.scale.sizes[size][2]
    measure = lambda recipe: bench.run(size, recipe, 0, budgets)[budgets[-1]]  # noqa: E731
    adamw = bracket(lambda lr: measure(Recipe("adamw", lr)), seed_lr(width))
    adamw_lr = min(adamw, key=adamw.get)
    muon = bracket(lambda lr: measure(Recipe("muon", adamw_lr, lr)), MUON_LR)
    muon_lr = min(muon, key=muon.get)
    embedding = bracket(lambda lr: measure(Recipe("muon", lr, muon_lr)), adamw_lr)
    grids = {"AdamW lr": adamw, "Muon lr": muon, "embedding lr under Muon": embedding}
    return Tuned(Recipe("adamw", adamw_lr), Recipe("muon", min(embedding, key=embedding.get), muon_lr), grids)


def tokens_needed(curve: dict[int, float], target: float) -> float | None:
    """The tokens at which a final-loss-against-tokens curve reaches target, interpolated in log tokens; None where
    even its smallest budget is below target (the curve starts past it)."""
    points = sorted(curve.items())
    if points[0][1] <= target:
        return None
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return math.exp(math.log(t0) + (l0 - target) / (l0 - l1) * (math.log(t1) - math.log(t0)))
    return float("inf")  # never reached within the budgets


def curve(bench: Bench, size: str, recipe: Recipe, seed: int) -> dict[int, float]:
    """{tokens: final validation loss} over a size's budgets at the default decay."""
    runs = bench.results[size, recipe, seed]
    return {b.end * bench.step_tokens: runs[b] for b in bench.budgets(size, DECAY_FRACTION)}


def speedup(bench: Bench, size: str, tuned: Tuned, seed: int) -> float:
    """The tokens AdamW needs for a loss over the tokens Muon needs for it, paired on the seed, at the loss the
    worse of the two reaches at the longest budget: the better one's curve says when it got there. Where that is
    before the smallest budget, the ratio of the budgets is a lower bound, and is what is returned."""
    adamw, muon = (curve(bench, size, recipe, seed) for recipe in tuned[:2])
    longest = max(adamw)
    if muon[longest] <= adamw[longest]:
        return longest / (tokens_needed(muon, adamw[longest]) or min(muon))
    return (tokens_needed(adamw, muon[longest]) or min(adamw)) / longest


def decay_branches(bench: Bench, size: str) -> list[Branch]:
    """The longest budget decayed over each of DECAY_FRACTIONS to zero, then over the default share to a tenth of
    the peak: all branches of one flat run."""
    end = bench.longest(size)
    return [Branch.decayed(end, f) for f in DECAY_FRACTIONS] + [Branch.decayed(end, DECAY_FRACTION, 0.1)]


def decay_study(bench: Bench, size: str, tuned: Tuned):
    """The decay branches of DECAY_SEEDS at the chosen rates."""
    for seed in DECAY_SEEDS:
        for recipe in tuned[:2]:
            bench.run(size, recipe, seed, decay_branches(bench, size))


def bench_recipe(args: argparse.Namespace):
    """AdamW against Muon beside AdamW, both with WSD decaying to zero, at a few sizes: every rate bracketed on seed 0,
    then every seed at the chosen rates; the loss each reaches at several budgets, the tokens Muon saves, the decay's
    share; tables, and plots."""
    scale = GPU_SCALE._replace(device=args.device) if args.recipe_gpu else CPU_SCALE
    if args.recipe_gpu and not os.path.isdir(args.recipe_data):
        raise InputError(f"--recipe-data {args.recipe_data} does not exist: prepare GPT-2 token shards first, e.g. "
                         "python prepare_data.py --dataset fineweb-edu --max-tokens 5e9 --out-dir data/fineweb-edu")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.recipe_data if args.recipe_gpu else tmp
        what = recipe_shards(tmp, scale.vocab) if not args.recipe_gpu else f"the shards in {data_dir}"
        planned = len(scale.sizes) * (3 * 4 + 2 * (len(RECIPE_SEEDS) - 1) + 2 * len(DECAY_SEEDS))
        bench = Bench(scale, data_dir, planned)
        print(f"\n## recipe: AdamW against Muon, {bench.step_tokens:,} tokens a step, context {scale.T}, "
              f"{scale.precision} on {machine_line(scale.device)}\n\n{what}.\n")  # fmt: skip
        print_regime(bench)
        tuned = {}
        for size in scale.sizes:
            print(f"\n{size}: tuning on seed 0, then seeds {', '.join(map(str, RECIPE_SEEDS[1:]))}", flush=True)
            tuned[size] = tune(bench, size)
            for seed in RECIPE_SEEDS[1:]:
                for recipe in tuned[size][:2]:
                    bench.run(size, recipe, seed, bench.budgets(size, DECAY_FRACTION))
            decay_study(bench, size, tuned[size])
    for size in scale.sizes:
        print_size(bench, size, tuned[size])
    print_speedups(bench, tuned)
    plot_recipe(bench, tuned, args.recipe_png)
    print(f"\n{bench.runs} runs in {(time.perf_counter() - bench.started) / 60:.0f} minutes; plots: "
          f"{args.recipe_png}")


def print_regime(bench: Bench):
    print("| size | block parameters | all parameters | longest budget: steps, tokens | tokens per block parameter "
          "| budgets, steps |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for size, (layers, _, width) in bench.scale.sizes.items():
        blocks, steps = block_parameters(layers, width), bench.longest(size)
        everything = blocks + (bench.scale.vocab + bench.scale.T + 2) * width
        ends = ", ".join(str(b.end) for b in bench.budgets(size, DECAY_FRACTION))
        print(f"| {size} | {blocks:,} | {everything:,} | {steps}, {steps * bench.step_tokens:,} "
              f"| {steps * bench.step_tokens / blocks:.1f} | {ends} |")  # fmt: skip
    print(f"\nOne pass over the training text is {bench.one_pass} steps; no run reads more. Validation: "
          f"{bench.val_windows} held-out windows of {bench.scale.T}, the same for every run.")


def print_size(bench: Bench, size: str, tuned: Tuned):
    print(f"\n### {size}\n\nseed 0, the longest budget: loss against rate (the chosen rate in bold)\n")
    for name, grid in tuned.grids.items():
        best = min(grid, key=grid.get)
        points = ", ".join(f"**{rate:.3g}: {loss:.4f}**" if rate == best else f"{rate:.3g}: {loss:.4f}"
                           for rate, loss in grid.items())  # fmt: skip
        verdict = "bracketed" if is_bracketed(grid) else "NOT BRACKETED"
        print(f"- {name}: {points} ({verdict})")
    budgets = bench.budgets(size, DECAY_FRACTION)
    header = " | ".join(f"{b.end * bench.step_tokens / 1e6:.2f}M tokens" for b in budgets)
    seeds = ", ".join(map(str, RECIPE_SEEDS))
    print(f"\nfinal validation loss, mean ± sd over seeds {seeds}\n\n| recipe | {header} |\n"
          f"| --- |{' ---: |' * len(budgets)}")  # fmt: skip
    for recipe in tuned[:2]:
        cells = [mean_sd([bench.results[size, recipe, s][b] for s in RECIPE_SEEDS]) for b in budgets]
        print(f"| {recipe.label()} | {' | '.join(cells)} |")
    paired = [mean_sd([bench.results[size, tuned.muon, s][b] - bench.results[size, tuned.adamw, s][b]
                       for s in RECIPE_SEEDS], signed=True) for b in budgets]  # fmt: skip
    print(f"| Muon − AdamW, paired by seed | {' | '.join(paired)} |")
    branches = decay_branches(bench, size)
    shares = [f"{b.decay / b.end:.0%}" + (" to 0.1x" if b.final else "") for b in branches]
    print("\nthe longest budget, by the decay's share (to zero; the last column to a tenth of the peak)\n")
    print(f"| recipe, seed | {' | '.join(shares)} |\n| --- |{' ---: |' * len(shares)}")
    for seed in DECAY_SEEDS:
        for recipe in tuned[:2]:
            losses = [bench.results[size, recipe, seed][b] for b in branches]
            cells = [f"**{loss:.4f}**" if loss == min(losses) else f"{loss:.4f}" for loss in losses]
            print(f"| {recipe.optimizer}, {seed} | {' | '.join(cells)} |")


def mean_sd(values: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{statistics.mean(values):{sign}.4f} ± {statistics.stdev(values):.4f}"


def print_speedups(bench: Bench, tuned: dict[str, Tuned]):
    """Per size, the tokens AdamW needs for its longest budget's loss over the tokens Muon needs, per seed; and the
    line through the sizes' means against log parameters, carried to GPT-2 124M's blocks as an extrapolation."""
    print("\n### Muon's speedup: AdamW's tokens for its final loss / Muon's tokens for the same loss\n")
    print(f"| size | block parameters | seeds {', '.join(map(str, RECIPE_SEEDS))} | mean ± sd |\n"
          "| --- | ---: | ---: | ---: |")  # fmt: skip
    for size, (layers, _, width) in bench.scale.sizes.items():
        ratios = [speedup(bench, size, tuned[size], seed) for seed in RECIPE_SEEDS]
        ends = [b.end for b in bench.budgets(size, DECAY_FRACTION)]
        bound = ends[-1] / ends[0]  # past the budgets' range: a bound, not a measurement
        shown = " / ".join(("≥" if r >= bound else "≤" if r <= 1 / bound else "") + f"{r:.2f}" for r in ratios)
        mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
        print(f"| {size} | {block_parameters(layers, width):,} | {shown} | {mean:.2f} ± {sd:.2f}× |")
    slope, at_gpt2 = extrapolation(bench, tuned)
    print(f"\nA straight line through the means against log block parameters: {slope:+.3f} per doubling; carried to "
          f"GPT-2 124M's {GPT2_BLOCK_PARAMETERS / 1e6:.0f}M block parameters, an EXTRAPOLATION over "
          f"{math.log10(GPT2_BLOCK_PARAMETERS / max(sizes_parameters(bench))):.1f} orders of magnitude: {at_gpt2:.2f}×."
          " Published, tuned: 1.3–1.5× at 124M (the speedrun's records); 1.4× at 0.1B, 1.1× at 1.2B (Wen et al. 2025).")


def sizes_parameters(bench: Bench) -> list[int]:
    return [block_parameters(layers, width) for layers, _, width in bench.scale.sizes.values()]


def mean_speedups(bench: Bench, tuned: dict[str, Tuned]) -> list[float]:
    return [statistics.mean(speedup(bench, size, tuned[size], s) for s in RECIPE_SEEDS) for size in bench.scale.sizes]


def extrapolation(bench: Bench, tuned: dict[str, Tuned]) -> tuple[float, float]:
    """The least-squares line of mean speedup against log2 block parameters: its slope per doubling, and its value
    at GPT-2 124M's block parameters."""
    slope, intercept = np.polyfit(np.log2(sizes_parameters(bench)), mean_speedups(bench, tuned), 1)
    return float(slope), float(intercept + slope * math.log2(GPT2_BLOCK_PARAMETERS))


def plot_recipe(bench: Bench, tuned: dict[str, Tuned], path: str):
    """Three panels: final loss against tokens per recipe and size (mean of the seeds, band min to max); seed 0's
    loss against each rate; the speedup against block parameters, with the extrapolation to 124M and the published
    figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, rates, gains) = plt.subplots(1, 3, figsize=(18, 5))
    for size in bench.scale.sizes:
        budgets = bench.budgets(size, DECAY_FRACTION)
        tokens = [b.end * bench.step_tokens for b in budgets]
        for recipe, style in zip(tuned[size][:2], ("--", "-")):
            losses = np.array([[bench.results[size, recipe, s][b] for b in budgets] for s in RECIPE_SEEDS])
            line = curves.plot(tokens, losses.mean(axis=0), style, marker="o", label=f"{size}: {recipe.label()}")
            curves.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=line[0].get_color(), alpha=0.2)
        for name, grid in tuned[size].grids.items():
            rates.plot(list(grid), list(grid.values()), marker="o", label=f"{size}: {name}")
    curves.set(xscale="log", xlabel="training tokens (each point a fully decayed run)", ylabel="validation loss",
               title="final loss against tokens")  # fmt: skip
    rates.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss, seed 0, longest budget",
              title="the brackets")  # fmt: skip
    params = sizes_parameters(bench)
    gains.plot(params, mean_speedups(bench, tuned), "o", color="C0", label="this bench (mean of seeds)")
    slope, at_gpt2 = extrapolation(bench, tuned)
    x = np.geomspace(min(params), GPT2_BLOCK_PARAMETERS, 50)
    gains.plot(x, at_gpt2 + slope * np.log2(x / GPT2_BLOCK_PARAMETERS), ":", color="C0",
               label="extrapolation (a straight line in log parameters)")  # fmt: skip
    gains.axhspan(1.3, 1.5, color="C2", alpha=0.2, label="speedrun records at 124M: 1.3-1.5x")
    gains.plot([1e8, 1.2e9], [1.4, 1.1], "s", color="C3", label="Wen et al. 2025: 0.1B, 1.2B (all parameters)")
    gains.set(xscale="log", xlabel="parameters (blocks)", ylabel="speedup in tokens", title="Muon's speedup")
    rates.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the rates span two decades: label those
    for ax in (curves, rates, gains):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# gpu: GPT-2 124M training steps on a CUDA GPU, at the settings people run, and what each speed-up buys


class RepeatedBatch:
    """A stand-in for DataLoader: the same (x, y) batch, already on the device, every time (speed does not depend
    on which tokens a batch holds, and reading shards is not what this measures)."""

    def __init__(self, vocab_size: int, B: int, T: int, device: str):
        tokens = torch.randint(0, vocab_size, (B, T + 1), device=device)
        self.batch = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


class Mode(NamedTuple):
    """One way of taking a training step: the step, and the model and optimizer it updates (what it holds between
    steps: its weights and the optimizer's state)."""

    step: Callable[[], None]
    model: torch.nn.Module
    optimizer: object


def gpu_training_steps(config: GPTConfig, B: int, T: int, total_batch_size: int, precision: str, device: str,
                       modes: Iterable[str]) -> dict[str, Mode]:  # fmt: skip
    """One optimizer step of train_gpt2.py's own code (accumulation, GradScaler, clipping, fused AdamW) for each mode
    asked: eager, compiled, eager with the unfused math attention kernel, and compiled with Muon beside AdamW (a model
    of its own, with its own optimizer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    autocast = train_gpt2.autocast_for(device, precision)
    batches = RepeatedBatch(config.vocab_size, B, T, device)
    grad_accum_steps = total_batch_size // (B * T)

    def model_and_optimizer(muon_lr: float | None) -> tuple[torch.nn.Module, object]:
        torch.manual_seed(0)
        model = GPT(config).to(device)
        return model, model.configure_optimizers(0.1, 6e-4, muon_lr)

    def mode(model: torch.nn.Module, optimizer, compiled: bool, attention=contextlib.nullcontext) -> Mode:
        # a GradScaler each: a step that fails halfway (out of memory) leaves its scaler's state to itself
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
        module = torch.compile(model) if compiled else model

        def step():
            optimizer.zero_grad(set_to_none=True)  # what a failed step may have left behind
            with attention():
                train_gpt2.accumulate_gradients(module, batches, grad_accum_steps, autocast, scaler, device)
                train_gpt2.clip_and_step(module, optimizer, scaler, 6e-4, 1.0)

        return Mode(step, model, optimizer)

    model, optimizer = model_and_optimizer(None)
    makers = {
        "eager": lambda: mode(model, optimizer, False),
        "compiled": lambda: mode(model, optimizer, True),
        "eager, math attention": lambda: mode(model, optimizer, False, lambda: sdpa_kernel(SDPBackend.MATH)),
        "compiled, Muon": lambda: mode(*model_and_optimizer(0.01), True),
    }
    return {name: makers[name]() for name in modes}


def auto_micro_batch(config: GPTConfig, T: int, total_batch_size: int, precision: str, device: str,
                     compiled: bool) -> int:  # fmt: skip
    """What --batch-size auto picks for this model, sequence and precision on this GPU (planning's probe): measured
    eagerly only, as for an uncompiled run, or with its compiled try, as for a compiled one."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    autocast = train_gpt2.autocast_for(device, precision)
    found = planning.largest_micro_batch(model, autocast, scaler, device, T, total_batch_size // T,
                                         unallocated_state_bytes(optimizer), compiled, lambda line: None)  # fmt: skip
    model = optimizer = None
    torch.cuda.empty_cache()
    return found


# each mode's speed-up is against the one it changes one thing of: Muon's row shows Muon's cost
AGAINST = {"compiled": "eager", "eager, math attention": "eager", "compiled, Muon": "compiled"}


def bench_gpu(args: argparse.Namespace):
    """ms per step, tokens/s, MFU and peak memory of 124M training steps of 65,536 tokens: the seed's T4 setting
    (micro batch 4 x 1,024, fp16 with a GradScaler) and 16 x 1,024 in bf16, each eager, compiled, with the math
    attention kernel instead of PyTorch's fused ones, and compiled with Muon; then, compiled, the micro batch that
    --batch-size auto picks on this card in its precision, measured eagerly and measured compiled. A row that runs
    out of memory says so; one that fails for any other reason makes the benchmark fail, once every row is done."""
    if not torch.cuda.is_available():
        print("\n## gpu: skipped, this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        return
    device = "cuda" if args.device == "cpu" else args.device
    torch.backends.cuda.matmul.allow_tf32 = True  # as train_gpt2.py sets them
    torch.backends.cudnn.allow_tf32 = True
    major, minor = torch.cuda.get_device_capability(device)
    fused = "flash or cuDNN" if major >= 8 else "memory-efficient"
    config = GPTConfig(vocab_size=50304)
    flops = train_gpt2.flops_per_token(config, 1024)
    native = "bf16" if major >= 8 else "fp16"  # what the run picks here (choose_precision)
    every = ["eager", "compiled", "eager, math attention", "compiled, Muon"]
    settings = [("4 x 1024", 4, "fp16", every), ("16 x 1024", 16, "bf16", every)]  # the seed's T4 setting; a big card's
    auto = {probe: auto_micro_batch(config, 1024, 65536, native, device, probe == "compiled")
            for probe in ("eager", "compiled")}  # fmt: skip
    for probe, B in auto.items() if auto["eager"] != auto["compiled"] else [("eager and compiled", auto["eager"])]:
        settings.append((f"{B} x 1024 (auto, measured {probe})", B, native, ["compiled"]))
    peaks = {precision: peak_flops(device, precision) for precision in ("fp16", "bf16")}
    print(f"\n## gpu: GPT-2 124M training steps of 65,536 tokens ({machine_line(device)}, compute capability "
          f"{major}.{minor}: fused attention is PyTorch's {fused} kernel; MFU against the {peaks['fp16'][1]})\n")
    print("| micro batch | precision | mode | ms/step | tokens/s | MFU | peak memory | speed-up |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    failed = []
    for micro, B, precision, modes in settings:
        if precision == "bf16" and major < 8:
            print(f"| {micro} | bf16 | - | needs compute capability 8.0 | | | | |")
            continue
        with fresh_compile_cache():
            steps = gpu_training_steps(config, B, 1024, 65536, precision, device, modes)
            for name, problem in failing_steps(steps, device).items():
                print(f"| {micro} | {precision} | {name} | {problem} | | | | |")
                if problem != OUT_OF_MEMORY:
                    failed.append(f"{micro} {precision} {name}: {problem}")
            seconds = race({name: mode.step for name, mode in steps.items()}, args.repeats, device)
            peak_memory = {name: peak_memory_of(mode, device) for name, mode in steps.items()}
        steps = None  # the next setting starts with this one's models, optimizers and graphs freed
        torch.cuda.empty_cache()
        for name, times in seconds.items():
            tokens_per_s = 65536 / statistics.median(times)
            against = AGAINST.get(name)
            speed_up = f"{median_ratio(seconds[against], times):.2f}x {against}" if against in seconds else "-"
            print(f"| {micro} | {precision} | {name} | {statistics.median(times) * 1000:,.0f} | {tokens_per_s:,.0f} "
                  f"| {flops * tokens_per_s / peaks[precision][0]:.0%} | {peak_memory[name] / 2**30:.1f} GiB "
                  f"| {speed_up} |", flush=True)  # fmt: skip
    print(f"\nmedian of {args.repeats} alternating rounds after a warm-up step (and compilation) for each; speed-up "
          "against the row of the same micro batch that differs in one thing (Muon's: against AdamW compiled); peak "
          "memory: what the CUDA allocator reserved at the step's peak, counting the mode's own weights and optimizer "
          "state but not the other modes' models held beside it. Goal on an H100: 16 x 1024 bf16 compiled at 470,000 "
          "tokens/s or more (llm.c's rate per GPU). The auto rows: the micro batch --batch-size auto picks on this "
          "card, measured eagerly (an uncompiled run) and with its compiled try (a compiled run), both run compiled.")
    if failed:
        raise SystemExit("bench.py gpu: rows failed for another reason than memory:\n" + "\n".join(failed))


@contextlib.contextmanager
def fresh_compile_cache():
    """torch.compile with an empty on-disk cache, and nothing compiled in memory: its cache key leaves out which
    attention kernels are allowed (pytorch/pytorch#185449), so a graph compiled elsewhere under another choice
    could be reused here."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        torch._dynamo.reset()
        try:
            yield
        finally:
            torch._dynamo.reset()
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


OUT_OF_MEMORY = "out of memory"


def failing_steps(steps: dict[str, Mode], device: str) -> dict[str, str]:
    """Run each step once on its own (compiling it): those that fail leave `steps` with the reason, so that one mode
    that does not fit does not cost the others their row. Out of memory (of any kind: devices.is_out_of_memory)
    is a measurement; anything else is a failure, which bench_gpu reports once every row is done."""
    problems = {}
    for name in list(steps):
        try:
            steps[name].step()
            torch.cuda.synchronize(device)
        except Exception as e:  # torch.cuda.OutOfMemoryError, Inductor's errors that wrap it, or a real failure
            problems[name] = OUT_OF_MEMORY if is_out_of_memory(e) else f"failed: {first_line(e)}"
            del steps[name]
        torch.cuda.empty_cache()
    return problems


def held_bytes(model: torch.nn.Module, optimizer) -> int:
    """What a model keeps between steps: its weights and its optimizer's state (gradients go at each step's end)."""
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])


def peak_memory_of(mode: Mode, device: str) -> int:
    """The memory one more step of this mode reserves at its peak, as if it ran alone: what the allocator reserved
    at the peak above what it held before the step (cache emptied), plus the mode's own weights and optimizer state.
    Reserved, not allocated: what --plan and --batch-size auto count, with the allocator's rounding and caching."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    mode.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_reserved(device) - before + held_bytes(mode.model, mode.optimizer)


BENCHMARKS = {"generate": bench_generate, "data": bench_data, "train": bench_train, "eval": bench_eval,
              "gpu": bench_gpu, "recipe": bench_recipe}
SPEED = ["generate", "data", "train", "eval", "gpu"]  # what `python bench.py` runs: recipe takes 37 minutes on 2 cores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Measure gpt2-lite's speed against its references, side by side.")
    parser.add_argument("benchmarks", nargs="*", help=f"which: {', '.join(BENCHMARKS)} (default: {', '.join(SPEED)})")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per comparison")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--train-modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="train benchmark: eager and/or torch.compile'd models")
    parser.add_argument("--train-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="train benchmark: precisions (bf16 is emulated, and very slow, on CPUs without it)")
    parser.add_argument("--recipe-png", default="runs/bench-recipe.png", help="recipe benchmark: where the plots go")
    parser.add_argument("--recipe-gpu", action="store_true",
                        help="recipe benchmark at GPT-2's vocabulary and widths on --device cuda (README: its cost)")
    parser.add_argument("--recipe-data", default="data/fineweb-edu",
                        help="--recipe-gpu: prepare_data.py's shards (20 tokens a block parameter: 1.7B for 12 x 768)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.recipe_gpu and not args.device.startswith("cuda"):
        parser.error(f"--recipe-gpu runs on a CUDA GPU: add --device cuda (got --device {args.device})")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    args.device = pick_device(args.device)
    print(" ".join(["python bench.py", *(argv if argv is not None else sys.argv[1:])]))
    for name in args.benchmarks or SPEED:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    run_cli(main)

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
  python bench.py recipe                # validation loss at equal tokens: the seed's recipe, WSD, Muon (40 minutes)
  python bench.py generate --repeats 9 --device cuda

How: each contender runs once to warm up (this machine hands freed memory back to its host, so memory touched
for the first time is slow), then the contenders take turns, `--repeats` rounds, the order rotating each round.
A ratio is computed within each round and the median ratio is reported, so a slow moment of the machine hits
both sides of a ratio alike. The tables print as Markdown, ready for the README.
"""

import argparse
import contextlib
import io
import json
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

import train_gpt2
from gpt2lite import cpu_decode, planning, text_data
from gpt2lite.cli import ArgumentParser, first_line, run_cli
from gpt2lite.devices import is_out_of_memory, peak_flops, pick_device
from gpt2lite.evaluation import completion_losses, lambada_pairs, sliding_windows
from gpt2lite.gpt2_files import EOT_TOKEN, get_tokenizer
from gpt2lite.optimizers import unallocated_state_bytes
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


SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # real text beside the project, if any
COMMON_WORDS = "the of and to in a is was for on as with by he at from his an were are which".split()


def generated_texts(count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` texts of low to high common English words: the stand-in for real text where SHARED_DATA is absent
    (a clone from GitHub)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(COMMON_WORDS, size=rng.integers(low, high))) for _ in range(count)]


def benchmark_documents() -> tuple[list[str], str]:
    """Real text in many documents of varied size: WikiText-2 articles, Shakespeare's speeches, LAMBADA passages."""
    shared = SHARED_DATA
    if not shared.is_dir():
        return generated_texts(6000, 20, 2000, seed=0), "6,000 generated documents (no real text beside the clone)"
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
    """(context, completion) pairs per task, from real text where SHARED_DATA has it: HellaSwag-shaped examples
    (a context, then four endings; HellaSwag itself is not stored here) made of consecutive Tiny Shakespeare
    lines, LAMBADA's first 400 passages, and WikiText-2 validation text cut into windows of 256 with stride 128."""
    enc, shared = get_tokenizer(), SHARED_DATA
    if shared.is_dir():
        lines = [line for line in (shared / "tinyshakespeare" / "input.txt").read_text().splitlines() if line.strip()]
        passages = [json.loads(line)["text"] for line in (shared / "lambada" / "lambada_test.jsonl").open()][:400]
        wiki_text, made_of = (shared / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:200_000], "real text"
    else:  # a clone from GitHub: generated text of the same shapes
        lines, passages = generated_texts(1500, 4, 16, seed=1), generated_texts(400, 60, 100, seed=2)
        wiki_text, made_of = " ".join(generated_texts(400, 50, 150, seed=3))[:200_000], "generated text"
    hellaswag = []
    for i in range(0, 5 * 300, 5):  # 300 examples of 4 endings
        context = enc.encode_ordinary(lines[i] + " " + lines[i + 1])
        hellaswag += [(context, enc.encode_ordinary(" " + lines[i + 2 + k % 3] + " " + str(k))) for k in range(4)]
    lambada = lambada_pairs([{"text": text} for text in passages], enc)
    wiki = [EOT_TOKEN] + enc.encode_ordinary(wiki_text)
    wikitext = sliding_windows(wiki, 256, 128)
    return {"hellaswag": hellaswag, "lambada": lambada, "wikitext": wikitext}, (
        f"{made_of}: HellaSwag-shaped, 300 examples x 4 endings of Tiny Shakespeare lines; LAMBADA, 400 passages; "
        f"WikiText-2 valid, {len(wiki) - 1:,} tokens in {len(wikitext)} windows")


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
# recipe: the validation loss at equal tokens of the seed's recipe, AdamW with WSD, and Muon beside AdamW with WSD


RECIPE_SIZES = {"4 layers, width 256": (4, 4, 256), "6 layers, width 384": (6, 6, 384)}  # layers, heads, width
RECIPE_VOCAB = 8192  # the 8,191 commonest GPT-2 tokens of the training text, and one id for every other token
RECIPE_B, RECIPE_T = 8, 128  # 1,024 tokens a step
RECIPE_SEEDS = (0, 1)
ADAMW_GRID = (1, 2, 4)  # times the seed's rate for the size
MUON_GRID = (0.01, 0.02, 0.04)
EVALUATIONS = 10  # validation losses along a run, at even steps, besides step 0's
EVAL_WINDOWS = 96  # held-out windows of 128 tokens, spread over the validation text: the same for every run


def seed_lr(width: int) -> float:
    """The seed's AdamW peak, 6e-4 at GPT-2's width 768, scaled as 1/width for a narrower model (fixed before any run
    of this bench: nothing here is tuned to its results)."""
    return 6e-4 * 768 / width


def recipe_shards(folder: str) -> str:
    """The bench's token shards in folder, and what they hold. Each text's first 90% (cut at a line) is training text,
    its last 10% held out. GPT-2's tokens are renumbered by how often the training text uses them, the commonest
    8,191 kept and the rest one shared id: a 50,257-row embedding would be 80% of a width-256 model and most of its
    work, where GPT-2 124M's is 31%, so the bench would mostly time how fast AdamW learns an embedding."""
    enc = get_tokenizer()
    if SHARED_DATA.is_dir():
        lambada = (SHARED_DATA / "lambada" / "lambada_test.jsonl").read_text().splitlines()
        texts = [(SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw").read_text(),
                 (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(),
                 "\n\n".join(json.loads(line)["text"] for line in lambada)]  # fmt: skip
        made_of = "WikiText-2 valid, Tiny Shakespeare and LAMBADA"
    else:  # a clone from GitHub: generated text
        texts = ["\n".join(generated_texts(3000, 20, 200, seed=4))]
        made_of = "generated text (no real text beside the clone)"
    splits = {"train": [], "val": []}
    for text in texts:
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
        splits["train"] += [EOT_TOKEN, *enc.encode_ordinary(text[:cut])]
        splits["val"] += [EOT_TOKEN, *enc.encode_ordinary(text[cut:])]
    counts = np.bincount(splits["train"], minlength=enc.n_vocab)
    renumber = np.full(enc.n_vocab, RECIPE_VOCAB - 1, dtype=np.int64)
    renumber[np.argsort(-counts, kind="stable")[: RECIPE_VOCAB - 1]] = np.arange(RECIPE_VOCAB - 1)
    for split, tokens in splits.items():
        with open(os.path.join(folder, f"recipe_{split}_000000.bin"), "wb") as f:
            f.write(shard_bytes(renumber[np.array(tokens)]))
    kept = np.sort(counts)[::-1][: RECIPE_VOCAB - 1].sum() / counts.sum()
    return (f"{made_of}: {len(splits['train']):,} training tokens, {len(splits['val']):,} held out; the 8,191 "
            f"commonest tokens are {kept:.1%} of the training text")  # fmt: skip


def recipe_run(data_dir: str, layers: int, heads: int, width: int, steps: int, seed: int, max_lr: float,
               schedule: str, muon_lr: float | None = None) -> list[float]:  # fmt: skip
    """One run of train_gpt2.py's own pieces (its model, loader, schedule, optimizers, step and validation) at fp32 on
    the CPU, without checkpoints: the validation loss at step 0 and at EVALUATIONS even steps after it. The seed's
    settings otherwise: warmup 5% of the steps, min lr a tenth of the peak, weight decay 0.1, clipping at 1."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=RECIPE_T, vocab_size=RECIPE_VOCAB, n_layer=layers, n_head=heads, n_embd=width))
    optimizer = model.configure_optimizers(0.1, max_lr, muon_lr)
    train = DataLoader(data_dir, "train", RECIPE_B, RECIPE_T, seed=seed)
    val = DataLoader(data_dir, "val", RECIPE_B, RECIPE_T)
    scaler, fp32 = torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext
    curve = []
    for step in range(steps + 1):
        if step % (steps // EVALUATIONS) == 0:
            curve.append(train_gpt2.estimate_loss(model, val, EVAL_WINDOWS // RECIPE_B, fp32, "cpu"))
        if step < steps:
            train_gpt2.accumulate_gradients(model, train, 1, fp32, scaler, "cpu")
            lr = train_gpt2.get_lr(step, steps // 20, steps, max_lr, max_lr / 10, schedule)
            train_gpt2.clip_and_step(model, optimizer, scaler, lr, 1.0)
    return curve


def tokens_to_reach(curve: list[float], target: float, tokens_between: int) -> float | None:
    """The tokens at which a validation curve first reaches target, interpolated between its evaluations."""
    for i in range(1, len(curve)):
        if curve[i] <= target:
            return tokens_between * (i - 1 + (curve[i - 1] - target) / (curve[i - 1] - curve[i]))
    return None


def bench_recipe(args: argparse.Namespace):
    """Three recipes on small GPT-2s, at equal tokens read once: (1) the seed's, AdamW at its rate for the size with
    the cosine; (2) AdamW with WSD at the best of three rates; (3) Muon for the blocks' matrices beside (2)'s AdamW,
    with WSD, at the best of three Muon rates. The best rate is the lowest final validation loss of seed 0; then
    seed 1 runs each recipe's chosen rate. Figures: the validation loss at equal tokens and the tokens each recipe
    needs to reach recipe 1's final loss (mean over its seeds), each seed's; and a PNG of the curves."""
    steps, tokens_per_step = args.recipe_steps, RECIPE_B * RECIPE_T
    tokens_between = steps // EVALUATIONS * tokens_per_step
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir:
        what = recipe_shards(data_dir)
        print(f"\n## recipe: validation loss at equal tokens, {steps} steps of {tokens_per_step:,} tokens "
              f"({steps * tokens_per_step:,} in all), fp32 ({cpu_name()}, {torch.get_num_threads()} threads)\n")
        print(f"{what}.\n")
        results = {name: recipe_size(data_dir, *shape, steps) for name, shape in RECIPE_SIZES.items()}
    for name, runs in results.items():
        print_recipe_table(name, runs, tokens_between, steps * tokens_per_step)
    plot_recipes(results, tokens_between, args.recipe_png)
    print(f"\n{sum(len(runs) for runs in results.values())} runs in {(time.perf_counter() - started) / 60:.0f} "
          f"minutes; the curves: {args.recipe_png}")


def recipe_size(data_dir: str, layers: int, heads: int, width: int, steps: int) -> dict[tuple, list[float]]:
    """Every run of one model size: {(recipe, rate, seed): validation curve}, the grids on seed 0, then seed 1 at
    each recipe's chosen rate."""
    base = seed_lr(width)
    runs = {}

    def run(recipe: str, rate: float, seed: int):
        t0 = time.perf_counter()
        if recipe == "3":
            adamw_lr = chosen(runs, "2")
            curve = recipe_run(data_dir, layers, heads, width, steps, seed, adamw_lr, "wsd", muon_lr=rate)
        else:
            curve = recipe_run(data_dir, layers, heads, width, steps, seed, rate, "wsd" if recipe == "2" else "cosine")
        runs[recipe, rate, seed] = curve
        print(f"  {layers} x {width}, recipe {recipe}, rate {rate:g}, seed {seed}: final validation loss "
              f"{curve[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    run("1", base, 0)
    for multiple in ADAMW_GRID:
        run("2", multiple * base, 0)
    for muon_lr in MUON_GRID:
        run("3", muon_lr, 0)
    for recipe in ("1", "2", "3"):
        run(recipe, chosen(runs, recipe), 1)
    return runs


def chosen(runs: dict[tuple, list[float]], recipe: str) -> float:
    """A recipe's rate with the lowest final validation loss on seed 0."""
    return min((curve[-1], rate) for (r, rate, seed), curve in runs.items() if r == recipe and seed == 0)[1]


RECIPES = {"1": "seed's: AdamW, cosine", "2": "AdamW, WSD", "3": "Muon + AdamW, WSD"}


def print_recipe_table(name: str, runs: dict[tuple, list[float]], tokens_between: int, total_tokens: int):
    """The size's grid, then each recipe at its chosen rate: the final loss of each seed, and the tokens it took to
    reach recipe 1's final loss, as a share of recipe 1's tokens."""
    print(f"\n### {name}\n")
    print("| recipe | rate | seed 0: final validation loss |\n| --- | ---: | ---: |")
    for (recipe, rate, seed), curve in runs.items():
        if seed == 0:
            print(f"| {recipe}. {RECIPES[recipe]} | {rate:g} | {curve[-1]:.4f} |")
    final = {r: [runs[r, chosen(runs, r), seed][-1] for seed in RECIPE_SEEDS] for r in RECIPES}
    target = statistics.mean(final["1"])
    spread = abs(final["1"][0] - final["1"][1])
    print(f"\nrecipe 1's final loss, mean of seeds: {target:.4f}; its seeds differ by {spread:.4f}\n")
    print("| recipe | rate | final loss, seeds 0 / 1 | mean | vs recipe 1 | tokens to reach recipe 1's mean final "
          "loss, seeds 0 / 1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for recipe in RECIPES:
        rate = chosen(runs, recipe)
        reach = [tokens_to_reach(runs[recipe, rate, seed], target, tokens_between) for seed in RECIPE_SEEDS]
        shares = " / ".join("not reached" if t is None else f"{t / total_tokens:.2f}" for t in reach)
        print(f"| {recipe}. {RECIPES[recipe]} | {rate:g} | {final[recipe][0]:.4f} / {final[recipe][1]:.4f} "
              f"| {statistics.mean(final[recipe]):.4f} | {statistics.mean(final[recipe]) - target:+.4f} "
              f"| {shares} |")  # fmt: skip


def plot_recipes(results: dict[str, dict[tuple, list[float]]], tokens_between: int, path: str):
    """The validation curves of each recipe at its chosen rate, mean of the seeds, a panel per model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items()):
        for recipe, label in RECIPES.items():
            rate = chosen(runs, recipe)
            curves = np.array([runs[recipe, rate, seed] for seed in RECIPE_SEEDS])
            tokens = np.arange(curves.shape[1]) * tokens_between
            ax.plot(tokens[1:], curves.mean(axis=0)[1:], marker="o", label=f"{recipe}. {label} ({rate:g})")
            ax.fill_between(tokens[1:], curves.min(axis=0)[1:], curves.max(axis=0)[1:], alpha=0.2)
        ax.set(title=name, xlabel="training tokens", ylabel="validation loss (mean of 2 seeds; band: both)")
        ax.grid(alpha=0.3)
        ax.legend()
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
SPEED = ["generate", "data", "train", "eval", "gpu"]  # what `python bench.py` runs: recipe takes 40 minutes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Measure gpt2-lite's speed against its references, side by side.")
    parser.add_argument("benchmarks", nargs="*", help=f"which: {', '.join(BENCHMARKS)} (default: {', '.join(SPEED)})")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per comparison")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--train-modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="train benchmark: eager and/or torch.compile'd models")
    parser.add_argument("--train-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="train benchmark: precisions (bf16 is emulated, and very slow, on CPUs without it)")
    parser.add_argument("--recipe-steps", type=int, default=200, help="recipe benchmark: steps of 1,024 tokens a run")
    parser.add_argument("--recipe-png", default="runs/bench-recipe.png", help="recipe benchmark: where the curves go")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.recipe_steps < EVALUATIONS or args.recipe_steps % EVALUATIONS:
        parser.error(f"--recipe-steps must be a multiple of {EVALUATIONS}, got {args.recipe_steps}")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    args.device = pick_device(args.device)
    print(" ".join(["python bench.py", *(argv if argv is not None else sys.argv[1:])]))
    for name in args.benchmarks or SPEED:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    run_cli(main)

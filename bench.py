"""
Every performance figure gpt2-lite states, measured here: side by side, in one run, never in a timed test.

  python bench.py                       # all benchmarks
  python bench.py generate              # generate() against transformers' generate(), GPT-2 124M
  python bench.py generate --repeats 9 --device cuda

How: each contender runs once to warm up (this machine hands freed memory back to its host, so memory touched
for the first time is slow), then the contenders take turns, `--repeats` rounds, the order rotating each round.
A ratio is computed within each round and the median ratio is reported, so a slow moment of the machine hits
both sides of a ratio alike. The tables print as Markdown, ready for the README.
"""

import argparse
import platform
import statistics
import sys
import time
from typing import Callable

import torch

import train_gpt2
from train_gpt2 import GPT, ArgumentParser, GPTConfig, get_tokenizer, pick_device, run_cli


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
    for r in range(repeats):
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
            few_rows, train_gpt2.FEW_ROWS = train_gpt2.FEW_ROWS, 0
            try:
                ours()
            finally:
                train_gpt2.FEW_ROWS = few_rows

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


BENCHMARKS = {"generate": bench_generate}


def main(argv: list[str] | None = None):
    parser = ArgumentParser(description="Measure gpt2-lite's speed against its references, side by side.")
    parser.add_argument("benchmarks", nargs="*", help=f"which to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per comparison")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    args.device = pick_device(args.device)
    print(" ".join(["python bench.py", *(argv if argv is not None else sys.argv[1:])]))
    for name in args.benchmarks or list(BENCHMARKS):
        BENCHMARKS[name](args)


if __name__ == "__main__":
    run_cli(main)

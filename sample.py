"""
Sample text from GPT-2: OpenAI's weights, a Hugging Face directory, or a checkpoint from train_gpt2.py.

  python sample.py --init-from gpt2 --prompt "Hello World ! I'm LLM" --num-samples 5 --max-new-tokens 32
  python sample.py --init-from runs/cpu-demo/best.pt --prompt "ROMEO:" --temperature 0.8 --top-k 50     # a run of ours
  python sample.py --init-from ./my-gpt2 --prompt "The meaning of life is" --temperature 0   # greedy

With one sample the text is printed token by token as it is produced.
"""

import argparse
import codecs
import sys
import time

import torch

from gpt2lite.cli import ArgumentParser, Problems, run_cli
from gpt2lite.devices import device_and_model
from gpt2lite.gpt2_files import get_tokenizer
from train_gpt2 import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Sample text from a GPT-2 model.")
    parser.add_argument("--init-from", default="gpt2",
                        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a save_pretrained folder, or a checkpoint file")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations to draw (a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to the prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; below 1 sharper, above 1 flatter")
    parser.add_argument("--top-k", type=int, default=50, help="draw from the k most likely tokens (0 = no limit)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="draw from the smallest set of tokens whose probability reaches p, in (0, 1] "
                             "(default: off)")
    parser.add_argument("--seed", type=int, default=None, help="makes the samples reproducible (default: random)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    return parser.parse_args(argv)


def flag_problems(args: argparse.Namespace) -> list[str]:
    rules = [
        (args.num_samples < 1, f"--num-samples must be at least 1, got {args.num_samples}"),
        (args.max_new_tokens < 1, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"),
        (args.temperature < 0, f"--temperature must be 0 (greedy) or positive, got {args.temperature}"),
        (args.top_k < 0, f"--top-k must be 0 (no limit) or positive, got {args.top_k}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (not args.prompt, "--prompt is empty: give the model some text to continue"),
    ]
    return [line for broken, line in rules if broken]


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    problems = Problems()
    problems.add(*flag_problems(args))  # every problem at once, the model's too
    device, model = device_and_model(args.device, args.init_from, load_model, problems)
    problems.raise_any()
    enc = get_tokenizer()
    model.eval()
    prompt = enc.encode_ordinary(args.prompt)
    if args.seed is None:
        args.seed = int(torch.randint(0, 2**31 - 1, ()).item())  # printed below, so a good sample can be redrawn
    print(f"{args.init_from} on {device} | {len(prompt)} prompt tokens | seed {args.seed}", file=sys.stderr)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)  # (B, T)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    if args.num_samples == 1:
        print_as_produced(model, enc, idx, args.max_new_tokens, sampling)
    else:
        out = model.generate(idx, args.max_new_tokens, **sampling)  # (B, T + max_new_tokens)
        for row in out.tolist():
            print(enc.decode(row))
            print("-" * 80)
    dt = time.perf_counter() - t0
    n_new = args.num_samples * args.max_new_tokens
    print(f"{n_new} tokens in {dt:.2f} s ({n_new / dt:.1f} tok/s)", file=sys.stderr)


def print_as_produced(model, enc, idx: torch.Tensor, max_new_tokens: int, sampling: dict):
    # A token can end in the middle of a UTF-8 character (emoji, CJK): decode bytes incrementally so that a
    # character is printed once all of its bytes have arrived.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(utf8.decode(enc.decode_bytes(idx[0].tolist())), end="", flush=True)
    for token in model.stream(idx, max_new_tokens, **sampling):
        print(utf8.decode(enc.decode_bytes(token[0].tolist())), end="", flush=True)
    print(utf8.decode(b"", final=True))


if __name__ == "__main__":
    run_cli(main)

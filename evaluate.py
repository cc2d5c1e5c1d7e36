"""
Evaluate GPT-2 on HellaSwag, LAMBADA and WikiText perplexity: OpenAI's weights, a Hugging Face folder or a
train_gpt2.py checkpoint (anything sample.py takes), all with the same code, so that the numbers compare.

  python evaluate.py --init-from gpt2 --task hellaswag              # downloads hellaswag_val.jsonl once
  python evaluate.py --init-from runs/gpt2-124m/best.pt --task all --out results.json
  python evaluate.py --init-from gpt2 --task lambada --data lambada_test.jsonl      # a local copy
  python evaluate.py --init-from gpt2 --task wikitext --data wiki.test.raw --stride 512
  python evaluate.py --init-from gpt2 --task hellaswag --limit 500  # a quick look at the first 500 examples

The protocols (each a completion scored after its context; see completion_losses in gpt2lite/evaluation.py):
  hellaswag  the validation set (10,042 examples): the context, then each of four endings after a space. acc picks
             the ending of lowest total loss, acc_norm the lowest loss per token (GPT-2 124M: 0.2955,
             build-nanogpt's hellaswag.py on OpenAI's gpt2).
  lambada    OpenAI's test jsonl (5,153 passages). The last word is the text after the last space; its tokens
             (" word") are scored after the rest. acc: greedy decoding gives every one of them; perplexity:
             exp(mean over passages of the word's total loss). The GPT-2 paper gives 45.99% and 35.13 for 124M.
  wikitext   the test split of raw WikiText (WikiText-2 and -103 share it), as one stream after <|endoftext|>.
             Windows of block_size tokens advance by --stride; each window scores only the tokens the previous
             one did not reach, so every token is scored once, with at least block_size - stride tokens of
             context after the first window. Token-level perplexity, and word-level: the same total loss over
             the number of whitespace-separated words (the paper's 37.50 / 29.41 are word-level, on detokenized text).
"""

import argparse
import json
import math
import os
import time

from gpt2lite.cli import ArgumentParser, InputError, Problems, run_cli
from gpt2lite.devices import device_and_model
from gpt2lite.evaluation import (
    HELLASWAG_CACHE,
    HELLASWAG_URL,
    LAMBADA_URL,
    completion_losses,
    data_file,
    hellaswag_examples,
    hellaswag_scores,
    lambada_pairs,
    read_jsonl,
    sliding_windows,
)
from gpt2lite.files import read_text, write_atomically
from gpt2lite.gpt2_files import EOT_TOKEN, get_tokenizer
from gpt2lite.text_data import hub_documents
from train_gpt2 import autocast_for, choose_precision, load_model

TASKS = ("hellaswag", "lambada", "wikitext")
WIKITEXT_CONFIG = "wikitext-2-raw-v1"  # its test split is WikiText-103's too, and the download is 30x smaller


# --- LAMBADA: the last word of a passage ------------------------------------------------------------------------


def lambada_examples(path: str | None) -> list[dict]:
    path = data_file(path, LAMBADA_URL, "LAMBADA", os.path.join("data", "lambada", "lambada_test.jsonl"))
    return read_jsonl(path, "LAMBADA", lambda example: isinstance(example["text"], str) and " " in example["text"],
                      'JSON with a "text" of several words')  # fmt: skip


def lambada_scores(model, examples: list[dict], device: str, autocast, batch_tokens: int, progress: bool) -> dict:
    pairs = lambada_pairs(examples, get_tokenizer())
    scored = completion_losses(model, pairs, device, autocast, batch_tokens, progress)
    return {
        "acc": sum(word.greedy for word in scored) / len(scored),
        "ppl": math.exp(sum(word.loss for word in scored) / len(scored)),
        "examples": len(scored),
    }


# --- WikiText: perplexity with a sliding window ---------------------------------------------------------------


def wikitext_text(path: str | None) -> str:
    """A local wiki.test.raw, or the test split from the Hugging Face hub (rows joined back into the raw file)."""
    if path is not None:
        if not os.path.isfile(path):
            raise InputError(f"WikiText file {path} does not exist")
        return read_text(path)
    return "".join(hub_documents(WIKITEXT_CONFIG, "test")())


def wikitext_scores(model, text: str, stride: int, device: str, autocast, batch_tokens: int, progress: bool) -> dict:
    tokens = [EOT_TOKEN] + get_tokenizer().encode_ordinary(text)
    windows = sliding_windows(tokens, model.config.block_size, stride)
    scored = completion_losses(model, windows, device, autocast, batch_tokens, progress)
    nats, n_tokens, n_words = sum(w.loss for w in scored), sum(w.tokens for w in scored), len(text.split())
    return {
        "token_ppl": math.exp(nats / n_tokens),
        "word_ppl": math.exp(nats / n_words),
        "tokens": n_tokens,
        "words": n_words,
        "stride": stride,
    }


# --- the command line -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Evaluate a GPT-2 model on HellaSwag, LAMBADA and WikiText perplexity.")
    parser.add_argument("--init-from", default="gpt2",
                        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a save_pretrained folder, or a checkpoint file")
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"], help="which benchmark (default: all)")
    parser.add_argument("--data", default=None,
                        help="the task's data file, HellaSwag or LAMBADA jsonl or wiki.test.raw (default: downloaded "
                             "once)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N examples (HellaSwag, LAMBADA) or N tokens (WikiText); 0 = all")
    parser.add_argument("--stride", type=int, default=None,
                        help="WikiText: tokens between window ends (default: half the block, 512 for GPT-2, so every "
                             "token after the first window has at least 512 tokens of context)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass, padding included")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (auto: bf16 or fp16 on a GPU, by its capability; fp32 on a CPU)")
    parser.add_argument("--out", default=None,
                        help="also write the scores to this JSON file (default: print them only)")
    return parser.parse_args(argv)


def flag_problems(args: argparse.Namespace) -> list[str]:
    rules = [
        (args.data and args.task == "all", "--data names one task's file: use it with --task hellaswag, lambada or "
                                           "wikitext"),
        (args.limit < 0, f"--limit must be 0 (everything) or positive, got {args.limit}"),
        (args.stride is not None and args.stride < 1, f"--stride must be positive, got {args.stride}"),
        (args.batch_tokens < 1, f"--batch-tokens must be positive, got {args.batch_tokens}"),
    ]  # fmt: skip
    return [line for broken, line in rules if broken]


def run_task(task: str, model, args: argparse.Namespace, device: str, autocast) -> dict:
    limit = args.limit or None
    if task == "hellaswag":
        examples = hellaswag_examples(data_file(args.data, HELLASWAG_URL, "HellaSwag", HELLASWAG_CACHE))[:limit]
        return hellaswag_scores(model, examples, device, autocast, args.batch_tokens, progress=True)
    if task == "lambada":
        examples = lambada_examples(args.data)[:limit]
        return lambada_scores(model, examples, device, autocast, args.batch_tokens, progress=True)
    stride = args.stride or model.config.block_size // 2
    if stride > model.config.block_size:
        raise InputError(f"--stride {stride} is longer than the model's block_size {model.config.block_size}")
    text = wikitext_text(args.data)
    if limit:  # about `limit` tokens: cut the text, not the tokens, so that the word count still matches
        enc = get_tokenizer()
        text = enc.decode(enc.encode_ordinary(text)[:limit])
    return wikitext_scores(model, text, stride, device, autocast, args.batch_tokens, progress=True)


def describe(task: str, scores: dict) -> str:
    if task == "hellaswag":
        return f"acc {scores['acc']:.4f} | acc_norm {scores['acc_norm']:.4f} | {scores['examples']:,} examples"
    if task == "lambada":
        return f"acc {scores['acc']:.4f} | ppl {scores['ppl']:.2f} | {scores['examples']:,} passages"
    return (f"token ppl {scores['token_ppl']:.2f} | word ppl {scores['word_ppl']:.2f} | {scores['tokens']:,} tokens, "
            f"{scores['words']:,} words | stride {scores['stride']}")  # fmt: skip


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    problems = Problems()
    problems.add(*flag_problems(args))  # every problem at once, the device's and the model's too
    device, model = device_and_model(args.device, args.init_from, load_model, problems)
    if device:
        with problems:
            precision, why = choose_precision(device, args.dtype)
    problems.raise_any()
    autocast = autocast_for(device, precision)
    model.eval()
    print(f"{args.init_from} on {device} | precision {precision} ({why})")
    results = {"model": args.init_from, "device": device, "precision": precision, "tasks": {}}
    for task in TASKS if args.task == "all" else (args.task,):
        t0 = time.perf_counter()
        scores = run_task(task, model, args, device, autocast)
        scores["seconds"] = round(time.perf_counter() - t0, 2)
        results["tasks"][task] = scores
        print(f"{task:>9}: {describe(task, scores)} | {scores['seconds']:.1f} s", flush=True)
    if args.out:
        write_atomically(args.out, lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))


if __name__ == "__main__":
    run_cli(main)

"""
Text -> GPT-2 tokens -> llm.c-format shards that train_gpt2.py (and llm.c) train on.

  python prepare_data.py                                       # WikiText-103 (raw, ~120M tokens) -> data/wikitext-103
  python prepare_data.py --dataset wikitext-2-raw-v1           # the small one -> data/wikitext-2
  python prepare_data.py --input ../shared/data/tinyshakespeare/input.txt --val-fraction 0.1   # local text, offline
  python prepare_data.py --input 'corpus/*.txt' --val-input held_out.txt --name corpus

Documents: WikiText (from the hub, or a local wiki.*.raw file) is split into its articles at the top-level
headings (" = Title = "); any other file is one document. Each document starts with <|endoftext|>, so the model
sees where one ends and the next begins. With --input, the validation split is --val-input, or else the last
--val-fraction of the text (cut at a line end).

Output: {name}_{split}_{index:06d}.bin shards (split train, val, test) and manifest.json, in --out-dir. Every
file is written under a temporary name and renamed when complete; running the same command again after an
interruption finishes the job, with the same bytes as a run that was never interrupted.
"""

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from common import ArgumentParser, InputError, run_cli
from text_data import (
    ShardWriter,
    describe,
    expand_inputs,
    file_documents,
    hub_documents,
    split_off_validation,
    tokenize_split,
    write_json,
)
from train_gpt2 import (
    EOT_TOKEN,
    MANIFEST_NAME,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    get_tokenizer,
    load_tokens,
    read_manifest,
)

HUB_DATASETS = {"wikitext-103-raw-v1": "wikitext-103", "wikitext-2-raw-v1": "wikitext-2"}  # config -> short name
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
PROGRESS_NAME = ".prepare-in-progress.json"  # the settings of a run that has not finished yet


# ----------------------------------------------------------------------------------------------------------------
# The output folder: fresh, resumed, already done, or someone else's


def our_files(out_dir: str) -> list[str]:
    """Files in out_dir that prepare_data.py writes: shards, the manifest, the progress file, temporary files."""
    shard = re.compile(rf".+_({'|'.join(SPLITS)})_\d{{6}}\.bin")
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return [n for n in names if shard.fullmatch(n) or n in (MANIFEST_NAME, PROGRESS_NAME) or n.startswith(".tmp-")]


def is_complete(out_dir: str, settings: dict) -> bool:
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return False
    manifest = read_manifest(manifest_path)
    if manifest.get("settings") != settings:
        return False
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = os.path.join(out_dir, shard["file"])
            if not os.path.isfile(path) or len(load_tokens(path)) != shard["tokens"]:
                return False
    return True


def prepare_out_dir(out_dir: str, settings: dict, overwrite: bool) -> bool:
    """Make out_dir ready for this run; returns False when it already holds exactly this run's result."""
    if is_complete(out_dir, settings):
        return False
    progress_path = os.path.join(out_dir, PROGRESS_NAME)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    # the same run, interrupted (progress file) or finished and then damaged (manifest): finish or repair it
    resuming = (os.path.isfile(progress_path) and json.loads(Path(progress_path).read_text()) == settings) or (
        os.path.isfile(manifest_path) and read_manifest(manifest_path).get("settings") == settings
    )
    for name in our_files(out_dir):
        if name.startswith(".tmp-") or (name == MANIFEST_NAME and resuming):
            os.remove(os.path.join(out_dir, name))  # half-written files; the manifest is written again at the end
        elif not resuming:
            if not overwrite:
                raise InputError(
                    f"{out_dir} already holds shards made with other settings or inputs ({name}, ...): "
                    "pass --overwrite to replace them, or choose another --out-dir"
                )
            os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    write_json(progress_path, settings)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Tokenize text with GPT-2's tokenizer into llm.c-format shards.")
    # what to tokenize
    parser.add_argument("--dataset", default="wikitext-103-raw-v1", choices=list(HUB_DATASETS),
                        help="WikiText variant to download from the Hugging Face hub (ignored with --input)")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="local UTF-8 text files or globs (not --dataset)")
    parser.add_argument("--val-input", nargs="+", metavar="FILE", help="with --input: files for the validation split")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="with --input and no --val-input: share of the text held out for validation (default 0.1)")
    # where and how
    parser.add_argument("--name", default=None, help="prefix of the shard names (default: dataset or first input file)")
    parser.add_argument("--out-dir", default=None, help="output folder (default: data/NAME)")
    parser.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard (20 MB per 10M tokens)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other settings in --out-dir")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1 token, got {args.shard_size}")
    if args.num_proc < 1:
        parser.error(f"--num-proc must be at least 1, got {args.num_proc}")
    if (args.val_input or args.val_fraction is not None) and not args.input:
        parser.error("--val-input and --val-fraction go with --input (a hub dataset has its own validation split)")
    if args.val_input and args.val_fraction is not None:
        parser.error("give --val-input or --val-fraction, not both")
    if args.input and not args.val_input and args.val_fraction is None:
        args.val_fraction = 0.1
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.name is None:
        args.name = Path(args.input[0]).name.split(".")[0] if args.input else HUB_DATASETS[args.dataset]
    if args.out_dir is None:
        args.out_dir = os.path.join("data", args.name)
    return args


def document_sources(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Iterator[str]]], dict]:
    """The document stream of each split, and a description of where it comes from (for the manifest)."""
    if not args.input:
        sources = {split: hub_documents(args.dataset, hub_split) for split, hub_split in HUB_SPLITS.items()}
        return sources, {"hub": "Salesforce/wikitext", "config": args.dataset}
    train_files = expand_inputs(args.input)
    source = {"input": train_files}
    if args.val_input:
        val_files = expand_inputs(args.val_input)
        source["val_input"] = val_files
        return {"train": lambda: file_documents(train_files), "val": lambda: file_documents(val_files)}, source
    all_text = describe(lambda: file_documents(train_files))
    train, val = split_off_validation(lambda: file_documents(train_files), all_text["characters"], args.val_fraction)
    source["val_fraction"] = args.val_fraction
    return {"train": train, "val": val}, source


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    start = time.perf_counter()
    get_tokenizer()  # a missing tokenizer is one line now, not an error inside every worker
    sources, source = document_sources(args)
    print(f"reading {', '.join(sources)} ...", file=sys.stderr)
    described = {split: describe(documents) for split, documents in sources.items()}
    # everything that decides the output bytes, and nothing else (not --num-proc, not where the inputs lie)
    settings = {
        "name": args.name,
        "content_sha256": {split: d["sha256"] for split, d in described.items()},
        "shard_size": args.shard_size,
        "tokenizer": "gpt2",
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "dtype": "uint16"},
    }
    if not prepare_out_dir(args.out_dir, settings, args.overwrite):
        print(f"{args.out_dir} already holds these shards (manifest.json matches): nothing to do")
        return

    splits = {}
    pool = multiprocessing.Pool(args.num_proc) if args.num_proc > 1 else None
    try:
        for split, documents in sources.items():
            writer = ShardWriter(args.out_dir, args.name, split, args.shard_size)
            n_docs = described[split]["documents"]
            tokenize_split(documents, n_docs, writer, pool)
            splits[split] = {"documents": n_docs, "tokens": writer.tokens, "shards": writer.shards}
    finally:
        if pool:
            pool.terminate()
    manifest = {
        "format": "llm.c token shards: a header of 256 int32 (magic, version, token count), then uint16 tokens",
        "tokenizer": "gpt2",
        "eot_token": EOT_TOKEN,
        "source": source,
        "settings": settings,
        "splits": splits,
    }
    write_json(os.path.join(args.out_dir, MANIFEST_NAME), manifest)
    os.remove(os.path.join(args.out_dir, PROGRESS_NAME))

    seconds = time.perf_counter() - start
    for split, info in splits.items():
        shards, docs = len(info["shards"]), info["documents"]
        print(f"{split:>5}: {info['tokens']:>13,} tokens in {shards} shards from {docs:,} documents")
    total = sum(info["tokens"] for info in splits.values())
    print(f"{total:,} tokens in {seconds:.1f} s ({total / seconds:,.0f} tok/s) -> {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)

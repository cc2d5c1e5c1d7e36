"""
Text -> GPT-2 tokens -> llm.c-format shards that train_gpt2.py (and llm.c) train on.

  python prepare_data.py                                       # WikiText-103 (raw, ~120M tokens) -> data/wikitext-103
  python prepare_data.py --dataset wikitext-2-raw-v1           # the small one -> data/wikitext-2
  python prepare_data.py --dataset tinyshakespeare            # 1 MB, downloaded once -> data/tinyshakespeare
  python prepare_data.py --dataset fineweb-edu --max-tokens 3e9   # streamed from the hub -> data/fineweb-edu
  python prepare_data.py --hf-dataset NAME_OR_FOLDER --text-column text   # any dataset, streamed
  python prepare_data.py --input 'corpus/*.txt' --val-input held_out.txt --name corpus   # local text, offline

Documents: WikiText (from the hub, or a local wiki.*.raw file) is split into its articles at the top-level
headings (" = Title = "); any other file is one document, and a streamed dataset's rows are its documents. Each
document starts with <|endoftext|>, so the model sees where one ends and the next begins. Validation: with
--input, --val-input or else the last --val-fraction of the text (cut at a line end); a streamed dataset's first
--val-docs documents, never also in train.

Output: {name}_{split}_{index:06d}.bin shards (split train, val, test) and manifest.json, in --out-dir. Every
file is written under a temporary name and renamed when complete, and the progress file records where each
complete shard ends in the documents: running the same command again after an interruption continues after the
last complete shard (a stream is skipped forward, read but not tokenized), with the same bytes as a run that was
never interrupted.
"""

import argparse
import itertools
import math
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from gpt2lite.cli import ArgumentParser, InputError, Problems, first_line, run_cli
from gpt2lite.files import read_json
from gpt2lite.gpt2_files import EOT_TOKEN, get_tokenizer
from gpt2lite.shards import (
    MANIFEST_NAME,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    read_manifest,
    shard_damage,
)
from gpt2lite.text_data import (
    TINY_SHAKESPEARE,
    Part,
    ShardWriter,
    cached_download,
    describe,
    expand_inputs,
    file_documents,
    hf_stream,
    hub_documents,
    split_off_validation,
    tokenize_part,
    write_json,
)

WIKITEXT = {"wikitext-103-raw-v1": "wikitext-103", "wikitext-2-raw-v1": "wikitext-2"}  # config -> short name
WIKITEXT_SPLITS = {"train": "train", "val": "validation", "test": "test"}
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # 10B tokens of FineWeb-Edu, the corpus build-nanogpt uses
DATASETS = [*WIKITEXT, "fineweb-edu", "tinyshakespeare"]
STREAM_VAL_DOCS = 10_000  # FineWeb-Edu's documents average about 1,000 tokens: ~10M validation tokens
PROGRESS_NAME = ".prepare-in-progress.json"  # an unfinished run: its settings, and each split's complete shards


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
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    return all(shard_damage(os.path.join(out_dir, shard["file"]), shard) is None for shard in shards)


def prepare_out_dir(out_dir: str, settings: dict, overwrite: bool) -> dict | None:
    """Make out_dir ready for this run. Returns None when it already holds exactly this run's result, else the
    progress to continue from: the complete shards of an interrupted (or finished, then damaged) run of the same
    settings, per split, or nothing for a fresh start."""
    if is_complete(out_dir, settings):
        return None
    progress = earlier_progress(out_dir, settings)
    for name in our_files(out_dir):
        if name.startswith(".tmp-") or (name == MANIFEST_NAME and progress):
            os.remove(os.path.join(out_dir, name))  # half-written files; the manifest is written again at the end
        elif not progress:
            if not overwrite:
                raise InputError(
                    f"{out_dir} already holds shards made with other settings or inputs ({name}, ...): "
                    "pass --overwrite to replace them, or choose another --out-dir"
                )
            os.remove(os.path.join(out_dir, name))
    progress = progress or {"settings": settings, "splits": {}}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, PROGRESS_NAME), progress)
    return progress


def earlier_progress(out_dir: str, settings: dict) -> dict | None:
    """The progress file (or else the manifest) of a run with these settings, keeping of each split the shards
    that are still whole, up to the first that is not: the run continues from there."""
    for name in (PROGRESS_NAME, MANIFEST_NAME):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            record = read_manifest(path) if name == MANIFEST_NAME else read_json(path, "progress file")
            if record.get("settings") == settings:
                break
    else:
        return None
    splits = {}
    for split, info in record["splits"].items():
        whole = whole_shards(out_dir, info["shards"])
        if whole and all("next_doc" in shard for shard in whole):  # shards of older versions start over
            done = whole == info["shards"] and info.get("done", True)  # a manifest's splits are all done
            splits[split] = {**info, "shards": whole, "done": done}
    return {"settings": settings, "splits": splits}


def whole_shards(out_dir: str, shards: list[dict]) -> list[dict]:
    """The shards up to the first damaged one, which is named with what is wrong (each file is read once)."""
    for i, shard in enumerate(shards):
        reason = shard_damage(os.path.join(out_dir, shard["file"]), shard)
        if reason:
            later = len(shards) - i - 1
            and_later = f", and the {later} after it" if later else ""
            print(f"{shard['file']} is damaged ({reason}): writing it again{and_later}", flush=True)
            return shards[:i]
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Tokenize text with GPT-2's tokenizer into llm.c-format shards.")
    # what to tokenize
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="a preset: WikiText from the hub, FineWeb-Edu's sample-10BT streamed from the hub, or "
                             "Tiny Shakespeare downloaded once (default: wikitext-103-raw-v1, unless --input or "
                             "--hf-dataset)")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="local UTF-8 text files or globs (not --dataset)")
    parser.add_argument("--val-input", nargs="+", metavar="FILE",
                        help="with --input: files for the validation split (default: the last --val-fraction of the "
                             "text)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="with --input (no --val-input) or tinyshakespeare: the share of the text held out for "
                             "validation (default 0.1)")
    # a dataset through the datasets library, streamed
    parser.add_argument("--hf-dataset", metavar="NAME_OR_PATH",
                        help="a dataset on the Hugging Face hub, or a local folder or glob of parquet, jsonl or arrow "
                             "files; streamed, its rows are the documents")
    parser.add_argument("--hf-config", default=None, help="with --hf-dataset: its configuration (default: none)")
    parser.add_argument("--hf-split", default="train", help="with --hf-dataset: the split to read (default: train)")
    parser.add_argument("--text-column", default="text", help="with --hf-dataset: the column of text (default: text)")
    parser.add_argument("--val-docs", type=int, default=None,
                        help=f"streamed datasets: the first N documents are the validation split (default: "
                             f"{STREAM_VAL_DOCS:,}, about 10M tokens of FineWeb-Edu)")
    parser.add_argument("--max-tokens", type=token_count, default=None,
                        help="streamed datasets: stop once the train split has this many tokens, e.g. 3e9 (default: "
                             "the whole dataset)")
    # where and how
    parser.add_argument("--name", default=None,
                        help="prefix of the shard names (default: the dataset's name, or the first input file's)")
    parser.add_argument("--out-dir", default=None, help="output folder (default: data/NAME)")
    parser.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard (20 MB per 10M tokens)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other settings in --out-dir")
    args = parser.parse_args(argv)
    problems = Problems()  # every mistake at once, a line each
    check_sources(args, problems)
    if args.shard_size < 1:
        problems.add(f"--shard-size must be at least 1 token, got {args.shard_size}")
    if args.num_proc < 1:
        problems.add(f"--num-proc must be at least 1, got {args.num_proc}")
    if args.hf_dataset:
        args.val_docs = STREAM_VAL_DOCS if args.val_docs is None else args.val_docs
        if args.val_docs < 1:
            problems.add(f"--val-docs must be at least 1, got {args.val_docs}")
        if args.max_tokens is not None and args.max_tokens < args.shard_size:
            problems.add(f"--max-tokens {args.max_tokens:,} is below one shard (--shard-size {args.shard_size:,}): ask "
                         "for more tokens, or for smaller shards")  # fmt: skip
    if (args.input or args.dataset == "tinyshakespeare") and not args.val_input and args.val_fraction is None:
        args.val_fraction = 0.1
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        problems.add(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    one_source = sum(map(bool, (args.input, args.hf_dataset, args.dataset not in (None, "fineweb-edu")))) == 1
    for patterns in (args.input, args.val_input):
        if patterns and one_source:  # the files too, with the flags (expand_inputs checks them again to read them)
            with problems:
                expand_inputs(patterns)
    problems.raise_any()
    if args.name is None:
        args.name = default_name(args)
    if args.out_dir is None:
        args.out_dir = os.path.join("data", args.name)
    return args


def token_count(text: str) -> int:
    """'3e9', '3000000000' or '3_000_000_000' -> 3000000000."""
    value = float(text)
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of tokens, at least 1, e.g. 3e9 (got {text!r})")
    return int(value)


def check_sources(args: argparse.Namespace, problems: Problems):
    """One source of text, and only the flags that go with it; the presets become what they stand for."""
    given = [flag for flag, value in (("--dataset", args.dataset), ("--input", args.input),
                                      ("--hf-dataset", args.hf_dataset)) if value]  # fmt: skip
    if len(given) > 1:
        problems.add(f"give one source of text: {' or '.join(given)}")
    if args.dataset == "fineweb-edu":
        if args.hf_config:
            problems.add("--hf-config goes with --hf-dataset: --dataset fineweb-edu reads sample-10BT")
        args.hf_dataset, args.hf_config = FINEWEB_EDU
    elif args.dataset is None and not args.input and not args.hf_dataset:
        args.dataset = "wikitext-103-raw-v1"
    stream_flags = {"--hf-config": args.hf_config, "--hf-split": args.hf_split != "train",
                    "--text-column": args.text_column != "text", "--val-docs": args.val_docs is not None,
                    "--max-tokens": args.max_tokens is not None}  # fmt: skip
    misplaced = [flag for flag, value in stream_flags.items() if value] if not args.hf_dataset else []
    if misplaced:
        problems.add(f"{misplaced[0]} goes with --hf-dataset or --dataset fineweb-edu (a streamed dataset)")
    if (args.val_input or args.val_fraction is not None) and not (args.input or args.dataset == "tinyshakespeare"):
        problems.add("--val-input and --val-fraction go with --input or --dataset tinyshakespeare (the other "
                     "datasets hold validation text of their own)")
    if args.val_input and args.val_fraction is not None:
        problems.add("give --val-input or --val-fraction, not both")
    if args.dataset == "tinyshakespeare" and args.val_input:
        problems.add("--val-input goes with --input; Tiny Shakespeare holds out --val-fraction of its text")


def default_name(args: argparse.Namespace) -> str:
    """fineweb-edu, tinyshakespeare, wikitext-103; HuggingFaceFW/fineweb-edu -> fineweb-edu; 'pq/*.parquet' -> pq;
    corpus/a.txt -> a."""
    if args.dataset:
        return WIKITEXT.get(args.dataset, args.dataset)
    if args.input:
        return Path(args.input[0]).name.split(".")[0]
    where = args.hf_dataset.rstrip("/")
    if any(c in where for c in "*?["):
        where = os.path.dirname(where)
    return Path(where).name.split(".")[0] or "dataset"


def document_parts(args: argparse.Namespace) -> tuple[list[Part], dict, dict]:
    """The splits to write, where their documents come from (for the manifest), and what identifies that text
    (for the settings: a run resumes only over the very same text)."""
    if args.hf_dataset:
        return stream_parts(args)
    if args.dataset == "tinyshakespeare":
        args.input = [cached_download(*TINY_SHAKESPEARE, "tinyshakespeare/input.txt")]
    if args.input:
        documents, source = file_sources(args)
        if args.dataset == "tinyshakespeare":
            source["download"] = TINY_SHAKESPEARE[0]
    else:
        documents = {split: hub_documents(args.dataset, hub_split) for split, hub_split in WIKITEXT_SPLITS.items()}
        source = {"hub": "Salesforce/wikitext", "config": args.dataset}
    print(f"reading {', '.join(documents)} ...", file=sys.stderr)
    described = {split: describe(docs) for split, docs in documents.items()}
    parts = [Part(split, skipping(docs), known_docs=described[split]["documents"]) for split, docs in documents.items()]
    return parts, source, {"content_sha256": {split: d["sha256"] for split, d in described.items()}}


def skipping(documents: Callable[[], Iterator[str]]) -> Callable[[int], Iterator[str]]:
    return lambda skip: itertools.islice(documents(), skip, None)


def file_sources(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Iterator[str]]], dict]:
    """Each split's documents from local files, and where they come from."""
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


def stream_parts(args: argparse.Namespace) -> tuple[list[Part], dict, dict]:
    """A streamed dataset: its first --val-docs documents are the val split, the rest train, up to --max-tokens."""
    print(f"opening {args.hf_dataset} ...", file=sys.stderr)
    stream = hf_stream(args.hf_dataset, args.hf_config, args.hf_split, args.text_column)
    val_docs = args.val_docs if stream.known_docs is None else min(args.val_docs, stream.known_docs)
    train_docs = None if stream.known_docs is None else stream.known_docs - val_docs
    parts = [Part("val", stream.documents, max_docs=args.val_docs, known_docs=val_docs),
             Part("train", lambda skip: stream.documents(args.val_docs + skip), max_tokens=args.max_tokens,
                  known_docs=train_docs)]  # fmt: skip
    return parts, stream.source, {"text": stream.identity, "val_docs": args.val_docs, "max_tokens": args.max_tokens}


def write_parts(args: argparse.Namespace, parts: list[Part], progress: dict) -> dict:
    """Tokenize each split into shards, continuing where `progress` stands and recording each complete shard in
    the progress file as it lands; returns the splits for the manifest."""
    progress_path = os.path.join(args.out_dir, PROGRESS_NAME)
    pool = multiprocessing.Pool(args.num_proc) if args.num_proc > 1 else None
    try:
        for part in parts:
            record = progress["splits"].setdefault(part.split, {"shards": [], "done": False})
            if not record["done"]:
                writer = ShardWriter(args.out_dir, args.name, part.split, args.shard_size, part.max_tokens,
                                     shards=record["shards"])  # fmt: skip
                writer.on_shard = lambda: (record.update(shards=writer.shards), write_json(progress_path, progress))
                tokenize_part(part, writer, pool, args.num_proc)
                record.update(shards=writer.shards, done=True, documents=writer.documents, tokens=writer.tokens)
                write_json(progress_path, progress)
            check_split(args, part.split, progress["splits"])  # again on a rerun: a split done is not a split right
    finally:
        if pool:
            pool.terminate()
    keys = ("documents", "tokens", "shards")
    return {part.split: {key: progress["splits"][part.split][key] for key in keys} for part in parts}


def check_split(args: argparse.Namespace, split: str, splits: dict):
    """Splits that came out empty, or a --max-tokens smaller than the validation split: one line each."""
    record = splits[split]
    if record["tokens"] == 0 and args.hf_dataset:
        held = splits["val"]["documents"]
        raise InputError(f"the {split} split is empty: the stream's {held:,} documents all went to validation "
                         f"(--val-docs {args.val_docs:,}): lower --val-docs")  # fmt: skip
    if split == "val" and args.max_tokens is not None and args.max_tokens < record["tokens"]:
        raise InputError(f"--max-tokens {args.max_tokens:,} is below the validation split's "
                         f"{record['tokens']:,} tokens (--val-docs {args.val_docs:,}): ask for more tokens, or fewer "
                         "--val-docs")  # fmt: skip


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    start = time.perf_counter()
    get_tokenizer()  # a missing tokenizer is one line now, not an error inside every worker
    parts, source, text = document_parts(args)
    # everything that decides the output bytes, and nothing else (not --num-proc, not where the inputs lie)
    settings = {
        "name": args.name,
        **text,
        "shard_size": args.shard_size,
        "tokenizer": "gpt2",
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "dtype": "uint16"},
    }
    progress = prepare_out_dir(args.out_dir, settings, args.overwrite)
    if progress is None:
        if os.path.isfile(os.path.join(args.out_dir, PROGRESS_NAME)):  # left by a kill after the manifest landed
            os.remove(os.path.join(args.out_dir, PROGRESS_NAME))
        print(f"{args.out_dir} already holds these shards (manifest.json matches): nothing to do")
        return
    try:
        splits = write_parts(args, parts, progress)
    except OSError as e:  # a connection dropped mid-stream, a full disk: the complete shards are kept
        raise InputError(f"stopped ({first_line(e)}): run the same command again, and it continues after the last "
                         "complete shard") from None  # fmt: skip
    except ValueError as e:  # a row the dataset's builder cannot parse (pyarrow's errors are ValueErrors)
        raise InputError(f"cannot read the text ({first_line(e)}): fix the data, or pass --overwrite with other "
                         "input; the complete shards are kept") from None  # fmt: skip
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

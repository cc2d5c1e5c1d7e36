"""
Text for training and evaluation: documents from local files or from WikiText on the Hugging Face hub, and the
pipeline that turns them into token shards, tokenizing on every core in order, so that the bytes written never
depend on the number of processes. prepare_data.py is its command line; evaluate.py reads WikiText through it.

Documents: WikiText (from the hub, or a local wiki.*.raw file) is split into its articles at the top-level
headings (" = Title = "); any other file is one document. Each document starts with <|endoftext|>, so the model
sees where one ends and the next begins. The shard format is train_gpt2.py's (llm.c's): this module imports the
chapter, so the chapter never imports it.
"""

import glob
import hashlib
import json
import os
import re
import time
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from common import InputError, first_line, read_text, write_atomically
from train_gpt2 import EOT_TOKEN, SHARD_DTYPE, get_tokenizer, shard_bytes, shard_name

WIKITEXT_FILE = re.compile(r"wiki\.\w+\.raw")  # wiki.train.raw, wiki.valid.raw, wiki.test.raw
ARTICLE_HEADING = re.compile(r" = [^=].* = ")  # " = Title = "; sections are " = = Section = = "
BATCH_CHARS = 256 << 10  # text per worker task: big enough that inter-process traffic costs little


# ----------------------------------------------------------------------------------------------------------------
# Documents


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """WikiText lines -> one string per article, each starting at its " = Title = " line. Joined, the articles
    give back the text exactly (a blank line before the first heading stays with the first article)."""
    article: list[str] = []
    for line in lines:
        if ARTICLE_HEADING.fullmatch(line.rstrip("\n")) and any(not kept.isspace() for kept in article):
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)


def file_documents(paths: list[str]) -> Iterator[str]:
    for path in paths:
        text = read_text(path)
        if WIKITEXT_FILE.fullmatch(os.path.basename(path)):
            yield from wikitext_articles(text.splitlines(keepends=True))
        else:
            yield text


def expand_inputs(patterns: list[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input pattern {pattern!r} matches no file")
        for path in matches:
            if os.path.isdir(path):
                raise InputError(f"input {path} is a folder: pass its files, e.g. --input '{path}/*.txt'")
            if not os.path.isfile(path):
                raise InputError(f"input file {path} does not exist")
            if os.path.getsize(path) == 0:
                raise InputError(f"input file {path} is empty")
            paths.append(path)
    return paths


def hub_documents(config: str, hub_split: str) -> Callable[[], Iterator[str]]:
    """WikiText from the Hugging Face hub, as articles. Its rows are the raw file's lines, with blank lines ("
    \\n" in the file) stored as empty strings: put them back, so the hub and a local wiki.*.raw give the same
    documents."""
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("Salesforce/wikitext", config, split=hub_split)
    except (OSError, ConnectionError, ValueError) as e:
        raise InputError(
            f"cannot download WikiText ({first_line(e)}; no network?): tokenize local text instead with --input, "
            "e.g. --input wiki.train.raw --val-input wiki.valid.raw"
        ) from None

    def lines() -> Iterator[str]:
        for batch in rows.iter(batch_size=10_000):
            for line in batch["text"]:
                yield line or " \n"

    return lambda: wikitext_articles(lines())


def split_off_validation(documents: Callable[[], Iterator[str]], total_chars: int, fraction: float):
    """Two document streams: the text's first (1 - fraction) and the rest, cut at a line end."""
    cut = round(total_chars * (1 - fraction))

    def parts() -> Iterator[tuple[str, str]]:
        seen = 0
        for doc in documents():
            if seen + len(doc) <= cut:
                yield "train", doc
            elif seen >= cut:
                yield "val", doc
            else:
                at = doc.rfind("\n", 0, cut - seen) + 1  # 0 when no line ends before the cut: all to val
                if at:
                    yield "train", doc[:at]
                yield "val", doc[at:]
            seen += len(doc)

    def train() -> Iterator[str]:
        return (doc for split, doc in parts() if split == "train")

    def val() -> Iterator[str]:
        return (doc for split, doc in parts() if split == "val")

    return train, val


def describe(documents: Callable[[], Iterator[str]]) -> dict:
    """Count and fingerprint a document stream (this reads it once, and checks that input files are UTF-8)."""
    n_docs, n_chars, digest = 0, 0, hashlib.sha256()
    for doc in documents():
        n_docs += 1
        n_chars += len(doc)
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")  # document boundaries are part of the content
    return {"documents": n_docs, "characters": n_chars, "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing and writing shards


def tokenize_documents(docs: list[str]) -> np.ndarray:
    """Documents -> one uint16 array: <|endoftext|>, then the document's tokens, for each."""
    enc = get_tokenizer()
    tokens = []
    for doc in docs:
        tokens.append(EOT_TOKEN)
        tokens.extend(enc.encode_ordinary(doc))
    return np.array(tokens, dtype=SHARD_DTYPE)  # GPT-2's ids are below 2**16


def batched(docs: Iterable[str], max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class ShardWriter:
    """Collects a split's tokens and writes them out shard_size at a time, each shard atomically.

    A shard already on disk with exactly the bytes it should have (left by an interrupted run) is kept as it is.
    """

    def __init__(self, out_dir: str, name: str, split: str, shard_size: int):
        self.out_dir, self.name, self.split = out_dir, name, split
        self.buffer = np.empty(shard_size, dtype=SHARD_DTYPE)
        self.filled = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray):
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        if self.filled == 0:
            return
        file = shard_name(self.name, self.split, len(self.shards))
        data = shard_bytes(self.buffer[: self.filled])
        sha256 = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.out_dir, file)
        if not (os.path.isfile(path) and os.path.getsize(path) == len(data) and file_sha256(path) == sha256):
            write_atomically(path, lambda f: f.write(data))
        self.shards.append({"file": file, "tokens": self.filled, "sha256": sha256})
        self.filled = 0

    @property
    def tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.shards) + self.filled


def write_json(path: str, obj: dict):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenize_split(documents: Callable[[], Iterator[str]], n_docs: int, writer: ShardWriter, pool) -> int:
    """Tokenize a split in order (so the bytes never depend on the number of processes); returns tokens written."""
    batches = batched(documents(), BATCH_CHARS)
    results = pool.imap(tokenize_documents, batches) if pool else map(tokenize_documents, batches)
    start = time.perf_counter()
    with tqdm(total=n_docs, unit="doc", desc=f"{writer.split:>5}", dynamic_ncols=True) as progress:
        for tokens in results:
            writer.add(tokens)
            progress.update(int(np.count_nonzero(tokens == EOT_TOKEN)))
            progress.set_postfix_str(f"{writer.tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
    writer.flush()
    return writer.tokens



"""
Text for training and evaluation: documents from local files or from WikiText on the Hugging Face hub, and the
pipeline that turns them into token shards, tokenizing on every core in order, so that the bytes written never
depend on the number of processes. prepare_data.py is its command line; evaluate.py reads WikiText through it.

Documents: WikiText (from the hub, or a local wiki.*.raw file) is split into its articles at the top-level
headings (" = Title = "); any other file is one document. Each document starts with <|endoftext|>, so the model
sees where one ends and the next begins. The shard format is llm.c's (shards.py).
"""

import collections
import glob
import hashlib
import http.client
import io
import itertools
import json
import os
import re
import sys
import urllib.request
import zipfile
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from gpt2lite.cli import InputError, Problems, first_line
from gpt2lite.files import read_text, write_atomically
from gpt2lite.gpt2_files import EOT_TOKEN, get_tokenizer
from gpt2lite.shards import SHARD_DTYPE, shard_bytes, shard_name

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
    """The files that --input's patterns name, after checking each: every bad one is a line of one InputError."""
    paths, problems = [], Problems()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            problems.add(f"--input pattern {pattern!r} matches no file")
        for path in matches:
            if os.path.isdir(path):
                problems.add(f"input {path} is a folder: pass its files, e.g. --input '{path}/*.txt'")
            elif not os.path.isfile(path):
                problems.add(f"input file {path} does not exist")
            elif os.path.getsize(path) == 0:
                problems.add(f"input file {path} is empty")
            else:
                paths.append(path)
    problems.raise_any()
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


STREAM_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}  # datasets' own


class Stream(NamedTuple):
    documents: Callable[[int], Iterator[str]]  # documents(skip): the texts after the first `skip`
    source: dict  # where the stream comes from, for the manifest
    identity: dict  # what tells this text from another (not where local files lie), for the settings
    known_docs: int | None  # how many documents it holds, where the dataset says


def hf_stream(name: str, config: str | None, split: str, text_column: str) -> Stream:
    """A dataset read through the `datasets` library, always streamed (nothing downloaded ahead, nothing held in
    memory): from the Hugging Face hub by name, or local parquet / jsonl / arrow files, a folder or a glob, which go
    through the library's own builders on the very same code path."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line instead
    path, data_files, identity = dataset_location(os.path.expanduser(name))
    identity |= {"config": config, "split": split, "text_column": text_column}
    source = {"hf_dataset": name, "config": config, "split": split, "text_column": text_column}
    try:
        revision = None
        if "hub" in identity:  # pinned: a run resumed after the dataset changed on the hub reads what it started on
            from huggingface_hub import HfApi

            revision = identity["revision"] = source["revision"] = HfApi().dataset_info(name).sha
        dataset = datasets.load_dataset(path, config, data_files=data_files, split=split, revision=revision,
                                        streaming=True)  # fmt: skip
        first = next(iter(dataset), None)
    except Exception as e:  # the library raises many kinds; each gets one line
        raise InputError(dataset_error(name, e)) from None
    if first is None:
        raise InputError(f"dataset {name} holds no rows (split {split})")
    if text_column not in first:
        raise InputError(f"dataset {name} has no column {text_column!r}: its columns are {', '.join(first)}; "
                         "choose one with --text-column")  # fmt: skip

    def documents(skip: int) -> Iterator[str]:
        for row in dataset.skip(skip) if skip else dataset:
            text = row[text_column]
            if not isinstance(text, str):
                raise InputError(f"column {text_column!r} of {name} holds {type(text).__name__}, not text")
            yield text

    splits = getattr(dataset.info, "splits", None) or {}
    known = splits[split].num_examples if split in splits else None
    return Stream(documents, source, identity, known or None)


def dataset_location(name: str) -> tuple[str, list[str] | None, dict]:
    """--hf-dataset -> (path, data_files, identity) for datasets.load_dataset: a local folder as it is, local files
    (a glob or one file) through the builder their extension names, anything else a name on the hub."""
    if os.path.isdir(name):
        files = [f for f in sorted(glob.glob(os.path.join(name, "**", "*"), recursive=True)) if os.path.isfile(f)]
        return name, None, {"files": local_files(files, name)}
    files = sorted(glob.glob(name)) if glob.has_magic(name) else [name] if os.path.isfile(name) else []
    if not files:
        if glob.has_magic(name) or name.startswith((".", "/")):
            raise InputError(f"--hf-dataset {name} matches no local file or folder")
        return name, None, {"hub": name}
    builders = {STREAM_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if len(builders) != 1 or None in builders:
        kinds = sorted({os.path.splitext(f)[1] or "(no extension)" for f in files})
        raise InputError(f"--hf-dataset {name}: give files of one kind, {', '.join(STREAM_BUILDERS)} (got "
                         f"{', '.join(kinds)})")  # fmt: skip
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return builders.pop(), files, {"files": local_files(files, root)}


def local_files(paths: list[str], root: str) -> list[list]:
    """Names within root, and sizes: enough to tell one local dataset from another when a run resumes, wherever the
    folder has moved to."""
    return [[os.path.relpath(os.path.abspath(p), root), os.path.getsize(p)] for p in paths]


def dataset_error(name: str, e: Exception) -> str:
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.utils import RepositoryNotFoundError  # where every version of the library has it

    local = "--hf-dataset also takes a local folder, or a glob of parquet, jsonl or arrow files"
    if isinstance(e, (DatasetNotFoundError, RepositoryNotFoundError)):
        return f"dataset {name} is not on the Hugging Face hub (check the name; a gated one needs a login); {local}"
    if isinstance(e, ConnectionError):
        return f"cannot reach the Hugging Face hub for {name} ({first_line(e)}; no network?): {local}"
    message = first_line(e)
    if isinstance(e, StopIteration) or "must be greater than 0, got 0" in message:  # how its builders meet no rows
        return f"dataset {name} holds no rows"
    if "BuilderConfig" in message or "Config name" in message:
        return f"--hf-config: {message}"
    if "split" in message.lower():
        return f"--hf-split: {message}"
    return f"cannot read dataset {name}: {message}"


# real text that scripts download once into the cache, each checked against the sha256 of the published file
TINY_SHAKESPEARE = (  # nanoGPT's Shakespeare text (karpathy/char-rnn)
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
WIKITEXT2_RAW_ZIP = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"  # the official
WIKITEXT2_VALID = ("wikitext-2-raw/wiki.valid.raw", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7")


def cache_dir() -> str:
    return os.environ.get("GPT2_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-lite")


def cached_download(url: str, sha256: str, name: str, member: str | None = None) -> str:
    """The path of a file downloaded once into the cache ($GPT2_LITE_CACHE, default ~/.cache/gpt2-lite), checked
    against its sha256 each time it is used. With member, url is a zip archive and the file is that member of it."""
    path = os.path.join(cache_dir(), name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"{path} is not the file from {url} (its sha256 differs): delete it to download it again")
        return path
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise InputError(f"cannot download {url} ({first_line(e)}; no network?): put that file at {path}") from None
    if member is not None:
        try:
            data = zipfile.ZipFile(io.BytesIO(data)).read(member)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise InputError(f"{url} is not a zip holding {member} ({first_line(e)}); try again") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(f"the file downloaded from {url} is not the one expected (its sha256 differs); try again")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, lambda f: f.write(data))
    except OSError as e:
        raise InputError(f"cannot write {path} ({first_line(e)}): set $GPT2_LITE_CACHE to a writable folder") from None
    return path


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


def tokenize_documents(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (tokens, lengths): <|endoftext|> then the document's tokens, for each, in one uint16 array, and
    each document's share of it (so that a shard's end can be placed at a document and an offset into it)."""
    enc = get_tokenizer()
    tokens, lengths = [], []
    for doc in docs:
        start = len(tokens)
        tokens.append(EOT_TOKEN)
        tokens.extend(enc.encode_ordinary(doc))
        lengths.append(len(tokens) - start)
    return np.array(tokens, dtype=SHARD_DTYPE), np.array(lengths, dtype=np.int64)  # GPT-2's ids are below 2**16


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


def in_order(fn: Callable, items: Iterable, pool, ahead: int) -> Iterator:
    """map(fn, items) on the pool's processes, results in input order, with at most `ahead` items in flight.

    Pool.imap would do the rest, but it reads its input as fast as it can and queues every result it is not yet
    asked for: a streamed corpus of billions of tokens would pile up in memory. Here the input is read only as
    fast as results are used, so memory is bounded by `ahead` batches, however long the stream."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ShardWriter:
    """Collects a split's tokens and writes them out shard_size at a time, each shard atomically, stopping at
    max_tokens if given. Each shard's record says where the next one starts in the split's documents (a document
    index and a token offset into it), which is all it takes to resume after the last complete shard."""

    def __init__(self, out_dir: str, name: str, split: str, shard_size: int, max_tokens: int | None = None,
                 shards: list[dict] | None = None):  # fmt: skip
        self.out_dir, self.name, self.split = out_dir, name, split
        self.buffer = np.empty(shard_size, dtype=SHARD_DTYPE)
        self.filled = 0
        self.max_tokens = max_tokens
        self.on_shard: Callable[[], None] = lambda: None  # called after each shard is on disk
        self.shards: list[dict] = list(shards or [])  # those of an interrupted run, to continue after
        self.written = sum(shard["tokens"] for shard in self.shards)
        last = self.shards[-1] if self.shards else {"next_doc": 0, "next_offset": 0}
        self.next_doc, self.next_offset = last["next_doc"], last["next_offset"]

    def add_document(self, tokens: np.ndarray, offset: int = 0) -> bool:
        """Add the document next_doc, from its token `offset` on (those before are in the shards already). Returns
        False once max_tokens is reached: the rest of the split is not wanted."""
        doc, end = self.next_doc, len(tokens)
        while offset < end:
            if self.max_tokens is not None and self.tokens == self.max_tokens:
                self.next_doc, self.next_offset = doc, offset
                return False
            n = min(end - offset, len(self.buffer) - self.filled)
            if self.max_tokens is not None:
                n = min(n, self.max_tokens - self.tokens)
            self.buffer[self.filled : self.filled + n] = tokens[offset : offset + n]
            self.filled += n
            offset += n
            if self.filled == len(self.buffer):
                self.next_doc, self.next_offset = (doc, offset) if offset < end else (doc + 1, 0)
                self.flush()
        self.next_doc, self.next_offset = doc + 1, 0
        return self.max_tokens is None or self.tokens < self.max_tokens

    def flush(self):
        """Write what the buffer holds as the next shard (the split's last, when called at its end)."""
        if self.filled == 0:
            return
        file = shard_name(self.name, self.split, len(self.shards))
        data = shard_bytes(self.buffer[: self.filled])
        write_atomically(os.path.join(self.out_dir, file), lambda f: f.write(data))
        self.shards.append({"file": file, "tokens": self.filled, "sha256": hashlib.sha256(data).hexdigest(),
                            "next_doc": self.next_doc, "next_offset": self.next_offset})  # fmt: skip
        self.written += self.filled
        self.filled = 0
        self.on_shard()

    @property
    def tokens(self) -> int:
        return self.written + self.filled

    @property
    def documents(self) -> int:
        """Documents with tokens in this split so far (the last one in part, when max_tokens cut it)."""
        return self.next_doc + (self.next_offset > 0)


def write_json(path: str, obj: dict):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


class Part(NamedTuple):
    """A split's documents, and where it stops."""

    split: str
    documents: Callable[[int], Iterator[str]]  # documents(skip): all but the first `skip`, so a run can continue
    max_docs: int | None = None
    max_tokens: int | None = None
    known_docs: int | None = None  # how many documents there are, where known: the progress bar's time left


def tokenize_part(part: Part, writer: ShardWriter, pool, workers: int = 1) -> None:
    """Tokenize a split in order, from where its writer stands, into shards. In order, so that the bytes never
    depend on the number of processes, nor on how often the run was interrupted."""
    skip, offset = writer.next_doc, writer.next_offset
    docs = part.documents(skip)
    if part.max_docs is not None:
        docs = itertools.islice(docs, max(0, part.max_docs - skip))
    # two batches per worker: each has the next to start on while a result is collected
    batches = in_order(tokenize_documents, batched(docs, BATCH_CHARS), pool, ahead=2 * workers)
    with split_progress(part, writer) as progress:
        for tokens in document_tokens(batches):
            before = writer.tokens
            more = writer.add_document(tokens, offset)
            progress.update(writer.tokens - before if progress.unit == "tok" else 1)
            offset = 0
            if writer.next_doc % 256 == 0 or not more:
                progress.set_postfix_str(f"{writer.documents:,} docs, {writer.tokens:,} tokens", refresh=False)
            if not more:
                break
    writer.flush()


def document_tokens(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    """tokenize_documents' (tokens, lengths) batches -> each document's tokens."""
    for tokens, lengths in batches:
        start = 0
        for length in lengths.tolist():
            yield tokens[start : start + length]
            start += length


def split_progress(part: Part, writer: ShardWriter) -> tqdm:
    """A bar in tokens towards max_tokens, or in documents where their number is known (each with its time left),
    else a count of tokens and their rate; resumed runs start it where they stand."""
    desc = f"{part.split:>5}"
    if part.max_tokens is not None or part.known_docs is None:
        return tqdm(total=part.max_tokens, initial=writer.tokens, unit="tok", unit_scale=True, desc=desc,
                    dynamic_ncols=True)  # fmt: skip
    return tqdm(total=part.known_docs, initial=writer.next_doc, unit="doc", desc=desc, dynamic_ncols=True)

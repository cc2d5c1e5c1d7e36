"""
Token shards on disk, in llm.c's format so that llm.c trains on our data and we on its: a header of 256 int32
(magic, version, token count, zeros), then the tokens as uint16 (GPT-2's 50,257 ids fit in 16 bits, half the disk
of int32). manifest.json beside the shards lists each one's tokens and sha256, the tokenizer, the source and the
settings. text_data.py writes shards with these definitions; train_gpt2.DataLoader reads them.
"""

import hashlib
import os
import re

import numpy as np

from gpt2lite.cli import InputError, first_line
from gpt2lite.files import read_json
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_DTYPE = np.uint16
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}_{split}_{index:06d}.bin"


def shard_bytes(tokens: np.ndarray) -> bytes:
    """A whole shard file's contents: header, then the tokens as uint16."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    return header.tobytes() + tokens.astype(SHARD_DTYPE, copy=False).tobytes()


def load_tokens(path: str) -> np.ndarray:
    """A shard's tokens as a read-only memory map (nothing is read until it is used), after checking the header."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    except OSError as e:
        raise InputError(f"cannot read {path} ({first_line(e)})") from None
    if len(header) < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise InputError(f"{path} is not a token shard (no llm.c header, magic {SHARD_MAGIC} version {SHARD_VERSION})")
    n_tokens = int(header[2])
    size = os.path.getsize(path)
    if size != SHARD_HEADER_BYTES + n_tokens * 2:
        raise InputError(
            f"{path} holds {(size - SHARD_HEADER_BYTES) // 2:,} tokens but its header says {n_tokens:,}: "
            "the file is truncated or corrupt; run the prepare_data.py command that made it again, which rewrites it"
        )
    return np.memmap(path, dtype=SHARD_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(n_tokens,))


def checked_tokens(path: str) -> np.ndarray:
    """load_tokens, after checking that every id is one of GPT-2's: a flipped bit that makes an id past the
    vocabulary would otherwise end training in an IndexError deep inside the embedding. One read of the shard."""
    tokens = load_tokens(path)
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= GPT2_VOCAB_SIZE:
        raise InputError(
            f"{path} holds token id {largest:,}, past GPT-2's {GPT2_VOCAB_SIZE:,}: the shard is damaged; run the "
            "prepare_data.py command that made it again, which finds and rewrites damaged shards"
        )
    return tokens


def read_manifest(path: str) -> dict:
    manifest = read_json(path, "manifest", ": run prepare_data.py again")
    if manifest.get("tokenizer") != "gpt2":
        raise InputError(f"{path}: the data was tokenized with {manifest.get('tokenizer')!r}, not GPT-2's 'gpt2'")
    return manifest


def find_shards(data_dir: str, split: str) -> list[str]:
    """The shard files of one split, checked against manifest.json when there is one (llm.c's shards have none)."""
    if not os.path.isdir(data_dir):
        raise InputError(f"data folder {data_dir} does not exist: run prepare_data.py first, or pass --data-dir")
    manifest_path = os.path.join(data_dir, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        manifest = read_manifest(manifest_path)
        entries = manifest["splits"].get(split, {}).get("shards", [])
        paths = [os.path.join(data_dir, entry["file"]) for entry in entries]
        for path, entry in zip(paths, entries):
            if not os.path.isfile(path):
                raise InputError(f"{path} is listed in {manifest_path} but missing: run prepare_data.py again")
            if len(load_tokens(path)) != entry["tokens"]:
                raise InputError(f"{path} does not hold the {entry['tokens']:,} tokens {manifest_path} lists")
    else:
        pattern = re.compile(rf".+_{split}_\d{{6}}\.bin")
        paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if pattern.fullmatch(f))
    if not paths:
        raise InputError(f"{data_dir} holds no {split} shards (*_{split}_NNNNNN.bin): run prepare_data.py first")
    return paths


def shard_damage(path: str, entry: dict) -> str | None:
    """What is wrong with a shard file against its manifest entry (size, header, sha256), or None when it is the
    file prepare_data.py wrote: the reason a rerun rewrites it."""
    expected = SHARD_HEADER_BYTES + 2 * entry["tokens"]
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != expected:
        return f"{size:,} bytes where the manifest's {entry['tokens']:,} tokens make {expected:,}"
    header = np.fromfile(path, dtype=np.int32, count=3)
    if list(header) != [SHARD_MAGIC, SHARD_VERSION, entry["tokens"]]:
        return "its header is not the shard header it was written with"
    if "sha256" in entry:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            return "its sha256 differs from the manifest's: some bytes changed"
    return None

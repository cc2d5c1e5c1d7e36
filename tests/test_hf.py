"""Hugging Face weights in and out: our logits equal transformers' GPT2LMHeadModel, both ways.

A random GPT2LMHeadModel (transformers' own initialisation, no download) stands in for OpenAI's weights;
the real `gpt2` is compared too when transformers has it cached.

python -m pytest tests/test_hf.py -q
"""

import json

import pytest
import torch
from transformers import GPT2LMHeadModel, pipeline

from conftest import random_hf_model, tiny_config
from gpt2lite.checkpoints import save_checkpoint
from gpt2lite.cli import InputError
from gpt2lite.gpt2_files import GPT2_VOCAB_SIZE
from train_gpt2 import GPT, GPTConfig, get_tokenizer, load_model


def assert_same_logits_and_loss(hf_model: GPT2LMHeadModel, model: GPT, tokens: torch.Tensor):
    model.eval()
    with torch.no_grad():
        hf_out = hf_model(tokens, labels=tokens)  # transformers shifts the labels itself
        logits, loss = model(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(logits, hf_out.logits[:, :-1], rtol=0, atol=1e-4)
    torch.testing.assert_close(loss, hf_out.loss, rtol=0, atol=1e-5)


def test_small_model_matches_transformers_through_a_saved_directory(tmp_path):
    hf_model = random_hf_model(tiny_config())
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config == tiny_config()
    assert_same_logits_and_loss(hf_model, model, torch.randint(0, 64, (3, 16)))


def test_124m_model_matches_transformers():
    hf_model = random_hf_model(GPTConfig())
    model = GPT(GPTConfig())
    model.load_hf_state_dict(hf_model.state_dict())
    assert_same_logits_and_loss(hf_model, model, torch.randint(0, GPT2_VOCAB_SIZE, (2, 64)))


def test_real_gpt2_matches_transformers_when_cached():
    try:
        hf_model = GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True).eval()
    except OSError:
        pytest.skip("OpenAI's gpt2 is not in the Hugging Face cache (this test never downloads)")
    model = GPT.from_pretrained("gpt2")
    tokens = torch.tensor([get_tokenizer().encode_ordinary("Hello, I'm a language model, and I can")])
    assert_same_logits_and_loss(hf_model, model, tokens)


def test_hugging_face_to_ours_to_hugging_face_gives_identical_logits(tmp_path):
    hf_model = random_hf_model(tiny_config(vocab_size=96), seed=3)
    hf_model.save_pretrained(tmp_path / "in")
    GPT.from_pretrained(str(tmp_path / "in")).save_pretrained(str(tmp_path / "out"))
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)


def test_export_writes_config_and_safetensors(gpt2_vocab_hf_dir):
    names = {p.name for p in gpt2_vocab_hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"} <= names
    assert not any(name.startswith(".tmp") for name in names)
    config = json.loads((gpt2_vocab_hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["vocab_size"] == GPT2_VOCAB_SIZE


def test_exported_model_runs_in_a_transformers_pipeline(gpt2_vocab_hf_dir):
    model = GPT.from_pretrained(str(gpt2_vocab_hf_dir)).eval()
    generator = pipeline("text-generation", model=str(gpt2_vocab_hf_dir))
    prompt = "Hello, I'm a language model,"
    ids = torch.tensor([get_tokenizer().encode_ordinary(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(generator.model(ids).logits, model(ids)[0], rtol=0, atol=1e-5)
    out = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True, eos_token_id=None)
    assert out[0]["generated_token_ids"] == model.generate(ids, 12, temperature=0)[0].tolist()


def test_padded_vocabulary_exports_its_first_50257_rows(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304)).eval()
    model.save_pretrained(str(tmp_path))
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.vocab_size == GPT2_VOCAB_SIZE
    assert torch.equal(hf_model.transformer.wte.weight, model.transformer.wte.weight[:GPT2_VOCAB_SIZE])
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens)[0][..., :GPT2_VOCAB_SIZE], rtol=0, atol=1e-5)


def test_export_into_an_existing_folder_keeps_its_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    GPT(tiny_config()).save_pretrained(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.safetensors").is_file()


def test_checkpoint_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, step=7)
    loaded = load_model(str(tmp_path / "ckpt.pt")).eval()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 7


def test_key_mismatch_names_the_keys():
    model = GPT(tiny_config())
    hf_state = random_hf_model(tiny_config()).state_dict()
    hf_state.pop("transformer.h.1.mlp.c_fc.bias")
    hf_state["transformer.h.1.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"missing \['transformer.h.1.mlp.c_fc.bias'\].*extra"):
        model.load_hf_state_dict(hf_state)


def test_old_transformers_mask_buffers_are_skipped():
    hf_model = random_hf_model(tiny_config())
    hf_state = dict(hf_model.state_dict())
    hf_state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))  # as transformers 4.x saved it
    hf_state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    model = GPT(tiny_config())
    model.load_hf_state_dict(hf_state)
    assert_same_logits_and_loss(hf_model, model, torch.randint(0, 64, (1, 16)))


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(InputError, match="unknown model 'gpt-5'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT.from_pretrained("gpt-5")


def test_directory_without_gpt2(tmp_path):
    with pytest.raises(InputError, match="holds no GPT-2: no config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="holds a 'llama' model, not GPT-2"):
        GPT.from_pretrained(str(tmp_path))
    random_hf_model(tiny_config()).config.save_pretrained(tmp_path)  # a GPT-2 config, but no weights
    with pytest.raises(InputError, match="holds no GPT-2 weights"):
        GPT.from_pretrained(str(tmp_path))


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a readable gpt2-lite checkpoint"):
        load_model(str(tmp_path / "notes.txt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="no 'model' and 'model_config'"):
        load_model(str(tmp_path / "other.pt"))
    save_checkpoint(str(tmp_path / "mismatch.pt"), GPT(tiny_config()), step=1)
    state = torch.load(tmp_path / "mismatch.pt", weights_only=True)
    state["model_config"]["n_layer"] = 3
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(InputError, match="its weights do not fit this model"):
        load_model(str(tmp_path / "mismatch.pt"))
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))

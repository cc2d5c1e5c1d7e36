"""Data: prepare_data.py turns text into shards whose tokens are exactly tiktoken's, and the DataLoader streams
them back in (B, T) windows, per DDP rank, across shards and epochs, resumable from three numbers.

python -m pytest tests/test_data.py -q
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
import text_data
from conftest import REPO, shared_file
from train_gpt2 import EOT_TOKEN, DataLoader, get_tokenizer, load_tokens

WORDS = "the of and to in a is was for on as with by he at from his an were are which this be or had".split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic prose-like text with line breaks, so tests need no shared data."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_words // 9)]
    return "\n".join(lines) + "\n"


def write_files(folder: Path, texts: dict[str, str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [str(folder / name) for name in texts]


def prepare(*args: str):
    prepare_data.main([*args])


def read_split(out_dir: Path, split: str) -> np.ndarray:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    shards = [load_tokens(str(out_dir / s["file"])) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(shards)


def expected_tokens(documents: list[str]) -> list[int]:
    enc = get_tokenizer()
    return [t for doc in documents for t in [EOT_TOKEN, *enc.encode_ordinary(doc)]]


@pytest.fixture
def corpus(tmp_path) -> dict:
    docs = {"a.txt": "First document.\nIt has two lines.\n", "b.txt": "Second: ünïcödé 😀, numbers 3.14\n",
            "c.txt": make_text(3000, seed=1)}
    val = {"v.txt": make_text(600, seed=2)}
    return {"train": write_files(tmp_path / "in", docs), "val": write_files(tmp_path / "in", val),
            "train_docs": list(docs.values()), "val_docs": list(val.values()), "out": tmp_path / "out"}


def test_shards_hold_tiktoken_tokens_with_eot_before_each_document(corpus):
    prepare("--input", *corpus["train"], "--val-input", *corpus["val"], "--out-dir", str(corpus["out"]),
            "--shard-size", "500", "--num-proc", "1")
    train, val = read_split(corpus["out"], "train"), read_split(corpus["out"], "val")
    assert train.tolist() == expected_tokens(corpus["train_docs"])
    assert val.tolist() == expected_tokens(corpus["val_docs"])
    manifest = json.loads((corpus["out"] / "manifest.json").read_text())
    assert manifest["tokenizer"] == "gpt2" and manifest["splits"]["train"]["documents"] == 3
    assert len(manifest["splits"]["train"]["shards"]) == -(-len(train) // 500)
    header = np.fromfile(corpus["out"] / "a_train_000000.bin", dtype=np.int32, count=256)  # named after a.txt
    assert header[:3].tolist() == [20240520, 1, 500] and not header[3:].any()

    loader = DataLoader(str(corpus["out"]), "train", batch_size=2, seq_len=8, shuffle=False)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.long
    assert x.flatten().tolist() == train[:16].tolist()
    assert y.flatten().tolist() == train[1:17].tolist()


def test_val_fraction_holds_out_the_end_of_the_text(tmp_path):
    text = make_text(4000, seed=3)
    files = write_files(tmp_path / "in", {"book.txt": text})
    prepare("--input", *files, "--val-fraction", "0.2", "--out-dir", str(tmp_path / "out"), "--num-proc", "1")
    cut = text.rfind("\n", 0, round(len(text) * 0.8)) + 1
    assert read_split(tmp_path / "out", "train").tolist() == expected_tokens([text[:cut]])
    assert read_split(tmp_path / "out", "val").tolist() == expected_tokens([text[cut:]])


def test_wikitext_file_splits_into_its_60_articles():
    path = shared_file("wikitext-2-raw/wiki.valid.raw")
    articles = list(text_data.file_documents([str(path)]))
    assert len(articles) == 60
    assert "".join(articles) == path.read_text(encoding="utf-8")
    assert articles[1].startswith(" = Frank Headlam = \n")  # each article opens with its " = Title = " line
    assert all(a.lstrip(" \n").startswith("= ") and not a.lstrip(" \n").startswith("= =") for a in articles)


def test_hub_rows_give_the_same_articles_as_the_raw_file(monkeypatch):
    raw = " \n = Alpha = \n \n Text about alpha .\n \n = = Section = = \n \n More .\n \n = Beta = \n \n Beta text .\n"
    rows = [line if line != " \n" else "" for line in raw.splitlines(keepends=True)]  # how the hub stores them

    class FakeRows:
        def iter(self, batch_size):
            yield {"text": rows}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: FakeRows())
    from_hub = list(text_data.hub_documents("wikitext-2-raw-v1", "validation")())
    from_file = list(text_data.wikitext_articles(raw.splitlines(keepends=True)))
    assert from_hub == from_file and len(from_file) == 2


def test_same_bytes_whatever_the_number_of_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(text_data, "BATCH_CHARS", 2000)  # many tasks, so two workers really share the work
    files = write_files(tmp_path / "in", {f"doc{i}.txt": make_text(400, seed=i) for i in range(30)})
    for n in ("1", "2"):
        prepare("--input", *files, "--out-dir", str(tmp_path / n), "--shard-size", "1000", "--num-proc", n)
    assert sorted(os.listdir(tmp_path / "1")) == sorted(os.listdir(tmp_path / "2"))
    for name in os.listdir(tmp_path / "1"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def kill_after_shards(command: list[str], out_dir: Path, n_shards: int):
    """Run prepare_data.py's command into out_dir and SIGKILL it once n_shards train shards are there."""
    process = subprocess.Popen([*command, "--out-dir", str(out_dir)], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out_dir.glob("*_train_*.bin"))) < n_shards and process.poll() is None:
        assert time.monotonic() < deadline, f"no {n_shards} shards within two minutes"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out_dir / "manifest.json").exists(), "the run finished before it could be killed"


def test_a_run_killed_midway_finishes_with_the_same_bytes(tmp_path):
    files = write_files(tmp_path / "in", {f"doc{i}.txt": make_text(2000, seed=i) for i in range(40)})
    command = [sys.executable, "prepare_data.py", "--input", *files, "--shard-size", "300", "--num-proc", "1"]
    subprocess.run([*command, "--out-dir", str(tmp_path / "clean")], cwd=REPO, check=True, capture_output=True)

    killed = tmp_path / "killed"
    kill_after_shards(command, killed, 10)
    # every shard that looks finished is finished; the kill may leave a half-written .tmp-* file, which is no shard
    for path in (path for path in killed.glob("*.bin") if not path.name.startswith(".tmp-")):
        assert len(load_tokens(str(path))) == 300

    subprocess.run([*command, "--out-dir", str(killed)], cwd=REPO, check=True, capture_output=True)
    assert sorted(os.listdir(killed)) == sorted(os.listdir(tmp_path / "clean"))
    for name in os.listdir(killed):
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


# --- the loader ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    files = write_files(folder / "in", {f"doc{i}.txt": make_text(3000, seed=i) for i in range(6)})
    prepare_data.main(["--input", *files, "--out-dir", str(folder / "out"), "--shard-size", "2000", "--num-proc", "1"])
    return folder / "out"


def test_ranks_read_disjoint_windows_that_together_equal_one_big_batch(shards):
    world = 3
    ranks = [DataLoader(str(shards), "train", 2, 16, rank=r, world_size=world, seed=5) for r in range(world)]
    single = DataLoader(str(shards), "train", 2 * world, 16, seed=5)
    for _ in range(40):  # several shards and an epoch boundary
        xs, ys = zip(*(loader.next_batch() for loader in ranks))
        x, y = single.next_batch()
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
        windows = [tuple(t.flatten().tolist()) for t in xs]
        assert len(set(windows)) == world


def test_walks_every_shard_then_reshuffles_for_the_next_epoch(shards):
    loader = DataLoader(str(shards), "train", 4, 32, seed=1)
    n_shards = len(loader.paths)
    assert n_shards >= 5
    orders = [loader.shard_order(epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(n_shards)) for order in orders)
    assert len({tuple(order) for order in orders}) > 1, "shard order should change between epochs"
    assert DataLoader(str(shards), "train", 4, 32, seed=1).shard_order(2) == orders[2]  # the seed decides
    seen_epochs = set()
    for _ in range(200):
        loader.next_batch()
        seen_epochs.add(loader.epoch)
    assert seen_epochs >= {0, 1}


def test_state_restores_the_very_next_batch(shards):
    loader = DataLoader(str(shards), "train", 3, 24, seed=2)
    for _ in range(37):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint's round trip
    expected = [loader.next_batch() for _ in range(30)]
    resumed = DataLoader(str(shards), "train", 3, 24, seed=2)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_validation_starts_at_the_same_place_after_reset(shards):
    loader = DataLoader(str(shards), "val", 2, 16, shuffle=False)
    first = [loader.next_batch()[0] for _ in range(3)]
    loader.reset()
    assert all(torch.equal(loader.next_batch()[0], x) for x in first)


# --- bad input ----------------------------------------------------------------------------------------------------


def run_prepare(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("prepare_data.py: error: "), result.stderr
    assert pattern in errors[0], errors[0]


def test_bad_input_files(tmp_path):
    good = write_files(tmp_path, {"good.txt": "fine text\n"})[0]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok so far, then caf\xe9".encode("latin-1"))
    out = ["--out-dir", str(tmp_path / "out")]
    assert_one_line_error(run_prepare("--input", str(tmp_path / "missing.txt"), *out), "missing.txt does not exist")
    assert_one_line_error(run_prepare("--input", str(tmp_path / "nothing*.txt"), *out), "matches no file")
    assert_one_line_error(run_prepare("--input", str(tmp_path / "empty.txt"), *out), "empty.txt is empty")
    assert_one_line_error(run_prepare("--input", str(tmp_path), *out), "is a folder: pass its files")
    assert_one_line_error(run_prepare("--input", good, "--val-input", str(tmp_path / "latin1.txt"), *out),
                          "latin1.txt is not UTF-8 text: byte 0xe9 at offset 19")
    assert_one_line_error(run_prepare("--input", good, "--val-fraction", "1.5", *out), "--val-fraction must be")
    assert_one_line_error(run_prepare("--val-fraction", "0.1", *out), "go with --input")
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are known to be good"


def test_no_network_for_the_hub_says_to_use_input(tmp_path):
    result = run_prepare("--dataset", "wikitext-2-raw-v1", "--out-dir", str(tmp_path / "out"),
                         HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert_one_line_error(result, "cannot download WikiText")
    assert "--input" in result.stderr


def test_shards_from_other_settings_are_kept_unless_overwrite(tmp_path):
    files = write_files(tmp_path / "in", {"book.txt": make_text(2000, seed=4)})
    out = tmp_path / "out"
    prepare("--input", *files, "--out-dir", str(out), "--shard-size", "1000", "--num-proc", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_prepare("--input", *files, "--out-dir", str(out), "--shard-size", "700")
    assert_one_line_error(result, "already holds shards made with other settings")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare("--input", *files, "--out-dir", str(out), "--shard-size", "700", "--num-proc", "1", "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["shard_size"] == 700
    assert all(s["tokens"] <= 700 for s in manifest["splits"]["train"]["shards"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    ), "no shard of the old settings is left behind"


def test_loader_refuses_bad_data(tmp_path, shards):
    from train_gpt2 import InputError

    with pytest.raises(InputError, match="does not exist: run prepare_data.py first"):
        DataLoader(str(tmp_path / "nowhere"), "train", 2, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no train shards"):
        DataLoader(str(tmp_path / "empty"), "train", 2, 8)
    with pytest.raises(InputError, match="holds no test shards"):
        DataLoader(str(shards), "test", 2, 8)
    with pytest.raises(InputError, match=r"one batch needs 1,000,001 \(batch 1000 x seq-len 1000 x 1 processes"):
        DataLoader(str(shards), "val", 1000, 1000)

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    first = copy / manifest["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-10])  # a truncated copy
    with pytest.raises(InputError, match="but its header says 2,000: the file is truncated or corrupt"):
        DataLoader(str(copy), "train", 2, 8)
    first.write_bytes((shards / first.name).read_bytes())
    manifest["splits"]["train"]["shards"][0]["tokens"] = 1999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="does not hold the 1,999 tokens"):
        DataLoader(str(copy), "train", 2, 8)
    manifest["tokenizer"] = "cl100k_base"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="tokenized with 'cl100k_base', not GPT-2's"):
        DataLoader(str(copy), "train", 2, 8)
    (copy / "manifest.json").unlink()
    (copy / "notes_train_000000.bin").write_bytes(b"not a shard at all" * 100)
    with pytest.raises(InputError, match="is not a token shard"):
        DataLoader(str(copy), "train", 2, 8)

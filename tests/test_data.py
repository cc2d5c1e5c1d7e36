"""Data: prepare_data.py turns text into shards whose tokens are exactly tiktoken's, and the DataLoader streams
them back as (B, T) batches of shuffled windows, per DDP rank, across shards and epochs, resumable from three
numbers; validation reads windows spread evenly over its split.

python -m pytest tests/test_data.py -q
"""

import contextlib
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
import torch.nn.functional as F

import prepare_data
from conftest import REPO, shared_file, tiny_config
from gpt2lite import text_data
from gpt2lite.gpt2_files import EOT_TOKEN
from gpt2lite.shards import load_tokens, shard_bytes
from train_gpt2 import GPT, IGNORE, DataLoader, estimate_loss, get_tokenizer

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

    loader = DataLoader(str(corpus["out"]), "train", batch_size=2, seq_len=8)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.long
    text = train.tolist()
    for row, targets in zip(x.tolist(), y.tolist()):  # each row is 9 consecutive tokens of the split
        starts = [i for i in range(len(text) - 8) if text[i : i + 8] == row]
        assert starts and any(text[i + 1 : i + 9] == targets for i in starts)


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
    for _ in range(200):  # every shard, and into the second epoch
        xs, ys = zip(*(loader.next_batch() for loader in ranks))
        x, y = single.next_batch()
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
        windows = [tuple(t.flatten().tolist()) for t in xs]
        assert len(set(windows)) == world
        assert all(loader.state_dict() == single.state_dict() for loader in ranks)
    assert single.epoch == 1


def numbered_shards(folder: Path, split: str, lengths: list[int]) -> Path:
    """llm.c-style shards (no manifest) whose tokens count up through the split: a token is its own position."""
    folder.mkdir(parents=True, exist_ok=True)
    first = 0
    for index, n in enumerate(lengths):
        (folder / f"numbers_{split}_{index:06d}.bin").write_bytes(shard_bytes(np.arange(first, first + n)))
        first += n
    return folder


def window_starts(loader: DataLoader, n_batches: int) -> list[list[int]]:
    """Where each row of the next n_batches batches starts in the split (numbered shards), checking each row is one
    window: T tokens and, as targets, the T after them."""
    batches = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert torch.equal(x, y - 1) and torch.equal(x - x[:, :1], torch.arange(loader.T).expand_as(x))
        batches.append(x[:, 0].tolist())
    return batches


def test_every_window_of_a_one_shard_split_is_read_once_per_epoch(tmp_path):
    n, T = 5000, 16
    loader = DataLoader(str(numbered_shards(tmp_path, "train", [n])), "train", 4, T, seed=3)
    stream = [start for batch in window_starts(loader, 320) for start in batch]  # 1,280 windows: four epochs
    offsets, epoch_start = [], 0
    for epoch in range(4):
        offset = stream[epoch_start] % T  # the epoch's windows start at offset + T * k, for every k that fits
        count = (n - 1 - offset) // T
        epoch_windows = stream[epoch_start : epoch_start + count]
        assert sorted(epoch_windows) == list(range(offset, offset + T * count, T)), f"epoch {epoch}"
        offsets.append(offset)
        epoch_start += count
    assert len(set(offsets)) > 1, "the windows' edges should move between epochs"


def test_the_order_is_the_seeds_and_changes_every_epoch(tmp_path):
    data = str(numbered_shards(tmp_path, "train", [3000]))
    order = window_starts(DataLoader(data, "train", 4, 16, seed=1), 50)
    assert window_starts(DataLoader(data, "train", 4, 16, seed=1), 50) == order, "the seed decides the order"
    assert window_starts(DataLoader(data, "train", 4, 16, seed=2), 50) != order
    loader, epochs = DataLoader(data, "train", 1, 16, seed=1), ([], [], [])
    while not epochs[2]:  # each window by its place in the shard: start = offset + 16 k, the offset below 16
        _, start = loader.next_window()
        epochs[loader.epoch].append(start // 16)
    assert all(sorted(epoch) == list(range(len(epoch))) for epoch in epochs[:2])
    assert epochs[0][:150] != epochs[1][:150]


def test_consecutive_batches_are_not_neighbours(tmp_path):
    loader = DataLoader(str(numbered_shards(tmp_path, "train", [40_000])), "train", 8, 32, seed=0)
    batches = np.array(window_starts(loader, 300))  # (300, 8): where each row starts
    means = batches.mean(axis=1)
    lag_1 = np.corrcoef(means[:-1], means[1:])[0, 1]  # read front to back, this is about 1
    assert abs(lag_1) < 0.15, lag_1
    rows_apart = np.diff(np.sort(batches, axis=1), axis=1)  # read front to back, every row is 32 after the last
    assert (rows_apart == 32).mean() < 0.02


def test_shards_are_walked_in_a_new_order_every_epoch(shards):
    loader = DataLoader(str(shards), "train", 4, 32, seed=1)
    assert len(loader.paths) >= 5
    visits = [[] for _ in range(4)]  # the shards each epoch opens, in order
    while loader.epoch < 4:
        if not visits[loader.epoch] or visits[loader.epoch][-1] != loader.tokens.filename:
            visits[loader.epoch].append(loader.tokens.filename)
        loader.next_batch()
    assert all(sorted(epoch) == sorted(loader.paths) for epoch in visits), "every shard once an epoch"
    assert len({tuple(epoch) for epoch in visits}) > 1, "shard order should change between epochs"


def test_state_restores_the_very_next_batch(shards):
    loader = DataLoader(str(shards), "train", 3, 24, seed=2)
    for _ in range(230):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint's round trip
    assert len(state) == 3 and state["epoch"] == 0
    expected = [loader.next_batch() for _ in range(30)]
    assert loader.epoch == 1, "the batches after the resume cross into the next epoch"
    resumed = DataLoader(str(shards), "train", 3, 24, seed=2)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    # a checkpoint from the loader that read in order counted the tokens it had read of its shard: it goes on after
    # as many windows of the same shard and epoch
    resumed.load_state_dict({"epoch": 1, "shard": 2, "position": 24 * 6})
    legacy = resumed.next_batch()
    resumed.load_state_dict({"epoch": 1, "shard": 2, "window": 6})
    assert all(torch.equal(a, b) for a, b in zip(legacy, resumed.next_batch()))


def test_validation_windows_cover_the_split_evenly(tmp_path):
    T, lengths = 16, [1000, 37, 2001]  # windows: 62, 2 and 125 of them
    loader = DataLoader(str(numbered_shards(tmp_path, "val", lengths)), "val", 4, T)
    assert loader.windows_per_shard == [62, 2, 125]
    shard_firsts = [0, 1000, 1037]  # each shard's windows start at its first token

    def picked(n_windows: int, rank: int = 0, world_size: int = 1) -> list[int]:
        ranked = DataLoader(str(tmp_path), "val", 4, T, rank, world_size)
        starts = []
        for x, y in ranked.spread_batches(n_windows):
            counted = (y != IGNORE).all(dim=1)
            assert ((y == IGNORE).all(dim=1) | counted).all(), "a row is scored whole or not at all"
            assert torch.equal(x[counted], y[counted] - 1)
            starts += x[counted, 0].tolist()
        return starts

    shards = zip(shard_firsts, loader.windows_per_shard)
    every = sorted(start for first, n in shards for start in range(first, first + n * T, T))
    assert picked(189) == every and picked(1000) == every, "all windows, each once"
    some = picked(10)
    first, again = (torch.cat([x for x, _ in loader.spread_batches(10)]) for _ in range(2))
    assert torch.equal(first, again), "the same windows at every evaluation"
    index = [every.index(start) for start in some]  # which of the 189 windows
    assert index == sorted(index) and len(set(np.diff(index))) <= 2 and max(np.diff(index)) - min(np.diff(index)) <= 1
    assert index[0] < 189 / 10 and index[-1] >= 189 - 189 / 10, "spread from one end of the split to the other"
    assert sorted(s for r in range(3) for s in picked(10, r, 3)) == sorted(some), "DDP ranks share the same windows"


def test_validation_over_every_window_is_the_exact_loss_of_the_split(tmp_path):
    T = 8
    loader = DataLoader(str(numbered_shards(tmp_path, "val", [203, 45])), "val", 4, T)  # 25 + 5 windows
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=256, block_size=T))
    starts = [0 + T * k for k in range(25)] + [203 + T * k for k in range(5)]
    windows = torch.tensor([list(range(s, s + T + 1)) for s in starts])  # (30, T + 1)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
        exact = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    for windows in (30, 400):  # 30 windows in 8 batches of 4 (the last half padding), or more than there are
        assert estimate_loss(model, loader, windows, contextlib.nullcontext, "cpu") == pytest.approx(exact, rel=1e-6)
    assert model.training, "estimate_loss hands the model back in training mode"


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
    (tmp_path / "data.bin").write_bytes(bytes(range(256)) * 4)  # a binary file
    (tmp_path / "utf16.txt").write_bytes("some text".encode("utf-16"))
    out = ["--out-dir", str(tmp_path / "out")]
    assert_one_line_error(run_prepare("--input", str(tmp_path / "missing.txt"), *out), "missing.txt does not exist")
    assert_one_line_error(run_prepare("--input", str(tmp_path / "nothing*.txt"), *out), "matches no file")
    assert_one_line_error(run_prepare("--input", str(tmp_path / "empty.txt"), *out), "empty.txt is empty")
    assert_one_line_error(run_prepare("--input", str(tmp_path), *out), "is a folder: pass its files")
    assert_one_line_error(run_prepare("--input", good, "--val-input", str(tmp_path / "latin1.txt"), *out),
                          "latin1.txt is not UTF-8 text: byte 0xe9 at offset 19")
    binary = run_prepare("--input", str(tmp_path / "data.bin"), *out)
    assert_one_line_error(binary, "data.bin is not text (it holds NUL bytes: a binary file?): pass text files")
    assert "iconv" not in binary.stderr
    assert_one_line_error(run_prepare("--input", str(tmp_path / "utf16.txt"), *out), "utf16.txt is UTF-16 text")
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


def damage(path: Path, how: str):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[:-3])
    elif how == "flipped":
        data[-1] ^= 0x01  # the last token's low byte: the same size, another token, no id out of range
        path.write_bytes(data)
    else:  # an id past the vocabulary, as a flipped high bit makes
        data[-2:] = (0xFFFF).to_bytes(2, "little")
        path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "flipped", "past the vocabulary"])
def test_the_same_prepare_data_command_finds_and_rewrites_a_damaged_shard(tmp_path, capsys, how):
    files = write_files(tmp_path / "in", {"book.txt": make_text(3000, seed=5)})
    out = tmp_path / "out"
    command = ["--input", *files, "--out-dir", str(out), "--shard-size", "800", "--num-proc", "1"]
    prepare(*command)
    made = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3
    damage(out / shards[1]["file"], how)
    capsys.readouterr()
    prepare(*command)
    said = capsys.readouterr().out
    assert f"{shards[1]['file']} is damaged (" in said
    assert f"writing it again, and the {len(shards) - 2} after it" in said
    assert {p.name: p.read_bytes() for p in out.iterdir()} == made, "the rerun writes the very bytes of the first run"
    prepare(*command)
    assert "already holds these shards" in capsys.readouterr().out


def test_training_names_a_shard_whose_token_ids_are_past_the_vocabulary(tmp_path, shards):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:  # each: the shard read first is drawn with the order
        damage(copy / shard["file"], "past the vocabulary")
    from gpt2lite.cli import InputError

    with pytest.raises(InputError, match=r"_train_\d{6}\.bin holds token id 65,535, past GPT-2's 50,257: the shard "
                                         "is damaged; run the prepare_data.py command that made it again"):  # fmt: skip
        DataLoader(str(copy), "train", 2, 8).next_batch()


def test_loader_refuses_bad_data(tmp_path, shards):
    from gpt2lite.cli import InputError

    with pytest.raises(InputError, match="does not exist: run prepare_data.py first"):
        DataLoader(str(tmp_path / "nowhere"), "train", 2, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no train shards"):
        DataLoader(str(tmp_path / "empty"), "train", 2, 8)
    with pytest.raises(InputError, match="holds no test shards"):
        DataLoader(str(shards), "test", 2, 8)
    with pytest.raises(InputError, match=r"windows of seq-len 1000 \+ 1 at any offset, but one batch needs 1,000 "
                                         r"windows \(batch 1000 x 1 processes\): use a smaller batch"):  # fmt: skip
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

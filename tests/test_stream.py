"""Streamed datasets: prepare_data.py --hf-dataset (and the fineweb-edu preset) read through the `datasets`
library's streaming, which local parquet and jsonl folders take exactly as a hub dataset does. Shards hold tiktoken's
tokens document by document, validation is the stream's first documents, --max-tokens cuts train exactly, memory is
bounded by a few batches, and a run interrupted anywhere continues to the bytes an uninterrupted run writes.

python -m pytest tests/test_stream.py -q
"""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import (
    assert_one_line_error,
    expected_tokens,
    kill_after_shards,
    make_text,
    read_split,
    run_prepare,
    write_files,
)

import prepare_data
from conftest import REPO, shared_file
from gpt2lite import text_data
from gpt2lite.gpt2_files import EOT_TOKEN

DOCS = [f"Document {i}: ünïcödé 😀 {make_text(40 + 37 * (i % 11), seed=i)}" for i in range(60)]


def write_parquet(folder: Path, docs: list[str], files: int = 3) -> Path:
    """docs over several parquet files, with another column beside the text, as FineWeb-Edu has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for n in range(files):
        part = docs[n * per_file : (n + 1) * per_file]
        table = pa.table({"id": [f"doc-{n}-{i}" for i in range(len(part))], "text": part})
        pq.write_table(table, folder / f"part-{n:03d}.parquet", row_group_size=7)
    return folder


def write_jsonl(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, len(docs), 25)):
        part = docs[start : start + 25]
        lines = [json.dumps({"text": doc, "url": f"https://example.com/{start + i}"}) for i, doc in enumerate(part)]
        (folder / f"part-{n}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def prepare(*args: str):
    prepare_data.main([*args, "--num-proc", "1"])


def shard_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


@pytest.mark.parametrize("kind", ["parquet folder", "jsonl glob"])
def test_a_streamed_dataset_gives_tiktokens_document_by_document(tmp_path, kind):
    if kind == "parquet folder":
        source = str(write_parquet(tmp_path / "pq", DOCS))
    else:
        source = str(write_jsonl(tmp_path / "jsonl", DOCS)) + "/*.jsonl"
    out = tmp_path / "out"
    prepare("--hf-dataset", source, "--val-docs", "7", "--shard-size", "2000", "--out-dir", str(out))
    assert read_split(out, "val").tolist() == expected_tokens(DOCS[:7])
    train = read_split(out, "train")
    assert train.tolist() == expected_tokens(DOCS[7:])
    # document by document: the i-th <|endoftext|> starts the i-th document's tokens
    starts = np.flatnonzero(train == EOT_TOKEN).tolist() + [len(train)]
    for i, doc in enumerate(DOCS[7:]):
        assert train[starts[i] + 1 : starts[i + 1]].tolist() == expected_tokens([doc])[1:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 7 and manifest["splits"]["train"]["documents"] == 53
    assert manifest["settings"]["val_docs"] == 7 and manifest["source"]["text_column"] == "text"
    assert not (out / prepare_data.PROGRESS_NAME).exists()


def test_a_local_dataset_moved_elsewhere_is_still_the_same_text(tmp_path, capsys):
    source = write_parquet(tmp_path / "pq", DOCS)
    settings = ["--val-docs", "5", "--shard-size", "2000", "--name", "corpus", "--out-dir", str(tmp_path / "out")]
    prepare("--hf-dataset", str(source), *settings)
    moved = source.rename(tmp_path / "moved")
    prepare("--hf-dataset", str(moved), *settings)
    assert "nothing to do" in capsys.readouterr().out
    (moved / "part-002.parquet").unlink()
    with pytest.raises(prepare_data.InputError, match="already holds shards made with other settings"):
        prepare("--hf-dataset", str(moved), *settings)


def test_max_tokens_cuts_the_train_split_exactly(tmp_path):
    source = write_parquet(tmp_path / "pq", DOCS)
    out = tmp_path / "out"
    prepare("--hf-dataset", str(source), "--val-docs", "5", "--shard-size", "1000", "--max-tokens", "2.5e3",
            "--out-dir", str(out))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == [1000, 1000, 500]
    assert read_split(out, "train").tolist() == expected_tokens(DOCS[5:])[:2500]
    assert read_split(out, "val").tolist() == expected_tokens(DOCS[:5]), "validation is never cut"


def test_the_fineweb_edu_preset_streams_sample_10bt(monkeypatch, tmp_path):
    """The preset is --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT with 10,000 validation documents,
    into data/fineweb-edu (the hub is replaced by a local parquet folder here: the same code path)."""
    args = prepare_data.parse_args(["--dataset", "fineweb-edu"])
    assert (args.hf_dataset, args.hf_config, args.hf_split, args.text_column) == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text")  # fmt: skip
    assert (args.val_docs, args.max_tokens, args.out_dir) == (10_000, None, os.path.join("data", "fineweb-edu"))
    opened = []
    real = prepare_data.hf_stream
    local = str(write_parquet(tmp_path / "pq", DOCS))

    def local_stream(name, config, split, column):
        opened.append((name, config, split, column))
        return real(local, None, split, column)

    monkeypatch.setattr(prepare_data, "hf_stream", local_stream)
    monkeypatch.chdir(tmp_path)
    prepare("--dataset", "fineweb-edu", "--val-docs", "2", "--shard-size", "500", "--max-tokens", "600")
    assert opened == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text")]
    assert read_split(tmp_path / "data" / "fineweb-edu", "train").tolist() == expected_tokens(DOCS[2:])[:600]


def test_an_interrupted_stream_continues_to_the_same_bytes(tmp_path, monkeypatch):
    """The stream breaks (a dropped connection) after some shards; run again, it skips the documents the shards
    hold, the first of them part-way, and ends with the bytes of a run never interrupted."""
    monkeypatch.setattr(text_data, "BATCH_CHARS", 1000)  # a few documents a batch: shards land before the break
    source = str(write_parquet(tmp_path / "pq", DOCS))
    settings = ["--hf-dataset", source, "--val-docs", "4", "--shard-size", "700"]
    prepare(*settings, "--out-dir", str(tmp_path / "clean"))

    real = prepare_data.hf_stream

    def breaking_stream(*args):
        stream = real(*args)

        def documents(skip):
            for n, doc in enumerate(stream.documents(skip)):
                if skip + n == 31:
                    raise ConnectionError("Connection reset by peer")
                yield doc

        return stream._replace(documents=documents)

    monkeypatch.setattr(prepare_data, "hf_stream", breaking_stream)
    broken = tmp_path / "broken"
    with pytest.raises(prepare_data.InputError, match="run the same command again"):
        prepare(*settings, "--out-dir", str(broken))
    assert not (broken / "manifest.json").exists()
    progress = json.loads((broken / prepare_data.PROGRESS_NAME).read_text())
    shards = progress["splits"]["train"]["shards"]
    assert shards and any(s["next_offset"] > 0 for s in shards), "some shard ends inside a document"

    monkeypatch.setattr(prepare_data, "hf_stream", real)
    skipped = []
    monkeypatch.setattr(prepare_data, "tokenize_part", lambda part, writer, *rest: (
        skipped.append((part.split, writer.next_doc)), text_data.tokenize_part(part, writer, *rest)))  # fmt: skip
    prepare(*settings, "--out-dir", str(broken))
    assert skipped == [("train", shards[-1]["next_doc"])], "val was complete; train went on from its last shard"
    assert shard_files(broken) == shard_files(tmp_path / "clean")


def test_a_run_killed_with_sigkill_continues_to_the_same_bytes_and_then_has_nothing_to_do(tmp_path):
    docs = [make_text(300, seed=i) for i in range(400)]
    source = str(write_parquet(tmp_path / "pq", docs, files=4))
    command = [sys.executable, "prepare_data.py", "--hf-dataset", source, "--val-docs", "20", "--shard-size", "250",
               "--num-proc", "2"]  # fmt: skip
    subprocess.run([*command, "--out-dir", str(tmp_path / "clean")], cwd=REPO, check=True, capture_output=True)

    killed = tmp_path / "killed"
    kill_after_shards(command, killed, 20)

    subprocess.run([*command, "--out-dir", str(killed)], cwd=REPO, check=True, capture_output=True)
    assert shard_files(killed) == shard_files(tmp_path / "clean")
    again = subprocess.run([*command, "--out-dir", str(killed)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout


SPAWN_SCRIPT = """
import multiprocessing, sys
import prepare_data

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")  # as on macOS and Windows
    prepare_data.main(sys.argv[1:])
"""


def test_same_bytes_for_any_number_of_processes_and_under_spawn(tmp_path, monkeypatch):
    monkeypatch.setattr(text_data, "BATCH_CHARS", 2000)  # many tasks, so the workers really share the work
    source = str(write_parquet(tmp_path / "pq", DOCS))
    settings = ["--hf-dataset", source, "--val-docs", "3", "--shard-size", "900"]
    prepare_data.main([*settings, "--out-dir", str(tmp_path / "one"), "--num-proc", "1"])
    prepare_data.main([*settings, "--out-dir", str(tmp_path / "three"), "--num-proc", "3"])
    script = tmp_path / "spawned.py"
    script.write_text(SPAWN_SCRIPT)
    result = subprocess.run([sys.executable, str(script), *settings, "--out-dir", str(tmp_path / "spawn"),
                             "--num-proc", "2"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "three") == shard_files(tmp_path / "spawn")


def test_the_stream_is_read_only_a_few_batches_ahead_of_the_shards(tmp_path, monkeypatch):
    """Memory is bounded by the shard and a few batches, not the corpus: when the first shard lands, the stream has
    been read only a few batches past it (Pool.imap would have read all of it by then)."""
    monkeypatch.setattr(text_data, "BATCH_CHARS", 1000)
    doc = "word " * 100  # 500 characters: two documents a batch
    pulled = []

    def documents(skip):
        for i in range(skip, 5000):
            pulled.append(i)
            yield doc

    at_first_shard = []
    writer = text_data.ShardWriter(str(tmp_path), "big", "train", 5000)
    writer.on_shard = lambda: at_first_shard.append((len(pulled), writer.next_doc)) if not at_first_shard else None
    with multiprocessing.Pool(2) as pool:
        text_data.tokenize_part(text_data.Part("train", documents), writer, pool, workers=2)
    read, written = at_first_shard[0]
    per_doc = len(expected_tokens([doc]))
    assert written == 5000 // per_doc
    assert read - written <= 2 * (2 * 2 + 1), "at most `ahead` batches in flight, one being filled"
    assert writer.tokens == 5000 * per_doc


def test_tinyshakespeare_is_downloaded_once_and_checked(tmp_path, monkeypatch):
    source = str(shared_file("tinyshakespeare/input.txt"))  # skips where ../shared/data is absent
    cache = tmp_path / "cache"
    (cache / "tinyshakespeare").mkdir(parents=True)
    (cache / "tinyshakespeare" / "input.txt").write_bytes(Path(source).read_bytes())
    monkeypatch.setenv("GPT2_LITE_CACHE", str(cache))
    prepare("--dataset", "tinyshakespeare", "--out-dir", str(tmp_path / "preset"))
    prepare("--input", source, "--name", "tinyshakespeare", "--out-dir", str(tmp_path / "input"))
    preset, plain = shard_files(tmp_path / "preset"), shard_files(tmp_path / "input")
    assert preset.pop("manifest.json") != plain.pop("manifest.json"), "the manifest says where the text came from"
    assert preset == plain and len(preset) == 2


def test_tinyshakespeare_with_no_network_or_a_wrong_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_LITE_CACHE", str(tmp_path / "cache"))
    url, sha256 = text_data.TINY_SHAKESPEARE
    monkeypatch.setattr(prepare_data, "TINY_SHAKESPEARE", ("http://127.0.0.1:9/input.txt", sha256))
    with pytest.raises(prepare_data.InputError, match="cannot download .*: put that file at .*input.txt"):
        prepare("--dataset", "tinyshakespeare", "--out-dir", str(tmp_path / "out"))
    (tmp_path / "cache" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "cache" / "tinyshakespeare" / "input.txt").write_text("not Shakespeare\n")
    with pytest.raises(prepare_data.InputError, match="sha256 differs.*delete it"):
        prepare("--dataset", "tinyshakespeare", "--out-dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_streamed_input_gets_one_line_and_leaves_nothing_looking_finished(tmp_path):
    source = str(write_parquet(tmp_path / "pq", DOCS))
    out = ["--out-dir", str(tmp_path / "out")]
    assert_one_line_error(run_prepare("--hf-dataset", "./no/such/folder", *out), "matches no local file or folder")
    assert_one_line_error(run_prepare("--hf-dataset", str(tmp_path / "*.parquet"), *out), "matches no local file")
    assert_one_line_error(run_prepare("--hf-dataset", source, "--text-column", "content", *out),
                          "has no column 'content': its columns are id, text")  # fmt: skip
    assert_one_line_error(run_prepare("--hf-dataset", source, "--hf-split", "validation", *out), "--hf-split")
    assert_one_line_error(run_prepare("--hf-dataset", source, "--max-tokens", "100", *out),
                          "--max-tokens 100 is below one shard")  # fmt: skip
    assert_one_line_error(run_prepare("--max-tokens", "1e9", *out), "--max-tokens goes with --hf-dataset")
    assert_one_line_error(run_prepare("--input", source, "--hf-dataset", source, *out), "give one source of text")
    assert_one_line_error(run_prepare("--hf-dataset", source, "--max-tokens", "1.5", *out), "a whole number")
    assert_one_line_error(run_prepare("--hf-dataset", source, "--max-tokens", "inf", *out), "a whole number")
    assert_one_line_error(run_prepare("--dataset", "fineweb-edu", "--hf-config", "x", *out), "reads sample-10BT")
    assert not (tmp_path / "out").exists(), "nothing is written before the input is known to be good"

    empty = write_files(tmp_path / "empty", {"part-0.jsonl": ""})[0]
    assert_one_line_error(run_prepare("--hf-dataset", empty, *out), "holds no rows")
    mixed = write_files(tmp_path / "mixed", {"a.jsonl": '{"text": "x"}\n', "b.txt": "y\n"})
    assert_one_line_error(run_prepare("--hf-dataset", str(tmp_path / "mixed" / "*"), *out), "files of one kind")
    assert mixed and not (tmp_path / "out").exists()

    # found out only once validation is written: no manifest, so nothing looks finished
    result = run_prepare("--hf-dataset", source, "--val-docs", "30", "--shard-size", "1000", "--max-tokens", "1000",
                         *out)  # fmt: skip
    assert_one_line_error(result, "--max-tokens 1,000 is below the validation split's")
    assert not (tmp_path / "out" / "manifest.json").exists()
    result = run_prepare("--hf-dataset", source, "--val-docs", "60", "--shard-size", "1000", *out, "--overwrite")
    assert_one_line_error(result, "the train split is empty: the stream's 60 documents all went to validation")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_rerun_checks_again_and_clears_what_a_kill_left_behind(tmp_path):
    """A rerun of a run refused after its validation split is refused again (not finished with a manifest), and a
    progress file left by a kill just after the manifest landed is removed by the next run."""
    source = str(write_parquet(tmp_path / "pq", DOCS))
    out = tmp_path / "out"
    refused = ["--hf-dataset", source, "--val-docs", "30", "--shard-size", "1000", "--max-tokens", "1000",
               "--out-dir", str(out)]  # fmt: skip
    for _ in range(2):
        with pytest.raises(prepare_data.InputError, match="below the validation split"):
            prepare(*refused)
        assert not (out / "manifest.json").exists()
    prepare("--hf-dataset", source, "--val-docs", "3", "--shard-size", "1000", "--out-dir", str(out), "--overwrite")
    manifest = (out / "manifest.json").read_bytes()
    assert list(json.loads(manifest)["splits"]) == ["val", "train"]
    (out / prepare_data.PROGRESS_NAME).write_text("{}")
    prepare("--hf-dataset", source, "--val-docs", "3", "--shard-size", "1000", "--out-dir", str(out))
    assert not (out / prepare_data.PROGRESS_NAME).exists() and (out / "manifest.json").read_bytes() == manifest
    (out / "pq_val_000000.bin").unlink()  # the first split damaged: rewritten, and the manifest keeps its order
    prepare("--hf-dataset", source, "--val-docs", "3", "--shard-size", "1000", "--out-dir", str(out))
    assert (out / "manifest.json").read_bytes() == manifest


def test_a_row_the_builder_cannot_parse_gets_one_line(tmp_path):
    folder = write_jsonl(tmp_path / "jsonl", DOCS)
    (folder / "part-9.jsonl").write_text('{"text": "fine"}\n{"text": not json\n')
    result = run_prepare("--hf-dataset", str(folder / "*.jsonl"), "--val-docs", "3", "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, "cannot read the text")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_config_that_does_not_exist_is_named(tmp_path):
    """A local dataset with named configurations (in its README's YAML, as hub datasets declare them)."""
    folder = write_parquet(tmp_path / "ds", DOCS, files=1)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: part-000.parquet\n---\n")
    result = run_prepare("--hf-dataset", str(folder), "--hf-config", "large", "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, "--hf-config")
    assert "small" in result.stderr, "the configurations that exist are named"


def test_no_network_for_fineweb_edu_says_a_local_folder_also_works(tmp_path):
    result = run_prepare("--dataset", "fineweb-edu", "--out-dir", str(tmp_path / "out"), HF_HUB_OFFLINE="1",
                         HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    assert_one_line_error(result, "cannot reach the Hugging Face hub for HuggingFaceFW/fineweb-edu")
    assert "--hf-dataset also takes a local folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_progress_bar_shows_documents_tokens_rate_and_time_left(tmp_path):
    source = str(write_parquet(tmp_path / "pq", DOCS))
    result = run_prepare("--hf-dataset", source, "--val-docs", "5", "--shard-size", "1000", "--max-tokens", "3000",
                         "--num-proc", "1", "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    train_bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("train")][-1]
    assert "3.00k/3.00k" in train_bar and "tok/s" in train_bar and "docs" in train_bar, train_bar
    val_bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("  val")][-1]
    assert "5/5" in val_bar, val_bar

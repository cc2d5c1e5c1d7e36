"""evaluate.py and the scoring it shares with training: each task against a plain loop over examples with
transformers' GPT2LMHeadModel holding the same random weights; sliding windows; bad input.

  python -m pytest tests/test_evaluate.py -q
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_data import make_text

import evaluate
from conftest import REPO, random_hf_model, shared_file, tiny_config
from gpt2lite import evaluation
from gpt2lite.evaluation import completion_losses
from gpt2lite.gpt2_files import EOT_TOKEN
from train_gpt2 import GPT, get_tokenizer

CONFIG = tiny_config(vocab_size=50257, block_size=64)


@pytest.fixture(scope="module")
def models():
    """Ours and transformers', the same random weights (a larger init_std, so that predictions are not flat)."""
    hf = random_hf_model(CONFIG, seed=3, init_std=0.2)
    ours = GPT(CONFIG)
    ours.load_hf_state_dict(hf.state_dict())
    return ours.eval(), hf


def reference(hf, context: list[int], completion: list[int]) -> tuple[float, bool]:
    """One example at a time, the obvious way: the completion's summed loss, and whether argmax gives it."""
    ids = torch.tensor([(context + completion)[-(CONFIG.block_size + 1) :]])
    with torch.no_grad():
        logits = hf(ids[:, :-1]).logits[0]  # (T, V): position t predicts ids[t + 1]
    targets = ids[0, 1:]
    positions = range(len(targets) - len(completion), len(targets))
    log_probs = logits.log_softmax(dim=-1)
    loss = -sum(log_probs[p, targets[p]].item() for p in positions)
    return loss, all(logits[p].argmax().item() == targets[p].item() for p in positions)


def hellaswag_fixture(path, n: int = 7) -> list[dict]:
    words = make_text(900, seed=5).split()
    examples = []
    for i in range(n):
        chunk = words[i * 40 : (i + 1) * 40]
        endings = [" ".join(chunk[14 + 6 * k : 17 + 7 * k]) + "." for k in range(4)]  # 3 to 6 words: lengths differ
        examples.append({"ctx": " ".join(chunk[:14]).capitalize(), "endings": endings, "label": i % 4})
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return examples


def test_completion_losses_equal_a_loop_with_transformers(models):
    ours, hf = models
    enc = get_tokenizer()
    text = make_text(400, seed=2)
    pairs = [(enc.encode_ordinary(text[: 20 + 37 * i]), enc.encode_ordinary(" " + w)) for i, w in
             enumerate(["castle", "river", "a quiet evening", "the", "unbelievably"])]  # fmt: skip
    pairs.append((enc.encode_ordinary(text)[:200], enc.encode_ordinary(" over the hills")))  # > block_size: cut left
    scored = completion_losses(ours, pairs, "cpu", batch_tokens=150)  # several batches of different widths
    for (context, completion), got in zip(pairs, scored):
        loss, greedy = reference(hf, context, completion)
        assert got.loss == pytest.approx(loss, rel=1e-4) and got.tokens == len(completion) and got.greedy == greedy


def test_greedy_is_true_exactly_when_argmax_produces_the_completion(models):
    ours, _ = models
    context = get_tokenizer().encode_ordinary("The river runs")
    greedy = ours.generate(torch.tensor([context]), 4, temperature=0)[0, len(context) :].tolist()
    other = greedy[:3] + [(greedy[3] + 1) % 50257]
    right, wrong = completion_losses(ours, [(context, greedy), (context, other)], "cpu")
    assert right.greedy and not wrong.greedy


def test_hellaswag_scores_equal_a_loop_with_transformers(models, tmp_path):
    ours, hf = models
    hellaswag_fixture(tmp_path / "hs.jsonl")
    examples = evaluation.hellaswag_examples(str(tmp_path / "hs.jsonl"))
    enc = get_tokenizer()
    right = right_norm = 0
    for example in examples:
        context = enc.encode_ordinary(example["ctx"])
        losses = []
        for ending in example["endings"]:
            completion = enc.encode_ordinary(" " + ending)
            losses.append((reference(hf, context, completion)[0], len(completion)))
        right += min(range(4), key=lambda k: losses[k][0]) == example["label"]
        right_norm += min(range(4), key=lambda k: losses[k][0] / losses[k][1]) == example["label"]
    scores = evaluation.hellaswag_scores(ours, examples, "cpu", batch_tokens=200)
    assert scores == {"acc": right / 7, "acc_norm": right_norm / 7, "examples": 7}


def test_lambada_scores_equal_a_loop_with_transformers(models):
    ours, hf = models
    passages = [{"text": line} for line in make_text(600, seed=9).splitlines()[:12] if " " in line]
    scores = evaluate.lambada_scores(ours, passages, "cpu", None, batch_tokens=256, progress=False)
    enc = get_tokenizer()
    per_passage = []
    for passage in passages:
        context, word = passage["text"].rsplit(" ", 1)
        per_passage.append(reference(hf, enc.encode_ordinary(context), enc.encode_ordinary(" " + word)))
    assert scores["examples"] == len(passages)
    assert scores["acc"] == sum(greedy for _, greedy in per_passage) / len(passages)
    assert scores["ppl"] == pytest.approx(math.exp(sum(loss for loss, _ in per_passage) / len(passages)), rel=1e-4)


@pytest.mark.parametrize("n_tokens, stride", [(200, 16), (200, 64), (65, 8), (64, 30), (10, 5)])
def test_sliding_windows_score_every_token_once(n_tokens, stride):
    tokens = list(range(n_tokens))
    windows = evaluate.sliding_windows(tokens, block_size=64, stride=stride)
    assert [t for _, completion in windows for t in completion] == tokens[1:]  # each once, in order
    for i, (context, completion) in enumerate(windows):
        assert len(context) + len(completion) <= 65  # block_size inputs, and the last token as a target
        assert i == 0 or len(context) >= 64 - stride  # after the first window, at least block_size - stride context


def test_wikitext_perplexity_equals_full_context_and_a_window_loop(models):
    ours, hf = models
    enc = get_tokenizer()
    short = "The castle stood on the hill above the river, and the town grew around it."
    tokens = [EOT_TOKEN] + enc.encode_ordinary(short)
    assert len(tokens) <= CONFIG.block_size + 1
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(hf(torch.tensor([tokens[:-1]])).logits[0], torch.tensor(tokens[1:]))
    scores = evaluate.wikitext_scores(ours, short, 16, "cpu", None, batch_tokens=512, progress=False)
    assert scores["tokens"] == len(tokens) - 1 and scores["words"] == len(short.split())
    assert scores["token_ppl"] == pytest.approx(math.exp(full.item()), rel=1e-4)

    long = make_text(300, seed=4)  # several windows
    scores = evaluate.wikitext_scores(ours, long, 24, "cpu", None, batch_tokens=512, progress=False)
    tokens = [EOT_TOKEN] + enc.encode_ordinary(long)
    windows = evaluate.sliding_windows(tokens, CONFIG.block_size, 24)
    nats = sum(reference(hf, context, completion)[0] for context, completion in windows)
    assert scores["tokens"] == len(tokens) - 1
    assert scores["token_ppl"] == pytest.approx(math.exp(nats / (len(tokens) - 1)), rel=1e-4)
    assert scores["word_ppl"] == pytest.approx(math.exp(nats / len(long.split())), rel=1e-4)


def run_evaluate(*args: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env})  # fmt: skip


def test_lambada_on_the_real_test_set_end_to_end(gpt2_vocab_hf_dir, tmp_path):
    data = shared_file("lambada/lambada_test.jsonl")
    out = tmp_path / "scores.json"
    result = run_evaluate("--init-from", str(gpt2_vocab_hf_dir), "--task", "lambada", "--data", str(data),
                          "--limit", "50", "--out", str(out), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "lambada: acc 0.0000 | ppl " in result.stdout and "| 50 passages |" in result.stdout
    scores = json.loads(out.read_text())["tasks"]["lambada"]
    assert scores["examples"] == 50 and scores["ppl"] > 1000  # random weights: far from GPT-2's 35


def test_hellaswag_and_wikitext_from_the_command_line(gpt2_vocab_hf_dir, tmp_path):
    hellaswag_fixture(tmp_path / "hs.jsonl")
    (tmp_path / "wiki.test.raw").write_text(make_text(500, seed=6))
    out = tmp_path / "scores.json"
    for task, data in (("hellaswag", "hs.jsonl"), ("wikitext", "wiki.test.raw")):
        result = run_evaluate("--init-from", str(gpt2_vocab_hf_dir), "--task", task, "--data", str(tmp_path / data),
                              "--device", "cpu", "--out", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert task in json.loads(out.read_text())["tasks"]
    assert "token ppl" in result.stdout and "stride 32" in result.stdout  # half the block by default


@pytest.mark.parametrize("args, message", [
    (["--task", "mmlu"], "invalid choice: 'mmlu'"),
    (["--task", "hellaswag", "--data", "BAD_HELLASWAG"], "line 2: not a HellaSwag example"),
    (["--task", "lambada", "--data", "BAD_LAMBADA"], "line 3: not a LAMBADA example"),
    (["--task", "lambada", "--data", "NOWHERE"], "does not exist"),
    (["--task", "all", "--data", "BAD_LAMBADA"], "--data names one task's file"),
    (["--task", "wikitext", "--stride", "100"], "longer than the model's block_size 64"),
    (["--task", "wikitext"], "cannot download WikiText"),
    (["--task", "hellaswag"], "cannot download HellaSwag"),
    (["--task", "lambada"], "cannot download LAMBADA"),
])  # fmt: skip
def test_bad_input_gets_one_line_and_a_non_zero_exit(gpt2_vocab_hf_dir, tmp_path, args, message):
    hellaswag_fixture(tmp_path / "good.jsonl", n=3)
    lines = (tmp_path / "good.jsonl").read_text().splitlines()
    (tmp_path / "BAD_HELLASWAG").write_text(lines[0] + "\n" + lines[1].replace('"label": 1', '"label": 7') + "\n")
    (tmp_path / "BAD_LAMBADA").write_text('{"text": "one two"}\n\n{"txt": "three four"}\n')
    files = {name: str(tmp_path / name) for name in ("BAD_HELLASWAG", "BAD_LAMBADA", "NOWHERE")}
    args = [files.get(a, a) for a in args]
    # no network: an address nothing listens on for the downloads, the hub in offline mode; run where no data/ is
    result = run_evaluate("--init-from", str(gpt2_vocab_hf_dir), "--device", "cpu", *args, cwd=tmp_path,
                          HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9",
                          HTTP_PROXY="http://127.0.0.1:9")  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]

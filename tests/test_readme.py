"""README.md and docs/ say what is true. Every command in their bash blocks, every `python ...` in their prose and
every row of the ladder table runs a script of the project with flags it accepts, and names no file outside the
repository; every link resolves; the README's test command is the one CI runs; the figures that describe a
committed file (the CPU demo's reference log, the recipe bench's output) match it; HellaSwag's reference figure
is one constant; and the README's CPU demo, pasted in order into a copy of the repository, runs and changes no
committed file (the reference logs of our runs included).

python -m pytest tests/test_readme.py -q
"""

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2lite.run
from conftest import REPO, shared_file
from gpt2lite.cli import InputError

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCUMENTS = {path.relative_to(REPO).as_posix(): path.read_text(encoding="utf-8")
             for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}  # fmt: skip
SCRIPTS = ["train_gpt2.py", "prepare_data.py", "sample.py", "evaluate.py", "plot_losses.py", "bench.py", "export.py"]
# the demo's 600 steps take minutes: the test runs its training commands shortened (argparse keeps a flag's last value)
SHORTER = ["--max-steps", "4", "--warmup-steps", "1", "--eval-interval", "2", "--eval-steps", "2",
           "--sample-interval", "4", "--ckpt-interval", "2"]  # fmt: skip


def bash_blocks(text: str) -> list[str]:
    """The README's bash blocks, each with its continued lines joined."""
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def commands(shell: str) -> list[list[str]]:
    """The commands of some shell lines, as words: one per line and per `&&`, comments dropped."""
    found = []
    for line in shell.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append(words[:end])
            words = words[end + 1 :]
    return [command for command in found if command]


def prose_commands(text: str) -> list[list[str]]:
    """`python ...` and `torchrun ...` in the README's sentences (inline code, which may wrap onto a new line), where
    they run something (`torchrun --nproc_per_node=2` alone names a way of running, not a command)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`((?:python|torchrun) [^`]+)`", prose)]
    found = [command for span in spans for command in commands(span)]
    return [command for command in found if "-m" in command or any(word.endswith(".py") for word in command)]


def ladder_table_commands(text: str) -> list[list[str]]:
    """Each row of the ladder table whose command cell holds flags, after the command the header names."""
    header = re.search(r"\| command: `(python train_gpt2.py [^`]+)` and \|", text)
    if not header:
        return []
    rows = re.findall(r"^\| [\d–]+ \|[^|]*\| `(--[^`]+)` \|", text, flags=re.M)
    return [shlex.split(header.group(1)) + shlex.split(row) for row in rows]


def document_commands(text: str) -> list[list[str]]:
    found = [command for block in bash_blocks(text) for command in commands(block)]
    return found + prose_commands(text) + ladder_table_commands(text)


def every_command() -> list[tuple[str, list[str]]]:
    """(document, command) for every command of README.md and docs/."""
    return [(name, command) for name, text in DOCUMENTS.items() for command in document_commands(text)]


def script_and_args(command: list[str]) -> tuple[str, list[str]] | None:
    """The gpt2-lite script a command runs and its arguments, or None for other programs."""
    program, *rest = command
    if program == "torchrun":
        script = next(word for word in rest if word.endswith(".py"))
        return script, rest[rest.index(script) + 1 :]
    if program in ("python", "python3") and rest and rest[0] != "-m":
        return rest[0], rest[1:]
    return None


def parse_error(script: str, argv: list[str]) -> str | None:
    """What the script's own argument parsing (argparse and its checks) says of argv, or None if it accepts it.
    train_gpt2.py checks its flags' ranges and schedule with the rest of its inputs: those checks run here too."""
    module = importlib.import_module(script.removesuffix(".py"))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = module.parse_args(argv)
    except SystemExit as e:
        return stderr.getvalue().strip() if e.code else None  # --help exits with 0
    except InputError as e:  # prepare_data.py checks its --input files with its flags: those are the user's own
        about_flags = [line for line in str(e).splitlines() if not line.startswith(("input file ", "--input pattern"))]
        return "\n".join(about_flags) or None
    if script == "train_gpt2.py":
        args = args[0]
        try:
            gpt2lite.run.check_schedule(args)
        except InputError as e:
            return str(e)
        return "\n".join(gpt2lite.run.out_of_range(args).values()) or None
    return None


def test_the_documents_are_read_whole():
    """The parsing above finds what it should: a change of the documents' layout must not empty the tests below."""
    assert len(DOCUMENTS) >= 10, "README.md and docs/"
    for text in (README, "\n".join(DOCUMENTS.values())):
        scripts = {run[0] for run in map(script_and_args, document_commands(text)) if run}
        assert scripts == set(SCRIPTS), scripts
    assert len(ladder_table_commands(DOCUMENTS["docs/ladder.md"])) == 6  # steps 1, 2, 3-4, 5, 8 and 10
    assert any(command[:2] == ["torchrun", "--standalone"] for command in document_commands(README))


@pytest.mark.parametrize(("document", "command"), every_command(),
                         ids=lambda x: x if isinstance(x, str) else " ".join(x)[:80])  # fmt: skip
def test_each_command_names_a_script_that_accepts_its_flags(document, command):
    assert not any("..." in word for word in command), f"not pasteable: {command}"
    assert not any(word.startswith("../") for word in command), f"a file outside a user's clone: {command}"
    run = script_and_args(command)
    program, *rest = command
    if run:
        script, argv = run
        assert script in SCRIPTS, f"{script} is not one of the project's scripts"
        problem = parse_error(script, argv)
        assert problem is None, f"{shlex.join(command)}: {problem}"
    elif program in ("python", "python3"):  # python -m venv / pytest / pip
        assert rest[1] in ("venv", "pytest", "pip"), command
        if rest[1] == "pytest":
            assert all((REPO / word).exists() for word in rest[2:] if not word.startswith("-")), command
    elif program == "pip" and "--index-url" in rest:  # PyTorch's CPU build, for a machine without a GPU
        assert rest == ["install", "torch", "--index-url", "https://download.pytorch.org/whl/cpu"], command
    elif program == "pip":
        files = [rest[i + 1] for i, word in enumerate(rest) if word == "-r"]
        assert files and all((REPO / name).is_file() for name in files), command
    elif program in ("mkdir", "cp"):  # a branch of a run: a checkpoint copied into a new run directory
        assert all(word.startswith(("-", "runs/")) for word in rest), command
    else:
        assert program == "." and rest == [".venv/bin/activate"], f"an unexpected program: {command}"


def test_the_readme_test_command_is_the_one_ci_runs():
    (test_command,) = [command for command in document_commands(README) if command[1:4] == ["-m", "pytest", "tests"]]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert shlex.join(test_command) in ci


def test_the_cpu_demo_runs_as_written_and_changes_no_committed_file(tmp_path):
    """The README's CPU demo block pasted in order in a copy of the repository with Tiny Shakespeare in the download
    cache: its training command first with --plan (as the README offers), then as written (shortened)."""
    text = shared_file("tinyshakespeare/input.txt")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    if listed.returncode != 0:
        pytest.skip("the repository is not a git checkout: the files to copy are not known")
    clone = tmp_path / "clone"
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes((REPO / name).read_bytes())
    committed = {path: digest(path) for path in clone.rglob("*") if path.is_file()}
    (tmp_path / "cache" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "cache" / "tinyshakespeare" / "input.txt").write_bytes(text.read_bytes())
    env = {**os.environ, "GPT2_LITE_CACHE": str(tmp_path / "cache")}

    (block,) = [block for block in bash_blocks(README) if "tinyshakespeare" in block and "runs/cpu-demo" in block]
    pasted = commands(block)
    assert [command[1] for command in pasted] == ["prepare_data.py", "train_gpt2.py", "sample.py", "plot_losses.py"]
    pasted.insert(1, [*pasted[1], "--plan"])
    for command in pasted:
        argv = command[1:] + (SHORTER if command[1] == "train_gpt2.py" and "--plan" not in command else [])
        done = subprocess.run([sys.executable, *argv], cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    written = {path for path in clone.rglob("*") if path.is_file()} - set(committed)
    assert {path: digest(path) for path in committed if path.is_file()} == committed
    assert all(path.relative_to(clone).parts[0] in ("runs", "data") for path in written), written
    ignored = subprocess.run(["git", "check-ignore", "runs/cpu-demo/log.jsonl", "data/tinyshakespeare/x.bin"],
                             cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert ignored.returncode == 0 and len(ignored.stdout.splitlines()) == 2, "runs/ and data/ must stay out of git"
    assert (clone / "runs" / "cpu-demo" / "log.jsonl").is_file() and (clone / "runs" / "cpu-demo" / "best.pt").is_file()
    assert (clone / "runs" / "cpu-demo" / "runs-cpu-demo_vs_reference-cpu-demo_loss.png").is_file()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_readme_names_no_path_outside_a_users_clone():
    assert "../" not in README, "a user's clone has nothing beside it"


def test_the_docs_name_no_path_outside_a_users_clone_but_their_links_up_to_the_repository():
    for name, text in DOCUMENTS.items():
        outside = re.sub(r"\]\(\.\./[^)]+\)", "](link)", text)  # docs/ links up to the repository's own files
        assert "../" not in outside, f"{name}: a user's clone has nothing beside it"


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {anchor(heading) for heading in re.findall(r"^#+ (.+)$", prose, flags=re.M)}


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_every_link_resolves(document):
    """Relative links to a file that exists, and #anchors to a heading there; web links are not fetched."""
    prose = re.sub(r"```.*?```", "", DOCUMENTS[document], flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links, "the parsing above finds the links"
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, fragment = link.partition("#")
        target = ((REPO / document).parent / path).resolve() if path else REPO / document
        assert target.exists() and REPO in target.parents, f"{document}: {link} does not resolve"
        if fragment:
            assert fragment in anchors(target.read_text(encoding="utf-8")), f"{document}: no heading for {link}"


def reference_log(name: str) -> dict[str, dict[int, float]]:
    """A reference run's losses: split -> step -> loss."""
    events = [json.loads(line) for line in (REPO / "reference" / name / "log.jsonl").read_text().splitlines()]
    losses = {"train": {}, "val": {}}
    for event in events:
        if event["split"] in losses:
            losses[event["split"]][event["step"]] = event["loss"]
    return losses


def test_the_cpu_demos_figures_are_its_reference_logs():
    """What README.md and docs/cpu-demo.md quote of our two CPU runs is what their committed logs hold."""
    demo, dropout = reference_log("cpu-demo"), reference_log("cpu-demo-dropout")
    first, best = demo["val"][0], min(demo["val"].values())
    assert f"from {first:.2f} to {best:.2f}" in README and f"{max(demo['val'])} steps" in README
    quoted = "\n".join(DOCUMENTS.values())
    lines = re.findall(r"step (\d+)/600 \| (val loss|loss) ([\d.]+)", quoted)
    assert len(lines) >= 3
    for step, kind, loss in lines:
        assert f"{demo['val' if kind == 'val loss' else 'train'][int(step)]:.4f}" == loss, (step, kind)
    summary = r"(\S*cpu-demo\S*) \| min train loss ([\d.]+) at step (\d+) \| min val loss ([\d.]+) at step (\d+)"
    summaries = re.findall(summary, quoted)
    assert len(summaries) >= 2
    for name, train, train_step, val, val_step in summaries:
        log = dropout if name.endswith("dropout") else demo
        assert (train, int(train_step)) == min(
            (f"{v:.4f}", s) for s, v in log["train"].items() if v == min(log["train"].values())
        )
        assert (val, int(val_step)) == (f"{min(log['val'].values()):.4f}", min(log["val"], key=log["val"].get))
    table = DOCUMENTS["docs/cpu-demo.md"]
    for label, log in (("validation loss, no dropout", demo), ("validation loss, dropout 0.1", dropout)):
        row = re.search(rf"^\| {re.escape(label)} \|(.+)\|$", table, flags=re.M).group(1).split("|")
        assert [cell.strip() for cell in row] == [f"{log['val'][step]:.2f}" for step in range(0, 601, 100)], label


def test_the_recipe_benchs_figures_are_its_reference_output():
    """Every mean ± sd and every speedup that docs/recipe.md quotes is in the bench's committed output."""
    output = (REPO / "reference" / "bench-recipe" / "output.md").read_text().replace("-", "−")
    recipe = DOCUMENTS["docs/recipe.md"]
    quoted = re.findall(r"−?\d\.\d{4} ± \d\.\d{4}|\d\.\d\d ± \d\.\d\d×|\d\.\d\d(?: / \d\.\d\d){4}", recipe)
    assert len(quoted) >= 15
    for figure in quoted:
        assert figure in output, figure


def test_openais_hellaswag_figure_is_one_constant_everywhere():
    """0.2955 (acc_norm), with its acc 0.2859, from gpt2lite.evaluation; build-nanogpt's plots' 0.2945 is named once,
    in docs/evaluation.md, as not used."""
    from gpt2lite.evaluation import OPENAI_124M_HELLASWAG

    texts = dict(DOCUMENTS)
    texts.update(
        {p.relative_to(REPO).as_posix(): p.read_text() for p in [*REPO.glob("*.py"), *REPO.glob("gpt2lite/*.py")]}
    )
    texts["notebooks/colab.ipynb"] = (REPO / "notebooks" / "colab.ipynb").read_text()
    found = [(name, figure) for name, text in texts.items() for figure in re.findall(r"\b0\.29\d\d\b", text)]
    assert (("gpt2lite/evaluation.py", str(OPENAI_124M_HELLASWAG))) in found
    others = [(name, figure) for name, figure in found if figure not in (str(OPENAI_124M_HELLASWAG), "0.2859")]
    assert others == [("docs/evaluation.md", "0.2945")], others

"""The README's commands paste: every command in its bash blocks, every `python ...` in its prose and every row of
its seed table runs a script of the project with flags it accepts, and names no file outside the repository; the
test command is the one CI runs; and the CPU demo's commands, pasted in order into a copy of the repository, run and
change no committed file (the reference logs of the README's runs included).

python -m pytest tests/test_readme.py -q
"""

import contextlib
import hashlib
import importlib
import io
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


def seed_table_commands(text: str) -> list[list[str]]:
    """Each row of the seed table whose command cell holds flags, after the command the header names."""
    header = re.search(r"\| command: `(python train_gpt2.py [^`]+)` and \|", text)
    rows = re.findall(r"^\| [\d–]+ \|[^|]*\| `(--[^`]+)` \|", text, flags=re.M)
    return [shlex.split(header.group(1)) + shlex.split(row) for row in rows]


def every_command() -> list[list[str]]:
    found = [command for block in bash_blocks(README) for command in commands(block)]
    return found + prose_commands(README) + seed_table_commands(README)


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


def test_the_readme_is_read_whole():
    """The parsing above finds what it should: a change of the README's layout must not empty the tests below."""
    runs = [script_and_args(command) for command in every_command()]
    scripts = {run[0] for run in runs if run}
    assert scripts == set(SCRIPTS), scripts
    assert len(seed_table_commands(README)) == 6  # steps 1, 2, 3-4, 5, 8 and 10
    assert any(command[:2] == ["torchrun", "--standalone"] for command in every_command())


@pytest.mark.parametrize("command", every_command(), ids=lambda command: " ".join(command)[:80])
def test_each_command_names_a_script_that_accepts_its_flags(command):
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
    quickstart = [command for block in bash_blocks(README)[:2] for command in commands(block)]
    test_command = next(command for command in quickstart if command[1:3] == ["-m", "pytest"])
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert shlex.join(test_command) in ci


def test_the_cpu_demo_runs_as_written_and_changes_no_committed_file(tmp_path):
    """The README's --plan block and CPU demo block, pasted in order (the training shortened), then the sample
    command its prose gives, in a copy of the repository with Tiny Shakespeare in the download cache."""
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

    blocks = [
        block for block in bash_blocks(README) if "--dataset tinyshakespeare" in block and "runs/cpu-demo" in block
    ]
    assert len(blocks) == 2 and "--plan" in blocks[0]
    sample = [command for command in prose_commands(README) if "runs/cpu-demo/best.pt" in command and
              command[1] == "sample.py"]  # fmt: skip
    for command in [command for block in blocks for command in commands(block)] + sample:
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

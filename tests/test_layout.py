"""The project's layout: the root holds the scripts people run, the package never imports them, and the scripts
import the package and at most the chapter.

Run with `python -m pytest tests/test_layout.py -q`.
"""

import ast
import pkgutil
import re
import subprocess
import sys

import pytest

import gpt2lite
from conftest import REPO

SCRIPTS = {"train_gpt2", "prepare_data", "plot_losses", "sample", "evaluate", "export", "bench"}
PACKAGE_MODULES = sorted(info.name for info in pkgutil.iter_modules(gpt2lite.__path__))


def imported_names(path) -> set[str]:
    """The top-level names a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_root_holds_only_the_scripts_people_run():
    assert {path.stem for path in REPO.glob("*.py")} == SCRIPTS


@pytest.mark.parametrize("module", PACKAGE_MODULES)
def test_a_package_module_imports_no_script_even_indirectly(module):
    # a fresh interpreter: what this module pulls in is all that sys.modules holds beside the standard library's
    probe = f"import sys, gpt2lite.{module}; print(' '.join(sorted(set(sys.modules) & set({sorted(SCRIPTS)!r}))))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"gpt2lite.{module} imports {result.stdout.strip()}"


def test_no_package_module_names_a_script_in_an_import():
    for module in PACKAGE_MODULES:
        assert not imported_names(REPO / "gpt2lite" / f"{module}.py") & SCRIPTS, module


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_import_the_package_and_at_most_the_chapter(script):
    others = imported_names(REPO / f"{script}.py") & SCRIPTS - {script}
    assert others <= {"train_gpt2"}, f"{script}.py imports {others - {'train_gpt2'}}"
    if script == "train_gpt2":
        assert not others


# --- the README's figures of the chapter, checked against the file ----------------------------------------------

RULER = "# " + "-" * 112


def chapter_sections() -> list[tuple[int, int]]:
    """First and last line of each part of train_gpt2.py between its rulers: the preamble, then the seven sections."""
    lines = (REPO / "train_gpt2.py").read_text().splitlines()
    rulers = [i for i, line in enumerate(lines) if line == RULER]
    bounds = [0, *rulers, len(lines)]
    return [(start + 1, end) for start, end in zip(bounds, bounds[1:])]


def test_the_readme_states_the_chapters_sizes_as_they_are():
    readme = (REPO / "README.md").read_text()
    chapter = (REPO / "train_gpt2.py").read_text()
    tree = ast.parse(chapter)
    section = readme[readme.index("## Reading `train_gpt2.py`") :]
    section = section[: section.index("\n## ", 1)]
    stated = [(int(a), int(b)) for a, b in re.findall(r"^\| (\d+)–(\d+) \|", section, re.M)]
    assert stated == chapter_sections(), "README, Reading train_gpt2.py: the sections' lines"
    assert f"It is {len(chapter.splitlines())} lines" in section
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    longest = max(node.end_lineno - node.lineno + 1 + len(node.decorator_list) for node in functions)
    assert f"no function is longer than {longest} lines" in section
    gpt = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "GPT")
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    loop = next(node for node in ast.walk(train) if isinstance(node, ast.For))
    assert f"`class GPT` starts at line {gpt.lineno} and the training loop at line {loop.lineno}" in section
    assert len(chapter.splitlines()) <= 950, "the chapter's budget"
    defined = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined |= {f"GPT.{node.name}": node.lineno for node in gpt.body if isinstance(node, ast.FunctionDef)}
    pointers = re.findall(r"`([\w.]+)` \(line (\d+)\)", " ".join(section.split()))
    assert len(pointers) >= 6 and all(defined[name] == int(line) for name, line in pointers), pointers


def test_docs_code_states_each_sections_length_as_it_is():
    code = (REPO / "docs" / "code.md").read_text()
    stated = [int(n) for n in re.findall(r"^### \d\. [^(\n]+\((\d+) lines\)", code, re.M)]
    assert stated == [end - start + 1 for start, end in chapter_sections()], "docs/code.md: the sections' lengths"
    chapter = (REPO / "train_gpt2.py").read_text()
    functions = [node for node in ast.walk(ast.parse(chapter)) if isinstance(node, ast.FunctionDef)]
    longest = max(node.end_lineno - node.lineno + 1 + len(node.decorator_list) for node in functions)
    words = " ".join(code.split())
    assert f"It is {len(chapter.splitlines())} lines" in words and f"longer than {longest} lines" in words

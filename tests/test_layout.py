"""The project's layout: the root holds the scripts people run, the package never imports them, and the scripts
import the package and at most the chapter.

Run with `python -m pytest tests/test_layout.py -q`.
"""

import ast
import pkgutil
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

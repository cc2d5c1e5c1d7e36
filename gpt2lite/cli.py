"""
The command line every gpt2-lite script shares: one-line errors for bad input, every problem found at once, --help
with each default, and the wrapper that turns an error into an exit status without a traceback.

  from gpt2lite.cli import InputError, run_cli
"""

import argparse
import os
import sys
from typing import Callable


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line (a line per problem where
    several were found together, see `Problems`).

    Command-line scripts print it and exit non-zero (see `run_cli`); library callers can catch it as ValueError.
    """


class Problems:
    """The InputErrors of independent checks, gathered so that a user who made three mistakes hears of all three
    at once instead of one per attempt:

        problems = Problems()
        with problems:
            check_the_flags(args)       # an InputError here is recorded, and the next check runs
        with problems:
            check_the_data(args)
        problems.raise_any()            # one InputError, a line per problem (each problem once)
    """

    def __init__(self):
        self.lines: list[str] = []

    def add(self, *lines: str):
        self.lines += [line for line in lines if line not in self.lines]

    def __enter__(self) -> "Problems":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, InputError):  # recorded and swallowed: the next check runs
            self.add(*(str(error).splitlines() or [type(error).__name__]))
            return True
        return False  # any other exception is a bug, and propagates

    def __bool__(self) -> bool:
        return bool(self.lines)

    def raise_any(self):
        if self.lines:
            raise InputError("\n".join(self.lines))


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None):
    """Sampling's settings (train_gpt2.stream), each out of its range with one line."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


# --- the command line -------------------------------------------------------------------------------------------


class DefaultsFormatter(argparse.HelpFormatter):
    """--help with each option's default once: added where its help does not say it already, left out where there
    is none to show (None, a flag that is off). An option whose None means something says what in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:  # the hook argparse's own formatters override
        text = action.help or ""
        nothing_to_show = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or nothing_to_show or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag gets one line naming the problem, not the whole usage block, and --help
    shows each default once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None):
    """Run a script's main(argv); bad input ends it with one line per problem on stderr and exit status 1, no
    traceback. Under torchrun every process meets the same bad input, and rank 0 alone says so."""
    script = os.path.basename(sys.argv[0])
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        main(argv)
    except InputError as e:
        if not quiet:
            for line in str(e).splitlines():
                print(f"{script}: error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: files are written atomically, so nothing is left half-written
        if not quiet:
            print(f"{script}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)

"""
Files that are never left half-written, and reading the ones people hand us with a line that says what is wrong.
"""

import json
import os
import tempfile
from typing import BinaryIO, Callable

from gpt2lite.cli import InputError, first_line


def write_atomically(path: str, write: Callable[[BinaryIO], object]):
    """Call write(file) on a temporary file, then rename it to path: a crash never leaves a file that looks
    finished, and an existing file is replaced only by a complete one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave a renamed empty file
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_json(path: str, what: str, fix: str = "") -> dict:
    """A JSON file's contents, or one line naming the file, what it should have been, and the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable {what} ({first_line(e)}){fix}") from None


def read_text(path: str) -> str:
    """A text file's contents, or one line saying where it is not UTF-8 and how to convert it."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path} is UTF-16 text, not UTF-8: convert it first (iconv -f utf-16 -t utf-8)")
    if b"\x00" in data:  # text has no NUL bytes in UTF-8 or in any single-byte encoding
        raise InputError(f"{path} is not text (it holds NUL bytes: a binary file?): pass text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start:,} cannot be decoded "
            "(convert it first, e.g. iconv -f latin1 -t utf-8)"
        ) from None

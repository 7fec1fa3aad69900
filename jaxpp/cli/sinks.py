"""Where answer lines go: an --output file (each line written whole and fsync'd), stdout, or,
for --prompt without --output, just the completion text.

A line is always valid UTF-8: a string that is not (an unpaired surrogate from a JSON escape)
is written with '?' in its place. A write that fails raises OutputError: nothing more can be
answered, the run stops (exit 3) and --resume continues it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jaxpp.cli.errors import OutputError, UsageError

# Characters json.dumps leaves raw that str.splitlines() (and other readers) take for line
# breaks: escaped, so that every answer stays one line for any reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def encode_line(record: dict) -> bytes:
    text = json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS)
    return (text + "\n").encode("utf-8", "replace")


class FileSink:
    """Appends whole lines with one unbuffered write each, then fsyncs: a kill can tear at most
    the line being written, which is the file's last (and scan_output truncates it)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = open_locked(path)

    def write(self, record: dict) -> None:
        data = memoryview(encode_line(record))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
        except OSError as e:
            raise OutputError(f"cannot write --output {self.path}: {e.strerror}") from e

    def replace_fd(self, fd: int) -> None:
        """Continue into another open, locked file now at `path` (see resume.drop_errors)."""
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class NullSink:
    """Where the answers of a process other than 0 go: process 0 writes them."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_locked(path: Path) -> int:
    """`path` opened for appending and locked (flock) for this run alone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot open --output {path}: {e.strerror}") from None
    try:
        import fcntl  # noqa: PLC0415 - POSIX only

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        os.close(fd)
        raise UsageError(f"{path} is being written by another jaxpp run") from None
    return fd


class StdoutSink:
    def write(self, record: dict) -> None:
        try:
            sys.stdout.write(encode_line(record).decode("utf-8"))
            sys.stdout.flush()
        except BrokenPipeError:  # `jaxpp generate ... | head`: main() ends quietly
            raise
        except OSError as e:
            raise OutputError(f"cannot write to stdout: {e.strerror}") from e

    def close(self) -> None:
        pass


class TextSink:
    """--prompt without --output: just the completion text; an error goes to stderr."""

    def __init__(self, prog: str):
        self.prog = prog

    def write(self, record: dict) -> None:
        if "error" in record:
            print(f"{self.prog}: error: {record['error']}", file=sys.stderr)
        else:
            print(record["text"], flush=True)

    def close(self) -> None:
        pass

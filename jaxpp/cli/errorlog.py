"""Where tracebacks go: the one file an internal error (or an unexpected failure of a single
request) is written to, so that stderr and the answer lines stay one line each.

The file is created on first use only; a run that meets nothing unexpected leaves none behind.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


def log_path_for(output: str | None) -> Path:
    """`<output>.log` beside an --output file (resumed runs append to it), else a fresh file in
    the temporary directory."""
    if output not in (None, "-"):
        return Path(f"{output}.log")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"jaxpp-{stamp}-{os.getpid()}.log"


class TracebackLog:
    def __init__(self, path: Path):
        self.path = path
        self.entries = 0

    def record(self, title: str, error: BaseException) -> str:
        """Append `error`'s traceback under `title`; return where it is, for a message."""
        try:
            with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {title}\n")
                f.write("".join(traceback.format_exception(error)))
        except OSError as e:
            return f"no traceback: cannot write {self.path}: {e.strerror}"
        self.entries += 1
        return f"traceback in {self.path}"

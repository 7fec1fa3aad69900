"""Resume: what an existing output file already answers, read back (and a torn last line cut)
before a run appends to it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jaxpp.cli.errors import UsageError
from jaxpp.cli.formats import id_key
from jaxpp.cli.sinks import FileSink, open_locked


@dataclasses.dataclass
class Answered:
    ids: set = dataclasses.field(default_factory=set)  # id keys of successful answers
    error_lines: set = dataclasses.field(default_factory=set)  # input lines answered by errors
    records: int = 0
    errors: int = 0


def scan_output(path: Path) -> Answered:
    """Read what `path` answers, first truncating a torn last line (no newline / bad JSON).

    Only the last line can be torn: every line is written whole, with one write call, before
    the next one starts. Anything else that is not a jaxpp answer means the file is not ours:
    UsageError, and the file is left as it is.
    """
    answered = Answered()
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # the bytes after the last newline: a torn write
        lines = data[:end].split(b"\n")[:-1]
        count = 0
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not ({"id", "custom_id"} & set(rec)):
                if rec is None and number == len(lines) and count:
                    end -= len(raw) + 1  # a complete-looking but invalid last line: torn too
                    break
                raise UsageError(
                    f"{path}: line {number} is not a jaxpp answer; refusing to "
                    "resume into it (fix or remove the file)"
                )
            count += 1
            _record_answer(answered, rec)
        if end < len(data) and not data[end:].lstrip().startswith(b"{") and not count:
            raise UsageError(f"{path} is not a jaxpp answer file; refusing to resume into it")
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return answered


def _record_answer(answered: Answered, rec: dict) -> None:
    answered.records += 1
    if rec.get("error") is not None:
        answered.errors += 1
        if isinstance(rec.get("line"), int):
            answered.error_lines.add(rec["line"])
    elif "custom_id" in rec:
        answered.ids.add(id_key(rec["custom_id"]))
    else:
        answered.ids.add(id_key(rec["id"]))


def drop_errors(path: Path, sink: FileSink) -> int:
    """--retry-errors: rewrite `path` without its error records, so that their input lines are
    answered again; every other record stays, byte for byte. Returns how many were dropped.

    Crash-safe: the kept records go to a locked temporary file that is fsync'd and then renamed
    over `path` (atomic), and `sink` continues into it. A kill before the rename leaves `path`
    as it was; after it, the dropped lines are simply unanswered, which any --resume fixes.
    """
    data = path.read_bytes()
    kept, dropped = [], 0
    for raw in data.splitlines(keepends=True):
        rec = json.loads(raw) if raw.strip() else None
        if isinstance(rec, dict) and rec.get("error") is not None:
            dropped += 1
        else:
            kept.append(raw)
    if not dropped:
        return 0
    tmp = path.with_name(f".{path.name}.retry-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = open_locked(tmp)
    try:
        view = memoryview(b"".join(kept))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    sink.replace_fd(fd)
    return dropped


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

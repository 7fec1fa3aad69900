"""Resume: what an existing output file already answers, read back (and a torn last line cut)
before a run appends to it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jaxpp.cli.errors import UsageError
from jaxpp.cli.formats import id_key


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

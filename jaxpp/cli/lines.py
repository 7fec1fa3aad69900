"""Input lines, read with bounded memory: a line longer than --max-line-bytes is skipped in
chunks (never held whole) and reported as an `OversizedLine`, which becomes its error line."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import BinaryIO

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class OversizedLine:
    size: int  # bytes read before the newline (at least max_bytes + 1)


def read_lines(stream: BinaryIO, max_bytes: int) -> Iterator[bytes | OversizedLine]:
    """Each line of `stream` without its newline, or OversizedLine when it is too long."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line.rstrip(b"\n")
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(_CHUNK)
            if not line:
                break
            size += len(line)
        yield OversizedLine(size - line.endswith(b"\n"))


def count_lines(stream: BinaryIO) -> int:
    """Lines in `stream` (a last line without a newline counts), in bounded memory."""
    count, last = 0, b"\n"
    while chunk := stream.read(_CHUNK):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (last != b"\n")

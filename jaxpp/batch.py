"""A scheduler's decision for one tick -> the tick's flat arrays, and the token buckets.

The scheduler (scheduler.py) decides, for each tick and each pipeline replica, which rows feed a
decode token and which prompt chunks enter (`TickPlan`). `pack` turns that into ONE pytree of
flat arrays sized by a token bucket T (`TickBatch`), what the device program (pipeline.py)
reads: per token slot its row, position and token id; per prompt query group its first slot
and length; per row of the entering micro-batch the slot whose output gives its next token.

    slots    0    1    2    3  | 4  ...  19 | 20 ... 27 | 28 ... 31
             decode rows 5,0,2,7 | row 3's prompt [40, 56) | row 6's [0, 8) | empty
    token    -1   -1   -1   -1 | prompt token ids        | ...            | -1
    groups                       (4, 16)                   (20, 8)

A decode slot names only its row: the device feeds the row's next token at the row's next
position (a speculating row's next k slots: its drafts at the positions after, their
`position` the offset 1 .. k: speculation.py), if the row is still live there (the host plans
one call ahead of what it has read, so a row it believes decoding may have finished on the
device; the device's row state says).
Decode slots come first, prompt chunks follow, each cut into query groups of at most
`QUERY_BLOCK` tokens of one row (attention.py). A program is compiled per bucket, never per
mix: T comes from a handful of sizes (`Buckets`), the rest of a tick is data.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxpp.attention import QUERY_BLOCK

SMALLEST_BUCKET = 16  # token slots of the smallest program (fewer only when a micro-batch has
# fewer rows): one query group; below it a tick's GEMMs read the same weights for less work


class TickBatch(NamedTuple):
    """What enters stage 0 at one tick, per pipeline replica: T token slots, G = T // 16
    prompt query groups, mb rows of the entering micro-batch. Host numpy or device arrays."""

    token: np.ndarray  # i32 [replicas, T]: a prompt token's id; -1: decode slot or empty
    row: np.ndarray  # i32 [replicas, T]: the slot's row within its replica; -1: empty
    position: np.ndarray  # i32 [replicas, T]: a prompt token's position; a decode slot's
    # offset after its row's next token (0, or 1 .. k for a speculating row's drafts)
    group_start: np.ndarray  # i32 [replicas, G]: first slot of each prompt query group
    group_len: np.ndarray  # i32 [replicas, G]: its queries; 0 = unused
    sample: np.ndarray  # i32 [replicas, mb]: per row of the micro-batch, the slot whose
    # output gives its next token (its decode slot or its prompt's last token); -1 = none


@dataclasses.dataclass
class Chunk:
    """The next tokens of one row's prompt (its sequence: prompt + tokens it had)."""

    row: int  # within its replica
    start: int  # position of its first token
    tokens: list[int]
    last: bool  # it ends the prompt: the row's next token is sampled from its last slot

    @property
    def groups(self) -> int:
        return -(-len(self.tokens) // QUERY_BLOCK)


@dataclasses.dataclass
class TickPlan:
    """The scheduler's decision for one tick and one replica."""

    decode: list[int] = dataclasses.field(default_factory=list)  # rows that feed a token
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    drafts: int = 0  # slots for drafts after each decode row's token (speculation.py)

    @property
    def decode_slots(self) -> int:
        return len(self.decode) * (self.drafts + 1)

    @property
    def slots(self) -> int:
        return self.decode_slots + sum(len(c.tokens) for c in self.chunks)

    @property
    def groups(self) -> int:
        return sum(c.groups for c in self.chunks)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


def pack(plans: list[TickPlan], bucket: int, rows: int, microbatch: int) -> TickBatch:
    """The arrays of one tick (one plan per replica) in `bucket` slots; `rows` per micro-batch
    (mb), `microbatch` the one entering (its rows are microbatch * mb + 0 .. mb - 1)."""
    replicas, groups = len(plans), max(bucket // QUERY_BLOCK, 1)
    batch = TickBatch(
        token=np.full((replicas, bucket), -1, np.int32),
        row=np.full((replicas, bucket), -1, np.int32),
        position=np.zeros((replicas, bucket), np.int32),
        group_start=np.zeros((replicas, groups), np.int32),
        group_len=np.zeros((replicas, groups), np.int32),
        sample=np.full((replicas, rows), -1, np.int32),
    )
    first_row = microbatch * rows
    for d, plan in enumerate(plans):
        assert plan.slots <= bucket and plan.groups <= groups, (plan.slots, bucket)
        width, n = plan.drafts + 1, plan.decode_slots
        batch.row[d, :n] = np.repeat(plan.decode, width)
        batch.position[d, :n] = np.tile(np.arange(width), len(plan.decode))
        batch.sample[d, np.asarray(plan.decode, np.int64) - first_row] = np.arange(0, n, width)
        g = 0
        for chunk in plan.chunks:
            size = len(chunk.tokens)
            batch.token[d, n : n + size] = chunk.tokens
            batch.row[d, n : n + size] = chunk.row
            batch.position[d, n : n + size] = np.arange(chunk.start, chunk.start + size)
            for offset in range(0, size, QUERY_BLOCK):
                batch.group_start[d, g] = n + offset
                batch.group_len[d, g] = min(QUERY_BLOCK, size - offset)
                g += 1
            if chunk.last:
                batch.sample[d, chunk.row - first_row] = n + size - 1
            n += size
    return batch


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The token buckets a configuration compiles: powers of two from the smallest (16, or
    the rows of a micro-batch when fewer) up to the budget's. Prompt work can be cut anywhere,
    decode work cannot: a tick takes the largest bucket its decode rows and the prompt work
    at hand fill, and pads only when the work is short of the next size up."""

    sizes: tuple[int, ...]

    @staticmethod
    def of(rows: int, budget: int) -> Buckets:
        """For `rows` decode rows per micro-batch and `budget` tokens per tick."""
        smallest = min(SMALLEST_BUCKET, _power_of_two(rows))
        largest = _power_of_two(max(budget, rows))
        sizes = [smallest]
        while sizes[-1] < largest:
            sizes.append(max(sizes[-1] * 2, SMALLEST_BUCKET))
        return Buckets(tuple(sizes))

    def up(self, n: int) -> int:
        """The smallest bucket holding n slots."""
        return next((s for s in self.sizes if s >= n), self.sizes[-1])

    def fit(self, decode: int, work: int) -> int:
        """The bucket of a tick with `decode` decode slots and `work` slots of prompt work at
        hand (any part of which may wait): the largest size the work fills (the next size
        down), or the smallest that holds it all when that pads a quarter or less."""
        need = self.up(decode + work)
        filled = max((s for s in self.sizes if decode < s <= decode + work), default=0)
        if 2 * filled < need or 4 * (need - decode - work) <= need:
            return need
        return filled


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()

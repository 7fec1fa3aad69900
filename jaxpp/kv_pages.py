"""Where a sequence's KV lives: the host side of the paged cache. No device code here.

Each pipeline replica has a pool of `pages` pages of `block_size` positions (pipeline.py holds
one such pool per layer slot on every stage: a page id names the same positions on every stage,
each stage holding its own layers' part of it). A row (a sequence being served) owns the pages
listed in its block-table row, in position order; position p of the row's sequence lives at
page `tables[row, p // block_size]`, offset `p % block_size`. Columns past the row's pages hold
0: attention never sees a position past its query, so what they point at is never used.

Pages go back to the pool in two ways. A request that finished on the device (the host learns
it from a call's log) wrote its last key then: its pages are free for the next call planned. A
request the host withdraws (a stop string, an abort, a preemption) may still have a token in
flight in the call that carries the withdrawal: its pages come back once that call has run,
i.e. for the call after it (`release(row, after=call)`).
"""

from __future__ import annotations

import numpy as np


class PagePool:
    def __init__(
        self, replicas: int, pages: int, block_size: int, rows_per_replica: int, pages_per_seq: int
    ):
        self.replicas = replicas
        self.pages = pages
        self.block_size = block_size
        self.rows_per_replica = rows_per_replica
        # Free pages per replica; pop() hands out the lowest id first.
        self._free = [list(range(pages - 1, -1, -1)) for _ in range(replicas)]
        self._owned: dict[int, list[int]] = {}  # row -> its pages, in position order
        self._later: list[tuple[int, int]] = []  # (call, row): released once `call` is planned
        self.tables = np.zeros((replicas * rows_per_replica, pages_per_seq), np.int32)
        self.changed = True  # the tables differ from what the device last got
        self.peak = 0  # most pages in use at once

    @property
    def total(self) -> int:
        return self.replicas * self.pages

    @property
    def in_use(self) -> int:
        return self.total - sum(len(f) for f in self._free)

    def replica_of(self, row: int) -> int:
        return row // self.rows_per_replica

    def free_pages(self, replica: int) -> int:
        return len(self._free[replica])

    def pages_of(self, row: int) -> int:
        return len(self._owned.get(row, ()))

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def grow(self, row: int, positions: int) -> bool:
        """Give `row` pages for its first `positions` positions; False, taking nothing, if its
        replica's pool has too few free pages."""
        owned = self._owned.setdefault(row, [])
        need = self.pages_for(positions) - len(owned)
        if need <= 0:
            return True
        free = self._free[self.replica_of(row)]
        if need > len(free):
            return False
        new = [free.pop() for _ in range(need)]
        self.tables[row, len(owned) : len(owned) + need] = new
        owned.extend(new)
        self.changed = True
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, row: int, after: int | None = None) -> None:
        """Return the row's pages: now, or once call `after` has been planned (the device may
        still write them during that call)."""
        if after is not None:
            self._later.append((after, row))
            return
        owned = self._owned.pop(row, [])
        self._free[self.replica_of(row)].extend(reversed(owned))
        self.tables[row] = 0
        self.changed = self.changed or bool(owned)

    def planning(self, call: int) -> None:
        """Call `call` is being planned: pages withdrawn in earlier calls are free again."""
        due = [row for after, row in self._later if after < call]
        self._later = [(after, row) for after, row in self._later if after >= call]
        for row in due:
            self.release(row)

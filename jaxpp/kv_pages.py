"""Where a sequence's KV lives: the host side of the paged cache and its prefix cache. No device
code here.

Each pipeline replica has a pool of `pages` pages of `block_size` positions (pipeline.py holds
one such pool per layer slot on every stage: a page id names the same positions on every stage,
each stage holding its own layers' part of it). A row (a sequence being served) holds the pages
listed in its block-table row, in position order; position p of the row's sequence lives at
page `tables[row, p // block_size]`, offset `p % block_size`. Columns past the row's pages hold
0: attention never sees a position past its query, so what they point at is never used.

Pages go back to the pool in two ways. A request that finished on the device (the host learns
it from a call's log) wrote its last key then: its pages are free for the next call planned. A
request the host withdraws (a stop string, an abort, a preemption) may still have a token in
flight in the call that carries the withdrawal: its pages come back once that call has run,
i.e. for the call after it (`release(row, after=call)`).

Prefix caching. A full page is findable by its KEY: (the serial of the page before it in its
sequence, or -1 for the first, and the page's block_size tokens), so a key names one exact
prefix, with no hash to collide. A row's pages become findable as soon as their tokens are
planned (`publish`): every planned token is computed, and a reader's tokens enter the ring at
the same tick or later, so each stage writes a page before any reader reads it there. A new
request takes the pages of its longest findable prefix (`lookup`, `share`) and computes only
the rest. Pages are reference-counted: a page some row holds is never evicted, and never
written (a reader starts computing past its shared pages; the writer has moved past them). A
findable page no row holds is IDLE: still findable, and the first to be evicted when the free
pages run out, least recently released first (a sequence's deepest page first, so that its
shorter prefixes stay).

    pages  0 1 2 3 4 5 6 7
    row 0  [0][1][2]          prompt A, pages 0-1 full and findable, 2 partial
    row 1  [0][1][3]          prompt A' = A's first 2 pages + its own: shares 0 and 1
    free   4 5 6 7            idle: none (refs: 0 -> 2, 1 -> 2, 2 -> 1, 3 -> 1)
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

Key = tuple[int, tuple[int, ...]]  # (serial of the previous page or -1, the page's tokens)


class PagePool:
    def __init__(
        self,
        replicas: int,
        pages: int,
        block_size: int,
        rows_per_replica: int,
        pages_per_seq: int,
        prefix_caching: bool = False,
    ):
        self.replicas = replicas
        self.pages = pages
        self.block_size = block_size
        self.rows_per_replica = rows_per_replica
        self.prefix_caching = prefix_caching
        # Pages holding nothing findable, per replica; pop() hands out the lowest id first.
        self._free = [list(range(pages - 1, -1, -1)) for _ in range(replicas)]
        self._refs = np.zeros((replicas, pages), np.int32)  # rows holding each page
        self._idle: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
        self._found: list[dict[Key, int]] = [{} for _ in range(replicas)]  # key -> page
        self._key: list[dict[int, tuple[Key, int]]] = [{} for _ in range(replicas)]  # page ->
        self._serial = 0  # (its key, its serial)
        self._owned: dict[int, list[int]] = {}  # row -> its pages, in position order
        self._published: dict[int, tuple[int, int]] = {}  # row -> (pages done, last serial)
        self._later: list[tuple[int, int]] = []  # (call, row): released once `call` is planned
        self.tables = np.zeros((replicas * rows_per_replica, pages_per_seq), np.int32)
        self.changed = True  # the tables differ from what the device last got
        self.peak = 0  # most pages in use at once
        self.evictions = 0  # findable pages given to another sequence

    @property
    def total(self) -> int:
        return self.replicas * self.pages

    @property
    def in_use(self) -> int:
        """Pages some row holds (idle findable pages are free to take)."""
        return self.total - sum(self.free_pages(r) for r in range(self.replicas))

    def replica_of(self, row: int) -> int:
        return row // self.rows_per_replica

    def free_pages(self, replica: int) -> int:
        return len(self._free[replica]) + len(self._idle[replica])

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
        replica = self.replica_of(row)
        if need > self.free_pages(replica):
            return False
        new = [self._take(replica) for _ in range(need)]
        self.tables[row, len(owned) : len(owned) + need] = new
        owned.extend(new)
        self.changed = True
        self.peak = max(self.peak, self.in_use)
        return True

    def _take(self, replica: int) -> int:
        """A free page, evicting the least recently released idle page if none is blank."""
        if self._free[replica]:
            page = self._free[replica].pop()
        else:
            page, _ = self._idle[replica].popitem(last=False)
            key, _ = self._key[replica].pop(page)
            del self._found[replica][key]
            self.evictions += 1
        self._refs[replica, page] = 1
        return page

    def release(self, row: int, after: int | None = None) -> None:
        """Return the row's pages: now, or once call `after` has been planned (the device may
        still write them during that call). A findable page stays findable, idle."""
        if after is not None:
            self._later.append((after, row))
            return
        replica = self.replica_of(row)
        owned = self._owned.pop(row, [])
        self._published.pop(row, None)
        for page in reversed(owned):
            self._refs[replica, page] -= 1
            if self._refs[replica, page]:
                continue
            if page in self._key[replica]:
                self._idle[replica][page] = None
            else:
                self._free[replica].append(page)
        self.tables[row] = 0
        self.changed = self.changed or bool(owned)

    def planning(self, call: int) -> None:
        """Call `call` is being planned: pages withdrawn in earlier calls are free again."""
        due = [row for after, row in self._later if after < call]
        self._later = [(after, row) for after, row in self._later if after >= call]
        for row in due:
            self.release(row)

    # --- the prefix cache ------------------------------------------------------------------

    def lookup(self, replica: int, tokens: list[int], limit: int) -> list[int]:
        """The findable pages of the longest prefix of `tokens` within its first `limit`
        positions (whole pages only)."""
        if not self.prefix_caching:
            return []
        found, pages, parent, B = self._found[replica], [], -1, self.block_size
        for i in range(limit // B):
            page = found.get((parent, tuple(tokens[i * B : (i + 1) * B])))
            if page is None:
                break
            pages.append(page)
            parent = self._key[replica][page][1]
        return pages

    def share(self, row: int, pages: list[int]) -> None:
        """Give an empty row the cached pages of its prefix (`lookup`), in position order."""
        replica = self.replica_of(row)
        assert not self._owned.get(row), "share() is for a row holding no pages"
        for page in pages:
            self._refs[replica, page] += 1
            self._idle[replica].pop(page, None)
        self._owned[row] = list(pages)
        self.tables[row, : len(pages)] = pages
        if pages:
            self._published[row] = (len(pages), self._key[replica][pages[-1]][1])
            self.changed = True
            self.peak = max(self.peak, self.in_use)

    def forget_prefixes(self) -> None:
        """Nothing is findable any more: idle pages become blank, held ones private."""
        for replica in range(self.replicas):
            self._free[replica].extend(sorted(self._idle[replica], reverse=True))
            self._idle[replica].clear()
            self._found[replica].clear()
            self._key[replica].clear()
        # Rows being served go on without a findable prefix: a serial no page has.
        self._published = {row: (len(pages), self._serial) for row, pages in self._owned.items()}
        self._serial += 1

    def publish(self, row: int, tokens: list[int], positions: int) -> None:
        """Make the row's full pages within its first `positions` positions (whose tokens are
        `tokens[:positions]`, planned) findable. A page whose key is already findable (the
        same prefix computed by another row at the same time) stays private."""
        if not self.prefix_caching:
            return
        replica, B = self.replica_of(row), self.block_size
        owned = self._owned.get(row, [])
        done, parent = self._published.get(row, (0, -1))
        for i in range(done, min(positions // B, len(owned))):
            key = (parent, tuple(tokens[i * B : (i + 1) * B]))
            page = self._found[replica].get(key)
            if page is None:
                page = owned[i]
                self._found[replica][key] = page
                self._key[replica][page] = (key, self._serial)
                self._serial += 1
            parent = self._key[replica][page][1]
            done = i + 1
        self._published[row] = (done, parent)

"""Progress on stderr: a tqdm bar on a terminal; anywhere else (nohup, CI logs, a pipe) one plain
line every few seconds, so that a long job visibly lives.

The plain lines come from a daemon thread, so they keep coming while the engine is busy with a
long call (a first compile can take minutes), and they say so: done/total, errors, tokens/s.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

BAR, LINES = "bar", "lines"


class Progress:
    def __init__(
        self,
        mode: str | None,
        total: int | None,
        initial: int = 0,
        file: TextIO | None = None,
        interval: float = 5.0,
        prog: str = "jaxpp",
    ):
        self.tokens = 0
        self.errors = 0
        self.done = initial
        self.total = total
        self.start = time.perf_counter()
        self.file = file or sys.stderr
        self.prog = prog
        self.bar = None
        self.stopped = threading.Event()
        self.thread = None
        if mode == BAR:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="prompt",
                file=self.file,
                dynamic_ncols=True,
                smoothing=0.1,
                desc="generate",
            )
        elif mode == LINES:
            self.thread = threading.Thread(
                target=self._report_every, args=(interval,), name="jaxpp-progress", daemon=True
            )
            self.thread.start()

    def advance(self, tokens: int = 0, error: bool = False) -> None:
        self.tokens += tokens
        self.errors += error
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.rate():.1f} tok/s", refresh=False)
            self.bar.update(1)

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        return (
            f"{self.prog}: {done} lines done, {self.errors} errors, {self.rate():.1f} tok/s, "
            f"{elapsed:.0f} s elapsed"
        )

    def _report_every(self, interval: float) -> None:
        while not self.stopped.wait(interval):
            try:
                print(self.line(), file=self.file, flush=True)
            except (OSError, ValueError):  # stderr closed under us: progress is optional
                return

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.bar is not None:
            self.bar.close()

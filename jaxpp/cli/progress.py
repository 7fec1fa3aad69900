"""Progress on stderr: a tqdm bar (prompts done / total, tokens/s, ETA) on a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """tqdm bar on stderr (prompts done / total, tokens/s, ETA) when enabled."""

    def __init__(self, enabled: bool, total: int | None, initial: int = 0, file=None):
        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="prompt",
                file=file or sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
                desc="generate",
            )

    def advance(self, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

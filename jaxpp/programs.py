"""The compiled tick programs of one engine, keyed by their arguments' real shapes and dtypes.

pipeline.py builds two jitted programs per tick: `forward` (one per token bucket: jit's own cache
keys it by the batch's shape, and by any other argument whose shape changes, such as the
penalty counts; in a speculating engine a proposing twin for calls that verify) and `sample`
(one per sampler mode). Nothing about a call is listed by hand, so
nothing unlisted can mismatch: a new shape compiles a new program, never a wrong one.

`LLM.warmup` compiles, before anything is served, every program a configuration can meet in
greedy and seeded traffic: `forward` for each token bucket (and its proposing twin) and `sample`
for the greedy and the sampling modes, each also in its grammar mode (structured outputs) and
verify mode (speculative decoding), by running idle ticks
through these programs. Rarer modes (logprobs, penalties, the collecting forward of LLM.logits
and prompt_logprobs) compile the first time a call needs them, once each.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax

from jaxpp.pipeline import Pipeline
from jaxpp.sampling import SamplerMode

GREEDY = SamplerMode(full_vocab=False, penalties=False, logprobs=0)
SAMPLING = SamplerMode(full_vocab=True, penalties=False, logprobs=0)
# The same with rows under a structured-output automaton (grammar.py).
GREEDY_GRAMMAR = dataclasses.replace(GREEDY, grammar=True)
SAMPLING_GRAMMAR = dataclasses.replace(SAMPLING, grammar=True)
# The same verifying drafts (speculative decoding: speculation.py).
GREEDY_VERIFY = dataclasses.replace(GREEDY, verify=True)
SAMPLING_VERIFY = dataclasses.replace(SAMPLING, verify=True)


class Programs:
    """The jitted forward and sample programs, built on first use, counted as they compile."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._forward: dict[tuple, Callable] = {}  # (collect, propose, bubble fill) -> jitted
        self._sample: dict[SamplerMode, Callable] = {}
        self._count: Callable | None = None
        self._seen: dict[tuple, tuple[Callable, tuple]] = {}  # one entry per compiled program
        self.compile_seconds = 0.0

    def forward(self, collect: bool, propose: bool, *args):
        key = (collect, propose, self.pipeline.bubble_fill)
        if key not in self._forward:
            self._forward[key] = self.pipeline.forward_program(collect, propose)
        return self._run(("forward",) + key, self._forward[key], args)

    def sample(self, mode: SamplerMode, *args):
        if mode not in self._sample:
            self._sample[mode] = self.pipeline.sample_program(mode)
        return self._run(("sample", mode), self._sample[mode], args)

    def count(self, *args):
        if self._count is None:
            self._count = self.pipeline.count_program()
        return self._run(("count",), self._count, args)

    def _run(self, name: tuple, program: Callable, args: tuple):
        before = program._cache_size()
        start = time.perf_counter()
        out = program(*args)
        if program._cache_size() != before:  # compiled now: remember its argument shapes
            self.compile_seconds += time.perf_counter() - start
            shapes = jax.tree.map(_abstract, args)
            self._seen[name + (len(self._seen),)] = (program, shapes)
        return out

    @property
    def compiled(self) -> int:
        """Programs compiled so far (a few per configuration, never one per request)."""
        return len(self._seen)

    def lowered(self, kind: str | None = None) -> list[tuple[Callable, tuple]]:
        """(jitted program, the shapes of its arguments) of every program compiled so far, or
        of those of one kind ("forward", "sample", "count"): what a test lowers to read the
        optimized HLO."""
        return [p for name, p in self._seen.items() if kind in (None, name[0])]

    def optimized_hlo(self) -> list[str]:
        return [p.lower(*shapes).compile().as_text() for p, shapes in self.lowered()]


def _abstract(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))

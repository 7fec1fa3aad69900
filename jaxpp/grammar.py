"""Structured outputs, host side: a request's constraint -> a token automaton -> device tables.

A call runs many ticks of the ring with no host round trip inside (pipeline.py), so a token
mask computed on the host for each token (vLLM's way, with xgrammar or llguidance) would let a
constrained row advance one token per call. Instead each constraint is compiled here, once,
into a deterministic finite automaton over the model's TOKENS, and the device walks it: in each
state the sampler allows only the tokens with a way on, and after sampling it looks up the next
state (sampling.grammar_allowed, sampling.grammar_advance), in the grammar sample programs only
(SamplerMode.grammar: they take the pool's tables and the rows' states, pipeline.Automata).
The automaton comes from outlines-core (one of vLLM's three structured-output engines): it
turns a regular expression and the vocabulary's token bytes into a token-level DFA (`Index`),
and a JSON schema into that regular expression. xgrammar imports torch and llguidance
computes masks on the host only; neither gives the table a device automaton needs.

What each kind becomes (docs/structured_outputs.md):
  json         outlines-core's regex of the schema (`whitespace_pattern` between tokens)
  regex        itself; choice: the alternation of the choices, each escaped
  json_object  any JSON object nested at most JSON_OBJECT_DEPTH deep (a regular language;
               arbitrary nesting is not, and a finite automaton cannot count brackets)
  grammar      ebnf.py: a grammar without recursive rules, as its regex (recursion refused)

An automaton's tables: per state, a packed bitmask of its allowed tokens (uint32 words, token
j is bit j % 32 of word j // 32, as xgrammar lays it out, cut per vocab shard), whether it
accepts (stop tokens allowed there) and whether it is terminal (no token leads on: the row is
complete); its transitions as "the next state of most allowed tokens" plus the exceptions
sorted by token (on a 4096-token vocabulary a schema's 14,343 transitions are 78 defaults and
313 exceptions; any JSON to depth 2: 80,046 -> 401 + 2,408).

The device holds one pool of these tables with a fixed capacity (`GrammarPool`): automata are
placed in it as requests need them and stay while any request uses them (identical constraints
share one: the cache is keyed by the constraint's text), and the least recently used idle ones
make room for new ones. An automaton larger than the pool, or one that does not fit beside those
in use, is refused for its own request with a message that names the sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import OrderedDict
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpp.config import StructuredOutputsParams
from jaxpp.ebnf import GrammarError, escape, grammar_regex
from jaxpp.model import VOCAB_AXES

JSON_OBJECT_DEPTH = 2  # measured: depth 2 is 401 states, 0.17 s; depth 3 1,633 states, 8.4 s
MAX_REGEX_CHARS = 200_000  # a longer expression is refused before its (slow) compilation
CACHED_AUTOMATA = 64  # compiled automata kept on the host (each at most a few MB)
# Transition exceptions the pool holds per state. Measured on the 4096-token demo vocabulary:
# 4-8 for any JSON and for schemas of free strings, 76 for tests/test_structured.py's SCHEMA
# (a maxLength string and a bounded integer count characters: the next state depends on each
# token's length). Counting constraints on a large vocabulary may need more: grammar_states.
EXCEPTIONS_PER_STATE = 256
DEFAULT_WHITESPACE = r"[ ]?"  # outlines-core's own (vLLM's outlines backend passes it on)


class GrammarTables(NamedTuple):
    """The device pool of automata (global state ids index every array's first axis)."""

    mask: jax.Array  # u32 [states, shards * words]: allowed tokens, split over VOCAB_AXES
    accepting: jax.Array  # bool [states]: the text so far is complete (stop tokens allowed)
    terminal: jax.Array  # bool [states]: no token leads on (the row is done)
    default_next: jax.Array  # i32 [states]: the next state of the tokens not in exceptions
    exc_start: jax.Array  # i32 [states]: the state's exceptions are exc_*[exc_start:exc_end]
    exc_end: jax.Array  # i32 [states]
    exc_token: jax.Array  # i32 [exceptions]: sorted by token within a state
    exc_next: jax.Array  # i32 [exceptions]


TABLE_SPECS = GrammarTables(P(None, VOCAB_AXES), P(), P(), P(), P(), P(), P(), P())


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """How the device splits the vocabulary: `shards` slices of `width` ids each."""

    vocab_size: int  # the model's real vocabulary (ids past it are never allowed)
    shards: int
    width: int

    @property
    def words(self) -> int:
        """Mask words per state and shard."""
        return -(-self.width // 32)


@dataclasses.dataclass
class Automaton:
    """One constraint's token automaton, states numbered from 0 (the start)."""

    key: str
    mask: np.ndarray  # u32 [states, shards * words]
    accepting: np.ndarray  # bool [states]
    terminal: np.ndarray  # bool [states]
    default_next: np.ndarray  # i32 [states]
    exc_start: np.ndarray  # i32 [states]
    exc_end: np.ndarray  # i32 [states]
    exc_token: np.ndarray  # i32 [exceptions]
    exc_next: np.ndarray  # i32 [exceptions]

    @property
    def states(self) -> int:
        return len(self.accepting)

    @property
    def exceptions(self) -> int:
        return len(self.exc_token)

    def next_state(self, state: int, token: int) -> int:
        """The state after `token` (the device's rule: its exception, else the default)."""
        lo, hi = self.exc_start[state], self.exc_end[state]
        at = lo + int(np.searchsorted(self.exc_token[lo:hi], token))
        if at < hi and self.exc_token[at] == token:
            return int(self.exc_next[at])
        return int(self.default_next[state])

    def allowed(self, state: int, layout: VocabLayout) -> np.ndarray:
        """bool [vocab_size]: the tokens `state` allows (its mask, unpacked)."""
        words = self.mask[state].reshape(layout.shards, layout.words).astype("<u4")
        bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
        return bits[:, : layout.width].reshape(-1)[: layout.vocab_size].astype(bool)


# --- constraint -> regex --------------------------------------------------------------------


def constraint_regex(so: StructuredOutputsParams) -> str:
    """The regular expression every output of `so` matches in full."""
    from outlines_core.json_schema import build_regex_from_schema  # noqa: PLC0415

    whitespace = "" if so.disable_any_whitespace else so.whitespace_pattern
    kind = so.kind
    if kind == "regex":
        return so.regex
    if kind == "choice":
        return "(" + "|".join(escape(c) for c in so.choice) + ")"
    if kind == "grammar":
        return grammar_regex(so.grammar)
    if kind == "json_object":
        return json_object_regex(JSON_OBJECT_DEPTH, _whitespace(whitespace))
    try:
        schema = json.loads(so.json)
    except ValueError as e:
        raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError("structured_outputs.json must be a JSON schema (an object)")
    ranges: list[str] = []
    schema = _with_integer_ranges(schema, "$", ranges)
    try:
        regex = build_regex_from_schema(json.dumps(schema), whitespace)
    except (ValueError, TypeError) as e:
        raise ValueError(f"structured_outputs.json: this schema is not supported: {e}") from None
    for i, pattern in enumerate(ranges):
        regex = regex.replace(f'"{_RANGE_MARK}{i}"', f"({pattern})")
    return regex


# Keywords outlines-core would ignore, so that an output could break them: refused.
UNENFORCED = (
    "multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "patternProperties",
    "propertyNames", "dependentRequired", "dependentSchemas", "dependencies", "if", "then",
    "else", "not", "minProperties", "maxProperties", "unevaluatedProperties",
    "unevaluatedItems",
)  # fmt: skip
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_RANGE_MARK = "jaxppIntegerRange"


def _with_integer_ranges(node, path: str, ranges: list[str]):
    """The schema with every bounded integer replaced by a marker constant whose place in the
    regex takes the bounds' own regex (int_range_regex), and every keyword the regex could not
    enforce refused, naming it and where it is."""
    if isinstance(node, list):
        return [_with_integer_ranges(x, f"{path}[{i}]", ranges) for i, x in enumerate(node)]
    if not isinstance(node, dict):
        return node
    for key in UNENFORCED:
        if key in node:
            raise ValueError(
                f"structured_outputs.json: keyword {key!r} at {path} is not supported (the "
                "grammar engine could not guarantee it)"
            )
    bounds = [k for k in _BOUNDS if k in node]
    if bounds and node.get("type") != "integer":
        raise ValueError(
            f"structured_outputs.json: {bounds[0]!r} at {path} is supported on integers only"
        )
    if bounds:
        low, high = _integer_bounds(node, path)
        ranges.append(int_range_regex(low, high))
        return {"const": f"{_RANGE_MARK}{len(ranges) - 1}"}
    skip = ("enum", "const", "default", "examples")  # values, not schemas
    return {
        k: v if k in skip else _with_integer_ranges(v, f"{path}.{k}", ranges)
        for k, v in node.items()
    }


def _integer_bounds(node: dict, path: str) -> tuple[int | None, int | None]:
    """[low, high] of a bounded integer (exclusive bounds as numbers, or draft 4's booleans)."""

    def bound(key: str, up: bool, exclusive: bool) -> int | None:
        value = node.get(key)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, int | float):
            raise ValueError(f"structured_outputs.json: {key} at {path} must be a number")
        if exclusive:
            return math.floor(value) + 1 if up else math.ceil(value) - 1
        return math.ceil(value) if up else math.floor(value)

    lows = [
        bound("minimum", True, node.get("exclusiveMinimum") is True),
        bound("exclusiveMinimum", True, True),
    ]
    highs = [
        bound("maximum", False, node.get("exclusiveMaximum") is True),
        bound("exclusiveMaximum", False, True),
    ]
    low = max((b for b in lows if b is not None), default=None)
    high = min((b for b in highs if b is not None), default=None)
    if low is not None and high is not None and low > high:
        raise ValueError(f"structured_outputs.json: no integer satisfies the bounds at {path}")
    return low, high


def int_range_regex(low: int | None, high: int | None) -> str:
    """A regex of the integers in [low, high] as JSON writes them (None: unbounded)."""
    parts = []
    if low is None or low < 0:  # the negatives: "-" and their magnitudes
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        parts.append("-(" + _naturals(bottom, top) + ")")
    if high is None or high >= 0:
        parts.append(_naturals(max(low or 0, 0), high))
    return "|".join(parts)


def _naturals(low: int, high: int | None) -> str:
    """The naturals in [low, high] (high None: unbounded), without leading zeros."""
    digits = len(str(low))
    last = digits if high is None else len(str(high))
    parts = []
    for n in range(digits, last + 1):
        lo = max(low, 10 ** (n - 1) if n > 1 else 0)
        hi = 10**n - 1 if high is None else min(high, 10**n - 1)
        if lo <= hi:
            parts.append(_same_width(lo, hi, n))
    if high is None:
        parts.append(f"[1-9][0-9]{{{digits},}}")
    return "|".join(parts)


def _same_width(lo: int, hi: int, n: int) -> str:
    """n-digit strings (leading zeros kept) of the numbers lo..hi."""
    if n == 1:
        return f"[{lo}-{hi}]"
    unit = 10 ** (n - 1)
    (a, rest_a), (b, rest_b) = divmod(lo, unit), divmod(hi, unit)
    if rest_a == 0 and rest_b == unit - 1:
        return f"[{a}-{b}][0-9]{{{n - 1}}}"
    if a == b:
        return f"{a}({_same_width(rest_a, rest_b, n - 1)})"
    parts = [f"{a}({_same_width(rest_a, unit - 1, n - 1)})"]
    if b - a > 1:
        parts.append(f"[{a + 1}-{b - 1}][0-9]{{{n - 1}}}")
    parts.append(f"{b}({_same_width(0, rest_b, n - 1)})")
    return "|".join(parts)


def _whitespace(pattern: str | None) -> str:
    if pattern is None:
        return DEFAULT_WHITESPACE
    return f"({pattern})" if pattern else ""


def json_object_regex(depth: int, ws: str) -> str:
    """Any JSON object whose values nest at most `depth` objects or arrays deep."""
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING  # noqa: PLC0415

    scalar = f"{STRING}|{NUMBER}|{BOOLEAN}|{NULL}"

    def value(d: int) -> str:
        return f"({scalar})" if d == 0 else f"({scalar}|{obj(d)}|{array(d)})"

    def obj(d: int) -> str:
        member = f"{STRING}{ws}:{ws}{value(d - 1)}"
        return rf"\{{{ws}({member}({ws},{ws}{member})*)?{ws}\}}"

    def array(d: int) -> str:
        item = value(d - 1)
        return rf"\[{ws}({item}({ws},{ws}{item})*)?{ws}\]"

    return obj(depth)


def constraint_key(so: StructuredOutputsParams) -> str:
    """The cache key of a constraint: equal keys give the same automaton."""
    return json.dumps(dataclasses.asdict(so), sort_keys=True)


# --- vocabulary ------------------------------------------------------------------------------


def token_bytes(tokenizer, vocab_size: int) -> dict[bytes, list[int]]:
    """The bytes each token id < vocab_size stands for, as outlines-core's Vocabulary takes
    them; special tokens (EOS, chat markers) are left out: the sampler allows stop tokens on
    its own, in accepting states."""
    specials = set(tokenizer.all_special_ids)
    added = {t: i for t, i in tokenizer.get_added_vocab().items()}
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = json.dumps(decoder)
    byte_level = '"ByteLevel"' in kinds
    sentencepiece = not byte_level and ('"Metaspace"' in kinds or '"ByteFallback"' in kinds)
    unicode_to_byte = _byte_level_table()
    out: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i in specials or i >= vocab_size:
            continue
        if text in added:
            raw = text.encode()
        elif byte_level:
            if any(c not in unicode_to_byte for c in text):
                continue  # not a byte-level token: no bytes to match
            raw = bytes(unicode_to_byte[c] for c in text)
        elif sentencepiece:
            hex_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
            raw = bytes([int(text[3:5], 16)]) if hex_byte else text.replace("▁", " ").encode()
        else:
            raw = tokenizer.decode([i]).encode()
        if raw:
            out.setdefault(raw, []).append(i)
    return out


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# --- regex -> automaton ----------------------------------------------------------------------


def build_automaton(key: str, regex: str, vocabulary, layout: VocabLayout) -> Automaton:
    """outlines-core's token DFA of `regex`, renumbered from 0 and laid out as device tables."""
    import outlines_core  # noqa: PLC0415

    if len(regex) > MAX_REGEX_CHARS:
        raise ValueError(
            f"structured output: the constraint's expression has {len(regex)} characters, "
            f"over the limit of {MAX_REGEX_CHARS}"
        )
    try:
        index = outlines_core.Index(regex, vocabulary)
    except ValueError as e:
        raise ValueError(f"structured output: cannot compile the constraint: {e}") from None
    transitions = index.get_transitions()
    start = index.get_initial_state()
    order = [start] + sorted(s for s in transitions if s != start)
    number = {s: i for i, s in enumerate(order)}
    finals = set(index.get_final_states())
    n = len(order)
    allowed = np.zeros((n, layout.shards * layout.width), bool)
    default_next = np.arange(n, dtype=np.int32)
    tokens_of, nexts_of = [], []
    for i, s in enumerate(order):
        moves = {t: number[v] for t, v in transitions.get(s, {}).items() if t < layout.vocab_size}
        toks = np.fromiter(moves.keys(), np.int32, len(moves))
        nxt = np.fromiter(moves.values(), np.int32, len(moves))
        allowed[i, toks] = True
        if len(nxt):
            values, counts = np.unique(nxt, return_counts=True)
            default_next[i] = values[np.argmax(counts)]
        keep = np.argsort(toks)[nxt[np.argsort(toks)] != default_next[i]]
        tokens_of.append(toks[keep])
        nexts_of.append(nxt[keep])
    ends = np.cumsum([len(t) for t in tokens_of]).astype(np.int32)
    return Automaton(
        key=key,
        mask=pack_mask(allowed, layout),
        accepting=np.array([s in finals for s in order]),
        terminal=~allowed.any(axis=1),
        default_next=default_next,
        exc_start=ends - np.array([len(t) for t in tokens_of], np.int32),
        exc_end=ends,
        exc_token=np.concatenate(tokens_of) if tokens_of else np.zeros(0, np.int32),
        exc_next=np.concatenate(nexts_of) if nexts_of else np.zeros(0, np.int32),
    )


def pack_mask(allowed: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """bool [states, shards * width] -> u32 [states, shards * words]: each shard's ids packed
    from bit 0 of its own first word, so a device unpacks only its own words."""
    n = allowed.shape[0]
    per_shard = allowed.reshape(n, layout.shards, layout.width)
    padded = np.zeros((n, layout.shards, layout.words * 32), bool)
    padded[:, :, : layout.width] = per_shard
    packed = np.packbits(padded, axis=-1, bitorder="little")  # [n, shards, words * 4] bytes
    return packed.view("<u4").reshape(n, layout.shards * layout.words)


class Compiler:
    """Constraint -> Automaton for one model's vocabulary, with a cache (thread-safe: a server
    compiles in its request handlers, off the engine thread, and the engine finds it here)."""

    def __init__(self, tokenizer, layout: VocabLayout):
        self.layout = layout
        self._tokenizer = tokenizer
        self._vocabulary = None
        self._cache: OrderedDict[str, Automaton] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutputsParams) -> Automaton:
        key = constraint_key(so)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            regex = constraint_regex(so)
        except GrammarError as e:
            raise ValueError(str(e)) from None
        automaton = build_automaton(key, regex, self._vocab(), self.layout)
        if automaton.terminal[0] and not automaton.accepting[0]:
            raise ValueError("structured output: the constraint matches no text")
        with self._lock:
            self._cache[key] = automaton
            while len(self._cache) > CACHED_AUTOMATA:
                self._cache.popitem(last=False)
        return automaton

    def _vocab(self):
        import outlines_core  # noqa: PLC0415

        with self._lock:
            if self._vocabulary is None:
                if self._tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer")
                tokens = token_bytes(self._tokenizer, self.layout.vocab_size)
                # outlines-core reserves one id for its EOS: one past the vocabulary, never a
                # token here (the sampler allows each request's own stop tokens itself).
                self._vocabulary = outlines_core.Vocabulary(self.layout.vocab_size, tokens)
            return self._vocabulary


# --- the device pool -------------------------------------------------------------------------


@dataclasses.dataclass
class _Resident:
    base: int  # first state
    exc_base: int  # first exception entry
    automaton: Automaton
    users: int = 0


class GrammarPool:
    """Fixed-capacity device tables holding the automata in use (module docstring). The host
    keeps their mirror: placing an automaton writes it there and puts the tables on the
    devices whole (a write on the device would compile a program per automaton size; the
    tables are a few MB, less than one constraint's compile costs)."""

    def __init__(self, mesh, layout: VocabLayout, states: int, exceptions: int):
        self.mesh = mesh
        self.layout = layout
        self.capacity = (states, exceptions)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._host: GrammarTables | None = None
        self.tables: GrammarTables | None = None  # allocated on first use (or by allocate())

    def allocate(self) -> GrammarTables:
        """The device tables, allocated empty (every state terminal) if they are not yet."""
        if self.tables is None:
            states, exceptions = self.capacity
            self._host = GrammarTables(
                mask=np.zeros((states, self.layout.shards * self.layout.words), np.uint32),
                accepting=np.zeros(states, bool),
                terminal=np.ones(states, bool),
                default_next=np.zeros(states, np.int32),
                exc_start=np.zeros(states, np.int32),
                exc_end=np.zeros(states, np.int32),
                exc_token=np.full(exceptions, np.iinfo(np.int32).max, np.int32),
                exc_next=np.zeros(exceptions, np.int32),
            )
            self._put()
        return self.tables

    def acquire(self, automaton: Automaton) -> int:
        """Place `automaton` (if it is not resident) and count one more user; returns its
        first state's global id. ValueError if it cannot be placed now."""
        resident = self._resident.get(automaton.key)
        if resident is None:
            resident = self._place(automaton)
        resident.users += 1
        self._resident.move_to_end(automaton.key)
        return resident.base

    def release(self, key: str) -> None:
        resident = self._resident.get(key)
        if resident is not None:
            resident.users -= 1

    def _place(self, automaton: Automaton) -> _Resident:
        states, exceptions = self.capacity
        if automaton.states > states or automaton.exceptions > exceptions:
            raise ValueError(
                f"structured output: the constraint's automaton has {automaton.states} states "
                f"and {automaton.exceptions} transition exceptions; the device pool holds "
                f"{states} and {exceptions} (LLM(grammar_states=...) sets its size)"
            )
        while True:
            spot = self._free_spot(automaton)
            if spot is not None:
                break
            idle = next((k for k, r in self._resident.items() if r.users == 0), None)
            if idle is None:
                used = sum(r.automaton.states for r in self._resident.values())
                raise ValueError(
                    f"structured output: the device pool is full ({used} of {states} states "
                    f"held by running requests, {automaton.states} needed); retry when some "
                    "finish, or raise LLM(grammar_states=...)"
                )
            del self._resident[idle]
        resident = _Resident(spot[0], spot[1], automaton)
        self._upload(resident)
        self._resident[automaton.key] = resident
        return resident

    def _free_spot(self, automaton: Automaton) -> tuple[int, int] | None:
        """First fit in both ranges (states, exceptions) at once, or None."""
        state_at = _first_fit(
            [(r.base, r.automaton.states) for r in self._resident.values()],
            automaton.states,
            self.capacity[0],
        )
        exc_at = _first_fit(
            [(r.exc_base, r.automaton.exceptions) for r in self._resident.values()],
            automaton.exceptions,
            self.capacity[1],
        )
        return None if state_at is None or exc_at is None else (state_at, exc_at)

    def _upload(self, r: _Resident) -> None:
        """Write the automaton's tables at its place (its ids made global) and put them on the
        devices."""
        a = r.automaton
        self.allocate()
        rows = GrammarTables(
            mask=a.mask,
            accepting=a.accepting,
            terminal=a.terminal,
            default_next=a.default_next + r.base,
            exc_start=a.exc_start + r.exc_base,
            exc_end=a.exc_end + r.exc_base,
            exc_token=a.exc_token,
            exc_next=a.exc_next + r.base,
        )
        at = GrammarTables(*([r.base] * 6), r.exc_base, r.exc_base)
        for table, new, offset in zip(self._host, rows, at, strict=True):
            table[offset : offset + len(new)] = new
        self._put()

    def _put(self) -> None:
        """The host tables onto the devices, as copies (a transfer is asynchronous: the mirror
        may change before it is read)."""
        self.tables = jax.tree.map(
            lambda a, spec: jax.device_put(a.copy(), jax.sharding.NamedSharding(self.mesh, spec)),
            self._host,
            TABLE_SPECS,
        )


def _first_fit(used: list[tuple[int, int]], size: int, capacity: int) -> int | None:
    at = 0
    for start, length in sorted(used):
        if start - at >= size:
            return at
        at = max(at, start + length)
    return at if capacity - at >= size else None

"""Vocab-parallel sampling inside the jitted programs.

Each device holds logits for its own slice of the vocabulary (see model.local_logits). Greedy-only
batches never gather the vocabulary: a sharded argmax takes each shard's best (value, id), a pmax
picks the winning value and a pmin the lowest id holding it — exactly `argmax` of the full row.
Batches with sampled rows, penalties or logprobs gather the full row (one all-gather of
[rows, vocab] per tick) and every device draws the same token from the same numbers.

Per-request settings are arrays (`SamplerRows`), so one compiled program serves any mix of greedy
and sampled requests. Structured outputs (grammar.py) walk a token automaton on the device: in
the grammar sample programs (`SamplerMode.grammar`: calls with a constrained row) each device
masks its own vocab shard to the tokens the row's state allows (`grammar_allowed`), and after
the draw every device finds the next state (`grammar_advance`); the other programs take no
tables and compute none of it.

Randomness is a pure function of (request seed, token index, vocab id): Gumbel noise drawn over
the true vocabulary (not the padded one), so a seeded request gives the same tokens alone or in
any batch, at any position, under any pp/tp/dp layout.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.config import SamplingParams
from jaxpp.grammar import GrammarTables
from jaxpp.model import VOCAB_AXES, vocab_shard_index


class SamplerRows(NamedTuple):
    """Per-row sampling settings, one entry per sequence slot (padded rows are greedy)."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array  # i32; 0 = off
    top_p: jax.Array  # f32
    min_p: jax.Array  # f32
    presence: jax.Array  # f32
    frequency: jax.Array  # f32
    repetition: jax.Array  # f32
    seed: jax.Array  # u32
    min_tokens: jax.Array  # i32
    stop_ids: jax.Array  # i32 [rows, n]; -1 = unused. EOS (unless ignore_eos) + stop_token_ids
    max_tokens: jax.Array  # i32


@dataclasses.dataclass(frozen=True)
class SamplerMode:
    """Static facts about a batch that change the compiled program (few combinations)."""

    full_vocab: bool  # some row samples, has penalties or wants logprobs: gather the vocab
    penalties: bool  # track per-row token counts
    logprobs: int  # top-N logprobs to return per token (0 = only the chosen token's)
    grammar: bool = False  # some row decodes under a structured-output automaton
    verify: bool = False  # rows feed drafts: a token is drawn at each (speculation.py)

    @staticmethod
    def of(params: list[SamplingParams]) -> SamplerMode:
        penalties = any(p.penalized for p in params)
        wants_logprobs = any(p.logprobs is not None for p in params)
        return SamplerMode(
            full_vocab=penalties or wants_logprobs or any(not p.greedy for p in params),
            penalties=penalties,
            logprobs=max((p.logprobs or 0) for p in params),
            grammar=any(p.structured_outputs is not None for p in params),
        )


# Stop-token columns per row: every EOS set of the supported families and a few ids of the
# request's own. A request with more widens them to the next power of two: a new shape of the
# sample program's arguments, compiled then (programs.py), never a mismatch.
STOP_ID_COLUMNS = 8


def host_sampler_rows(rows: int) -> dict[str, np.ndarray]:
    """Host-side per-slot settings, every row greedy and unused: filled by set_sampler_row."""
    return {
        "temperature": np.zeros(rows, np.float32),
        "top_k": np.zeros(rows, np.int32),
        "top_p": np.ones(rows, np.float32),
        "min_p": np.zeros(rows, np.float32),
        "presence": np.zeros(rows, np.float32),
        "frequency": np.zeros(rows, np.float32),
        "repetition": np.ones(rows, np.float32),
        "seed": np.zeros(rows, np.uint32),
        "min_tokens": np.zeros(rows, np.int32),
        "stop_ids": np.full((rows, STOP_ID_COLUMNS), -1, np.int32),
        "max_tokens": np.ones(rows, np.int32),
    }


def set_sampler_row(
    rows: dict[str, np.ndarray], i: int, p: SamplingParams, seed: int, eos_ids: tuple[int, ...]
) -> None:
    """Put request settings `p` (its seed drawn already) into row i."""
    rows["temperature"][i] = p.temperature
    rows["top_k"][i] = max(p.top_k, 0)
    rows["top_p"][i] = p.top_p
    rows["min_p"][i] = p.min_p
    rows["presence"][i] = p.presence_penalty
    rows["frequency"][i] = p.frequency_penalty
    rows["repetition"][i] = p.repetition_penalty
    rows["seed"][i] = seed & 0xFFFFFFFF
    rows["min_tokens"][i] = p.min_tokens
    rows["max_tokens"][i] = p.max_tokens
    ids = stop_token_ids(p, eos_ids)
    stop = rows["stop_ids"]
    if len(ids) > stop.shape[1]:  # widen to the next power of two (a new program shape)
        wider = np.full((stop.shape[0], 1 << (len(ids) - 1).bit_length()), -1, np.int32)
        wider[:, : stop.shape[1]] = stop
        rows["stop_ids"] = stop = wider
    stop[i] = -1
    stop[i, : len(ids)] = ids


def sampler_rows(
    params: list[SamplingParams], seeds: list[int], eos_ids: tuple[int, ...], rows: int
) -> SamplerRows:
    """Host-side arrays for `rows` slots; rows past len(params) are greedy padding."""
    host = host_sampler_rows(rows)
    for i, (p, seed) in enumerate(zip(params, seeds, strict=True)):
        set_sampler_row(host, i, p, seed, eos_ids)
    return SamplerRows(**host)


def stop_token_ids(p: SamplingParams, eos_ids: tuple[int, ...]) -> list[int]:
    """The tokens that end request `p`: its stop_token_ids, and EOS unless ignore_eos."""
    ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
    return list(dict.fromkeys(ids))


class Sampled(NamedTuple):
    tokens: jax.Array  # i32 [rows]
    logprob: jax.Array  # f32 [rows]: log-probability of the chosen token (raw model logits)
    top_ids: jax.Array  # i32 [rows, N]
    top_logprobs: jax.Array  # f32 [rows, N]


def sample(
    local_logits: jax.Array,
    rows: SamplerRows,
    generated: jax.Array,
    counts: jax.Array | None,
    seen: jax.Array | None,
    vocab_size: int,
    mode: SamplerMode,
    grammar: tuple[jax.Array, GrammarTables] | None = None,
) -> Sampled:
    """Next tokens for `rows` from this device's vocab shard of their logits.

    local_logits [R, Vshard] f32 (padded ids already -inf); generated [R] tokens generated so
    far (the index of the token being drawn); counts/seen [R, Vpad] for penalties; grammar
    (mode.grammar): each row's automaton state (-1: none) and the automata.
    """
    width = local_logits.shape[-1]
    ids = vocab_shard_index() * width + jnp.arange(width)
    is_stop = (ids[None, :, None] == rows.stop_ids[:, None, :]).any(-1)
    # min_tokens: stop tokens are banned until enough tokens were generated.
    banned = is_stop & (generated < rows.min_tokens)[:, None]
    if mode.grammar:
        with jax.named_scope("grammar"):
            banned |= ~grammar_allowed(*grammar, is_stop)
    logits = jnp.where(banned, -jnp.inf, local_logits)
    if not mode.full_vocab:
        tokens = _sharded_argmax(logits, ids)
        zeros = jnp.zeros(tokens.shape + (0,))
        return Sampled(tokens, jnp.zeros(tokens.shape), zeros.astype(jnp.int32), zeros)

    raw = jax.lax.all_gather(local_logits, VOCAB_AXES, axis=1, tiled=True)
    full = jax.lax.all_gather(logits, VOCAB_AXES, axis=1, tiled=True)
    if mode.penalties:
        full = _apply_penalties(full, rows, counts, seen)
    greedy_tokens = jnp.argmax(full, axis=-1).astype(jnp.int32)
    sampled_tokens = _draw(full, rows, generated, vocab_size)
    tokens = jnp.where(rows.temperature == 0, greedy_tokens, sampled_tokens)

    logprobs = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, mode.logprobs)
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)


def grammar_allowed(states: jax.Array, tables: GrammarTables, is_stop: jax.Array) -> jax.Array:
    """bool [R, Vshard]: the tokens of this device's vocab shard that each row's automaton
    state allows (its packed mask bits; its stop tokens too where the state accepts); a row
    with no automaton (state -1) is allowed everything. A terminal state is never sampled
    from: the row ended on the token that reached it (grammar_advance)."""
    rows, width = is_stop.shape
    at = jnp.maximum(states, 0)
    words = tables.mask[at]  # [R, words]: this shard's words of each row's state
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    allowed = bits.reshape(rows, -1)[:, :width].astype(bool)
    allowed |= is_stop & tables.accepting[at][:, None]
    return allowed | (states < 0)[:, None]


def grammar_advance(states: jax.Array, tokens: jax.Array, tables: GrammarTables) -> jax.Array:
    """i32 [R]: each row's state after its token: the token's entry among the state's
    exceptions (sorted by token: a binary search of a fixed number of unrolled steps, as many
    as the exception table's size needs; no loop of unknown trip count), else the state's
    default. Rows with no automaton stay -1."""
    at = jnp.maximum(states, 0)
    lo, end = tables.exc_start[at], tables.exc_end[at]
    hi = end
    last = tables.exc_token.shape[0] - 1
    for _ in range(tables.exc_token.shape[0].bit_length()):
        mid = (lo + hi) // 2
        less = tables.exc_token[jnp.clip(mid, 0, last)] < tokens
        open_ = lo < hi
        lo = jnp.where(open_ & less, mid + 1, lo)
        hi = jnp.where(open_ & ~less, mid, hi)
    hit = jnp.clip(lo, 0, last)
    found = (lo < end) & (tables.exc_token[hit] == tokens)
    following = jnp.where(found, tables.exc_next[hit], tables.default_next[at])
    return jnp.where(states < 0, -1, following)


def _sharded_argmax(logits: jax.Array, ids: jax.Array) -> jax.Array:
    best = jnp.max(logits, axis=-1)
    best_id = ids[jnp.argmax(logits, axis=-1)]
    winner = jax.lax.pmax(best, VOCAB_AXES)
    candidate = jnp.where(best == winner, best_id, jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(candidate, VOCAB_AXES).astype(jnp.int32)


def _apply_penalties(logits, rows: SamplerRows, counts, seen) -> jax.Array:
    """vLLM semantics: repetition over prompt+output tokens; presence/frequency over output."""
    rep = rows.repetition[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    logits = logits - rows.frequency[:, None] * counts
    return logits - rows.presence[:, None] * (counts > 0)


def _draw(logits: jax.Array, rows: SamplerRows, generated: jax.Array, vocab_size: int):
    """Temperature, top-k, top-p, min-p, then a Gumbel-max draw from the kept tokens.

    The cut-offs are found by searching the threshold value, not by sorting: XLA:CPU sorts
    [257, 4096] float32 in 173 ms, which made every sampling tick ~8x a greedy one."""
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    scaled = logits / temperature
    vocab = scaled.shape[-1]
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
    keep = scaled >= _threshold(scaled, jnp.ones_like(scaled), k.astype(jnp.float32))
    # top-p: keep the smallest set of most likely tokens whose mass reaches p (the token that
    # crosses p is kept); when rounding leaves the whole mass below p, every token is kept.
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    keep &= scaled >= _threshold(scaled, probs, rows.top_p)
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    keep &= probs >= rows.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    noise = jax.vmap(_gumbel, in_axes=(0, 0, None))(rows.seed, generated, vocab_size)
    noise = jnp.pad(noise, ((0, 0), (0, vocab - vocab_size)))
    return jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf), axis=-1).astype(jnp.int32)


def _threshold(values: jax.Array, weights: jax.Array, need: jax.Array) -> jax.Array:
    """Per row, the largest value t of `values` [R, V] such that the weights of the values >= t
    sum to at least `need` [R] (the row's smallest value if none does): a bisection over the
    float32 bit patterns, mapped to uint32 so that their order is the values' order. 32 steps
    find the exact value; they are unrolled (a loop would cost a host round trip per step on
    GPU)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2  # in (lo, hi] while lo < hi
        enough = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0), axis=-1) >= need
        lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)
    return jnp.max(jnp.where(keys <= lo[:, None], values, -jnp.inf), axis=-1, keepdims=True)


def _gumbel(seed: jax.Array, index: jax.Array, vocab_size: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), index)
    return jax.random.gumbel(key, (vocab_size,), jnp.float32)

"""Speculative decoding on the device: prompt-lookup proposals and their verification.

A decoding row that speculates feeds k + 1 tokens in one tick instead of one: its next token
and k drafts proposed from its own text, at positions p .. p + k, each a decode query over the
row's pages (the keys of the drafts before it are written in the same tick). When the row's
micro-batch leaves the last stage, the sample program draws a token at each of the k + 1
positions exactly as it would without speculation (the same sampler, the same random numbers:
the draw of output token g uses the key (seed, g)), keeps the drafts up to the first one that
differs from its draw, and emits the draws up to and including that one:

    fed       x_p   d_0   d_1   d_2          (k = 3 drafts of row r, positions p .. p + 3)
    drawn     y_0   y_1   y_2   y_3          (y_j from the logits at position p + j)
    d_0 = y_0, d_1 = y_1, d_2 != y_2  ->  emits y_0 y_1 y_2; next token y_2 at p + 3

Because a draft is deterministic (q is one-hot), this is the rejection rule of Leviathan et al.
(accept d_j with probability min(1, p(d_j) / q(d_j)) = p(d_j), else draw from norm(max(0,
p - q)) = p without d_j): "draw y_j from p, accept iff y_j = d_j, emit y_j" has exactly those
probabilities. So greedy AND seeded outputs are the ones the row would give without
speculation, token for token; only the number of ticks changes. A rejected draft's keys sit
past the row's position, where nothing reads them until they are overwritten.

Proposals (vLLM's `ngram` method): the longest n-gram (prompt_lookup_min <= n <=
prompt_lookup_max) ending at the row's next token that occurred earlier in its text, its
latest occurrence, and the (up to) k tokens that followed it (repeating, when the occurrence is
nearer than k: the text since recurs with that period). The search is a few vectorised
compares over the row's text. The text lives where its keys and values do: a token-id pool
beside the KV pages (`Ring.page_tokens`, [pages, block] per replica, written as tokens
enter), read through the row's block table, so a prefix found in the prefix cache brings its
tokens with its pages, and a rejected draft's id sits past the row's position like its keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def write_tokens(page_tokens: jax.Array, tables: jax.Array, row: jax.Array,
                 position: jax.Array, token: jax.Array) -> jax.Array:  # fmt: skip
    """page_tokens [pages, block] with the tokens entering at a tick (row [T], position [T],
    token [T]; row -1: an empty slot) at their place in their rows' pages, where their keys and
    values go."""
    pages, block = page_tokens.shape
    column = jnp.clip(position // block, 0, tables.shape[1] - 1)
    page = jnp.where(row >= 0, tables[jnp.maximum(row, 0), column], pages)
    return page_tokens.at[page, jnp.mod(position, block)].set(token, mode="drop")


def propose(tokens: jax.Array, position: jax.Array, limit: jax.Array, k: int, low: int,
            high: int) -> jax.Array:  # fmt: skip
    """i32 [R, k]: the drafts of rows whose text is `tokens` [R, L] (valid up to `position`
    [R], the row's next token), -1 past the proposals (none where no n-gram recurs); at most
    `limit` [R] each."""
    L = tokens.shape[1]
    ends = jnp.arange(L)
    p = jnp.clip(position, 0, L - 1)

    def suffix(i):  # the token i places before each row's next token
        return jnp.take_along_axis(tokens, jnp.maximum(p - i, 0)[:, None], axis=1)

    def shifted(i):  # the token i places before each candidate end
        return jnp.pad(tokens, ((0, 0), (i, 0)), constant_values=-1)[:, :L]

    # match[r, e]: the n tokens ending at e equal the n ending at the row's position.
    match = jnp.ones(tokens.shape, bool)
    end = jnp.full(p.shape, -1, jnp.int32)  # where the longest recurring n-gram last ended
    for i in range(high):
        n = i + 1
        match &= shifted(i) == suffix(i)
        earlier = (ends[None] < p[:, None]) & (ends[None] >= i)
        found = match & earlier & (p >= i)[:, None]
        if n >= low:
            latest = jnp.max(jnp.where(found, ends[None], -1), axis=1)
            end = jnp.where(latest >= 0, latest, end)
    count = jnp.where(end >= 0, jnp.minimum(k, limit), 0)
    # The tokens after the occurrence, up to the row's next token; when that is fewer than k,
    # they repeat: the text from end + 1 to p recurs with period p - end (a loop of 2 tokens
    # gives k drafts, not 2).
    j = jnp.arange(k)
    period = jnp.maximum(p - end, 1)[:, None]
    at = jnp.clip(end[:, None] + 1 + j[None] % period, 0, L - 1)
    follow = jnp.take_along_axis(tokens, at, axis=1)
    return jnp.where(j[None] < count[:, None], follow, -1)


class Verdict(NamedTuple):
    """What verifying one micro-batch's drafts decided, per row (its output: the first
    `accepted` + 1 draws)."""

    accepted: jax.Array  # i32 [mb]: drafts kept (after a stop among them cut the rest)
    finished: jax.Array  # bool [mb]: a stop token or the token budget among the output
    proposed: jax.Array  # i32 [mb]: drafts the row had


def verify(drawn: jax.Array, drafts: jax.Array, stop: jax.Array, at_budget: jax.Array
           ) -> Verdict:  # fmt: skip
    """drawn [mb, k + 1]: the token drawn at each position; drafts [mb, k] (-1: none);
    stop/at_budget [mb, k + 1]: the draw at that position would stop the row (a stop token
    past min_tokens) / reaches its max_tokens. The row keeps drafts while they equal the
    draws, and ends at its first stop."""
    k = drafts.shape[1]
    agree = jnp.cumprod((drafts == drawn[:, :k]).astype(jnp.int32), axis=1)
    matched = jnp.sum(agree, axis=1)  # drafts equal to their draw, from the first
    ends = stop | at_budget
    j = jnp.arange(k + 1)
    first_end = jnp.min(jnp.where(ends & (j[None] <= matched[:, None]), j[None], k + 1), axis=1)
    accepted = jnp.minimum(matched, first_end)
    return Verdict(accepted, first_end <= matched, jnp.sum(drafts >= 0, axis=1))

"""One layer of paged attention at W's lengths, for A/B of attention.ITEMS_PER_STEP: the
settings take turns in one process, and each one's best and median call time are printed.

    JAX_NUM_CPU_DEVICES=1 python scripts/attention_items.py decode 128,64
    JAX_NUM_CPU_DEVICES=1 python scripts/attention_items.py prompt 32,16,8

llama-32m's attention (8 query heads, 4 KV heads, head_dim 64, pages of 16 positions, a pool of
4,096 pages). decode: 32 rows, one query each, at positions U[16, 768) (W's prompts of
U[16, 512] plus up to 256 outputs); prompt: 1,024 fresh prompt tokens of prompts of
U[16, 512) in groups of 16 queries (attention.QUERY_BLOCK). Eight draws per kind; a call time
is the mean over them. ITEMS_PER_STEP is read when a program is traced, so each setting gets
its own jitted function.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp import attention

BLOCK, KV_HEADS, Q_HEADS, HEAD_DIM, PAGES, ROWS = 16, 4, 8, 64, 4096, 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["decode", "prompt"])
    p.add_argument("steps", help="comma list of ITEMS_PER_STEP values to compare")
    p.add_argument("--repeats", type=int, default=30, help="turns of every setting")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    pools = (
        jnp.asarray(rng.standard_normal((PAGES, KV_HEADS, HEAD_DIM, BLOCK), dtype=np.float32)),
        jnp.asarray(rng.standard_normal((PAGES, KV_HEADS, BLOCK, HEAD_DIM), dtype=np.float32)),
    )
    per_row = 2048 // BLOCK
    tables = jnp.asarray(rng.permutation(PAGES)[: ROWS * per_row].reshape(ROWS, per_row))
    draw = _decode_case if args.kind == "decode" else _prompt_case
    cases = [draw(np.random.default_rng(seed)) for seed in range(8)]
    steps = [int(s) for s in args.steps.split(",")]
    attend = {s: _compiled(args.kind, s, pools, tables, cases) for s in steps}
    times: dict[int, list[float]] = {s: [] for s in steps}
    for _ in range(args.repeats):
        for s in steps:
            start = time.perf_counter()
            for case in cases:
                attend[s](*case).block_until_ready()
            times[s].append(1e3 * (time.perf_counter() - start) / len(cases))
    for s in steps:
        print(f"{args.kind} ITEMS_PER_STEP={s}: best {min(times[s]):.2f} ms, "
              f"median {statistics.median(times[s]):.2f} ms per call")  # fmt: skip
    return 0


def _compiled(kind: str, step: int, pools, tables, cases):
    """A jitted one-layer attention with ITEMS_PER_STEP[kind] = step, traced on every case."""
    attention.ITEMS_PER_STEP[kind] = step
    k_pool, v_pool = pools

    @jax.jit
    def attend(q, q_pos, seq):
        window = jnp.int32(0)
        return attention.paged_attention(q, q_pos, seq, k_pool, v_pool, tables, window, kind=kind)

    for case in cases:
        attend(*case).block_until_ready()
    return attend


def _decode_case(rng: np.random.Generator):
    q = rng.standard_normal((ROWS, 1, Q_HEADS, HEAD_DIM), dtype=np.float32)
    positions = rng.integers(16, 768, size=(ROWS, 1)).astype(np.int32)
    return jnp.asarray(q), jnp.asarray(positions), jnp.arange(ROWS, dtype=jnp.int32)


def _prompt_case(rng: np.random.Generator, tokens: int = 1024):
    group = attention.QUERY_BLOCK
    positions, rows = [], []
    row = 0
    while len(positions) < tokens // group and row < ROWS:
        length = int(rng.integers(16, 512))
        for start in range(0, length, group):
            p = np.full(group, -1, np.int32)
            end = min(start + group, length)
            p[: end - start] = np.arange(start, end)
            positions.append(p)
            rows.append(row)
        row += 1
    q = rng.standard_normal((len(positions), group, Q_HEADS, HEAD_DIM), dtype=np.float32)
    return jnp.asarray(q), jnp.asarray(np.stack(positions)), jnp.asarray(np.array(rows, np.int32))


if __name__ == "__main__":
    sys.exit(main())

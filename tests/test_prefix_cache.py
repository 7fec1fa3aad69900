"""Prefix caching: a prompt that starts like an earlier one reuses its KV pages, and every
answer is still the one the request gets alone with caching off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import random_seqs, rel_err

import jaxpp
from jaxpp.kv_pages import PagePool


@pytest.fixture(scope="module")
def model_dir(hf_model):
    return hf_model("llama")


def _greedy(n: int) -> jaxpp.SamplingParams:
    return jaxpp.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _seeded(n: int, seed: int) -> jaxpp.SamplingParams:
    return jaxpp.SamplingParams(max_tokens=n, temperature=1.0, top_k=20, seed=seed, ignore_eos=True)


def _nan_pools(llm) -> None:
    """Every KV page NaN: a cached page that was never written poisons the answer."""

    def fill(a):  # on the pool's own devices, as the engine placed it
        return jax.jit(lambda x: jnp.full_like(x, jnp.nan), out_shardings=a.sharding)(a)

    stages = llm.ring.stages._replace(cache=jax.tree.map(fill, llm.ring.stages.cache))
    llm.ring = llm.ring._replace(stages=stages)
    llm.reset_prefix_cache()  # what the cached pages held is gone


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_pool_shares_full_pages_and_evicts_the_least_recently_released():
    pool = PagePool(1, 6, 4, rows_per_replica=4, pages_per_seq=8, prefix_caching=True)
    a = list(range(10))  # two full pages and half of a third
    assert pool.grow(0, 10)
    pool.publish(0, a, 10)
    assert pool.lookup(0, a + [99], 11) == [0, 1]
    assert pool.lookup(0, a, 7) == [0]  # whole pages within the limit only
    assert pool.lookup(0, [7] + a[1:], 10) == []  # the first page differs: nothing
    assert pool.lookup(0, a[4:8] + a[4:8], 8) == []  # page 1's tokens after another prefix
    pool.share(1, [0, 1])
    assert pool.grow(1, 12) and pool.in_use == 4  # row 1: pages 0 and 1 shared, 3 its own
    pool.release(0)  # page 2 (never full) is blank again; 0 and 1 stay with row 1
    assert pool.in_use == 3
    b = a[:8] + [5, 5, 5, 5]
    pool.publish(1, b, 12)
    pool.release(1)  # 0, 1, 3 idle: findable, and free to take
    assert pool.in_use == 0 and pool.free_pages(0) == 6
    assert pool.lookup(0, b + [0], 13) == [0, 1, 3]
    # Blank pages go first (2, 4, 5), then idle ones, a chain's deepest page first.
    assert pool.grow(2, 16) and pool.evictions == 1
    assert pool.lookup(0, b + [0], 13) == [0, 1]
    pool.forget_prefixes()
    assert pool.lookup(0, b + [0], 13) == []
    off = PagePool(1, 6, 4, rows_per_replica=4, pages_per_seq=8)
    assert off.grow(0, 10)
    off.publish(0, a, 10)
    assert off.lookup(0, a + [99], 11) == []


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=8), id="pp1"),
        # Slow: test_serving's dp2-pp2-tp2 layout serves its prompts twice, the second time
        # from the cache, against the answers alone.
        pytest.param(
            dict(
                pp=2,
                dp=2,
                num_microbatches=2,
                block_size=4,
                max_num_batched_tokens=16,
                max_num_seqs=8,
            ),
            marks=pytest.mark.slow,
            id="pp2-dp2",
        ),
    ],
)
def test_shared_prefix_is_computed_once_with_the_same_answers(model_dir, layout):
    """Five prompts after one 40-token prefix (ten pages of 4), arriving together: the first
    computes it, the others find its pages as soon as they are planned (the same call), one
    with penalties computes its own; all answers equal caching off, NaN in unwritten pages."""
    shared = random_seqs([40], seed=5)[0]
    prompts = [shared + s for s in random_seqs([3, 9, 17, 1], seed=6)] + [shared, shared + [1]]
    # Greedy and penalised only: seeded sampling over shared pages is the pressure test's.
    params = [_greedy(6), _greedy(7), _greedy(5), _greedy(4), _greedy(3)]
    params.append(jaxpp.SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3))
    off = jaxpp.LLM(str(model_dir), dtype="float32", enable_prefix_caching=False, **layout)
    want = _tokens(off.generate(prompts, params))
    assert off.last_run_stats["prefix_cache_hit_tokens"] == 0
    llm = jaxpp.LLM(str(model_dir), dtype="float32", **layout)
    _nan_pools(llm)
    assert _tokens(llm.generate(prompts, params)) == want
    stats = llm.last_run_stats
    assert stats["prompt_tokens"] == sum(map(len, prompts))
    if llm.dp == 1:  # (with dp = 2 each replica caches its own pages)
        # 40 + 40 + 40 cached; the bare prefix computes its last page (its last token's);
        # the penalised one computes all (its prompt's tokens are counted as they enter).
        assert stats["prefix_cache_hit_tokens"] == 3 * 40 + 36
        assert stats["prefix_cache_hit_rate"] == pytest.approx(156 / sum(map(len, prompts)))
    # Served again: each prompt finds all its full pages but its last token's.
    assert _tokens(llm.generate(prompts, params)) == want
    every = sum((len(p) - 1) // 4 * 4 for p in prompts[:-1])
    hits = llm.last_run_stats["prefix_cache_hit_tokens"]
    assert hits == every if llm.dp == 1 else 0 < hits <= every


def test_next_turn_reuses_the_answer_pages(model_dir):
    """A conversation's next prompt is its last prompt + the answer + a question: the pages of
    the answer (written while decoding) are found too."""
    first = random_seqs([13], seed=11)[0]
    question = random_seqs([6], seed=12)[0]
    off = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=4, enable_prefix_caching=False
    )
    llm = jaxpp.LLM(str(model_dir), dtype="float32", block_size=4, max_num_seqs=4)
    answer = _tokens(llm.generate([first], _greedy(12)))[0]
    assert answer == _tokens(off.generate([first], _greedy(12)))[0]
    second = first + answer + question
    got = _tokens(llm.generate([second], _greedy(8)))[0]
    assert got == _tokens(off.generate([second], _greedy(8)))[0]
    # The first sequence wrote 13 + 12 - 1 = 24 positions: 6 full pages.
    assert llm.last_run_stats["prefix_cache_hit_tokens"] == 24


def test_logits_never_come_from_the_cache(model_dir):
    """LLM.logits asks for every position: a cached prefix is computed again, not skipped."""
    seq = random_seqs([30], seed=13)[0]
    off = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=4, enable_prefix_caching=False
    )
    want = off.logits([seq])[0]
    llm = jaxpp.LLM(str(model_dir), dtype="float32", block_size=4, max_num_seqs=4)
    llm.generate([seq + [3]], _greedy(2))
    got = llm.logits([seq])[0]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 5e-6
    assert llm.last_run_stats["prefix_cache_hit_tokens"] == 0


def test_pages_shared_evicted_and_preempted_keep_every_answer(model_dir):
    """Random requests sharing random prefixes through a pool of 16 pages of 4 positions:
    pages are shared, evicted, reused and preempted, and each answer equals caching off."""
    rng = np.random.default_rng(21)
    heads = random_seqs([22, 9, 31], seed=22)
    tails = random_seqs(rng.integers(1, 12, size=12).tolist(), seed=23)
    prompts = [heads[int(rng.integers(0, 3))][: int(rng.integers(5, 32))] + t for t in tails]
    params = [
        _seeded(int(n), i) if i % 3 == 0 else _greedy(int(n))
        for i, n in enumerate(rng.integers(4, 16, size=len(prompts)))
    ]
    off = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=4, enable_prefix_caching=False
    )
    # All at once with caching off: an answer does not depend on its neighbours
    # (test_serving.py), so these are the answers each request gets alone.
    want = _tokens(off.generate(prompts, params))
    llm = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=6,
        max_num_batched_tokens=12, kv_cache_memory=16 * off.kv_bytes_per_page(),
    )  # fmt: skip
    assert llm.kv_pages == 16
    _nan_pools(llm)
    ids, got = {}, {}
    pending = list(range(len(prompts)))
    while pending or llm.has_unfinished_requests():
        for i in pending[:4]:  # a few at a time, while the ring runs
            ids[llm.add_request(prompts[i], params[i])] = i
        pending = pending[4:]
        for out in llm.step():
            got[ids[out.request_id]] = out.outputs[0].token_ids
    assert [got[i] for i in range(len(prompts))] == want
    stats = llm.scheduler.stats.as_dict()
    keys = ("prefix_cache_hit_tokens", "prefix_cache_evictions", "preemptions")
    print({k: stats[k] for k in keys})
    assert stats["prefix_cache_hit_tokens"] > 0
    assert stats["prefix_cache_evictions"] > 0
    assert stats["preemptions"] > 0


def test_bad_prefix_caching_value_names_the_argument(model_dir):
    with pytest.raises(ValueError, match="enable_prefix_caching='yes' is invalid"):
        jaxpp.LLM(str(model_dir), enable_prefix_caching="yes")


def test_n_samples_share_the_prompt_pages(model_dir):
    """SamplingParams(n=3): three completions of one prompt, sample j seeded seed + j, the
    prompt's full pages computed once."""
    prompt = random_seqs([21], seed=31)[0]
    params = jaxpp.SamplingParams(max_tokens=5, temperature=1.0, seed=40, n=3, ignore_eos=True)
    llm = jaxpp.LLM(str(model_dir), dtype="float32", block_size=4, max_num_seqs=4)
    out = llm.generate([prompt], params)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    assert llm.last_run_stats["prefix_cache_hit_tokens"] == 2 * 20
    off = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=4, enable_prefix_caching=False
    )
    for j, completion in enumerate(out[0].outputs):
        alone = off.generate([prompt], dataclasses.replace(params, n=1, seed=40 + j))
        assert completion.token_ids == alone[0].outputs[0].token_ids
    # Streamed: one id, one output of three completions.
    rid = llm.add_request(prompt, params)
    got = []
    while llm.has_unfinished_requests():
        got += llm.step()
    assert [o.request_id for o in got] == [rid] and len(got[0].outputs) == 3

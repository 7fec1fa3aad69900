"""Continuous batching over a paged KV cache, end to end on a tiny model: a request's answer does
not depend on what it shared a tick with, its row, its pages, the page size, the token budget,
preemption or its arrival time; several prompts share a tick; unused pages, dead rows and
padding are never read; the compiled programs are a fixed set with no host round trip inside;
memory is pages; bad input is refused."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_greedy, random_seqs

import jaxpp
import jaxpp.attention
from jaxpp.bench import CompileCounter

LENGTHS = [3, 40, 9, 17, 25, 5, 33, 12, 7, 21]  # some span several chunks of a small budget
BUDGETS = [6, 14, 3, 9, 12, 20, 5, 8, 16, 4]


@pytest.fixture(scope="module")
def model_dir(hf_model):
    return hf_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return random_seqs(LENGTHS, seed=8)


def _greedy(n: int) -> jaxpp.SamplingParams:
    return jaxpp.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(model_dir, prompts):
    """Each request served by itself: the reference every other arrangement must reproduce."""
    llm = jaxpp.LLM(str(model_dir), dtype="float32")
    return [
        llm.generate([p], _greedy(n))[0].outputs[0].token_ids
        for p, n in zip(prompts, BUDGETS, strict=True)
    ]


def _staggered(llm, prompts, params):
    """Add the requests a few at a time while the ring runs; return tokens in input order."""
    ids, got = {}, {}
    pending = list(range(len(prompts)))
    while pending or llm.has_unfinished_requests():
        for i in pending[:3]:
            ids[llm.add_request(prompts[i], params[i])] = i
        pending = pending[3:]
        for _ in range(2):
            for out in llm.step():
                got[ids[out.request_id]] = out.outputs[0].token_ids
    return [got[i] for i in range(len(prompts))]


def _nan_pools(llm) -> None:
    """Fill every KV page with NaN: a page read before it is written poisons the answer."""

    def fill(a):  # on the pool's own devices, as the engine placed it
        return jax.jit(lambda x: jnp.full_like(x, jnp.nan), out_shardings=a.sharding)(a)

    stages = llm.ring.stages._replace(cache=jax.tree.map(fill, llm.ring.stages.cache))
    llm.ring = llm.ring._replace(stages=stages)
    llm.reset_prefix_cache()  # what the cached pages held is gone


def test_alone_matches_transformers(model_dir, prompts, alone):
    assert alone == [hf_greedy(model_dir, [p], n)[0] for p, n in zip(prompts, BUDGETS, strict=True)]


@pytest.mark.parametrize(
    "layout",
    [
        # 10 requests through 4 rows, 8 tokens a tick, pages of 4: rows and pages reused,
        # prompts chunked over many ticks, several sharing one
        # (slow: test_prefix_cache.py's pressure test is pp=1, budget 12, pages of 4, rows
        # reused, NaN pools, against each request alone)
        pytest.param(
            dict(max_num_seqs=4, max_num_batched_tokens=8, block_size=4), marks=pytest.mark.slow
        ),
        dict(pp=2, num_microbatches=3, max_num_seqs=6, max_num_batched_tokens=24, block_size=5),
        dict(pp=2, tp=2, dp=2, max_num_seqs=4, max_num_batched_tokens=32, block_size=16),
    ],
    ids=["pp1-budget8-pages4", "pp2-M3-pages5", "dp2-pp2-tp2"],
)
def test_answers_do_not_depend_on_row_pages_budget_or_neighbours(model_dir, prompts, alone, layout):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", **layout)
    _nan_pools(llm)  # and no page is read before it is written
    params = [_greedy(n) for n in BUDGETS]
    assert _staggered(llm, prompts, params) == alone
    # All at once, in another order: the same answers again.
    order = list(reversed(range(len(prompts))))
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [o.outputs[0].token_ids for o in outs] == [alone[i] for i in order]
    stats = llm.last_run_stats
    assert stats["tokens"] == sum(BUDGETS)
    assert stats["prompt_tokens"] == sum(LENGTHS)
    assert stats["kv_blocks_peak"] <= stats["kv_blocks_total"]
    # The schedule is the ring's: stage s serves micro-batch (t - s) mod M whenever busy.
    M, t0 = llm.microbatches, stats["start_tick"]
    for t, row in enumerate(stats["schedule"]):
        ring = [(t0 + t - s) % M for s in range(llm.pp)]
        assert all(m in (-1, expected) for m, expected in zip(row, ring, strict=True)), row


def test_long_sequences_read_many_attention_items(model_dir, prompts, alone, monkeypatch):
    """Attention items of 8 positions (2 pages of 4), 3 a step: each sequence reads up to 7 of
    them, in decode and over its cached prefix, next to shorter ones."""
    monkeypatch.setitem(jaxpp.attention.ITEM_POSITIONS, "decode", 8)
    monkeypatch.setitem(jaxpp.attention.ITEM_POSITIONS, "prompt", 8)
    monkeypatch.setitem(jaxpp.attention.ITEMS_PER_STEP, "decode", 3)
    monkeypatch.setitem(jaxpp.attention.ITEMS_PER_STEP, "prompt", 3)
    llm = jaxpp.LLM(str(model_dir), dtype="float32", block_size=4, max_num_batched_tokens=24)
    picked = [1, 6, 0]
    outs = llm.generate([prompts[i] for i in picked], [_greedy(BUDGETS[i]) for i in picked])
    assert [o.outputs[0].token_ids for o in outs] == [alone[i] for i in picked]


@pytest.mark.slow  # test_sampling.py (batch position, layouts) and test_prefix_cache.py's
# pressure test (seeded requests arriving after rows were reused) cover it
def test_seeded_sampling_is_independent_of_row_arrival_and_layout(model_dir, prompts):
    seeded = jaxpp.SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=77, ignore_eos=True
    )
    target = prompts[3]
    single = jaxpp.LLM(str(model_dir), dtype="float32")
    want = single.generate([target], seeded)[0].outputs[0].token_ids
    neighbours = prompts[:6]
    others = [jaxpp.SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in BUDGETS]
    # (Over pp, tp and dp: test_sampling.py.)
    for layout in (dict(max_num_seqs=3, max_num_batched_tokens=8, block_size=3),):
        llm = jaxpp.LLM(str(model_dir), dtype="float32", **layout)
        for position in (0, 6):  # first to arrive, last to arrive (after rows were reused)
            batch = neighbours[:position] + [target] + neighbours[position:]
            params = others[:position] + [seeded] + others[position:6]
            assert _staggered(llm, batch, params)[position] == want, (layout, position)


@pytest.mark.slow  # test_prefix_cache.py's pressure test preempts too, greedy and seeded
def test_preemption_keeps_every_answer(model_dir, prompts):
    """Four requests that grow to 26-63 positions each, in a pool of 17 pages of 4 positions
    (68): rows grow into it until it is full, the newest is preempted and recomputed later,
    greedy and seeded alike, and every request still gets the tokens it gets alone."""
    alone = jaxpp.LLM(str(model_dir), dtype="float32")
    seeded = jaxpp.SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    params = [_greedy(24)] * 3 + [seeded]
    pairs = zip(prompts[:4], params, strict=True)
    want = [alone.generate([p], q)[0].outputs[0].token_ids for p, q in pairs]
    per_page = alone.kv_bytes_per_page() // 4  # pages of 4 positions instead of 16
    llm = jaxpp.LLM(
        str(model_dir), dtype="float32", block_size=4, max_num_seqs=8,
        kv_cache_memory=17 * per_page,
    )  # fmt: skip
    assert llm.kv_pages == 17
    outs = llm.generate(prompts[:4], params)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.last_run_stats
    print(f"preemptions {stats['preemptions']}, pages peak {stats['kv_blocks_peak']} of 17")
    assert stats["preemptions"] > 0 and stats["kv_blocks_peak"] == 17


def test_many_prompts_share_a_tick(model_dir):
    """128 prompts of 64 tokens arriving together enter in 128 * 64 / budget ticks, not 128."""
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=128,
                    max_num_batched_tokens=1024)  # fmt: skip
    many = random_seqs([64] * 128, seed=4)
    llm.generate(many, _greedy(1))
    stats = llm.last_run_stats
    assert stats["ticks"] == 128 * 64 // 1024
    assert stats["tokens_per_busy_stage_tick"] == 1024
    assert stats["peak_running"] == 0  # one token each: none ever decodes


@pytest.mark.parametrize(
    "bounds, speculative",
    [
        ("data", None),
        # slow: compiled-drafting checks the same greedy, sampling and grammar programs of
        # every bucket under the accelerator's bounds, plus the verify twins and a proposing
        # forward per bucket (prompt lookup's proposer is loop-free compares); "data" checks
        # the count of a non-speculating engine
        pytest.param("compiled", None, marks=pytest.mark.slow),
        pytest.param("compiled", {"num_speculative_tokens": 3}, marks=pytest.mark.slow),
        ("compiled", {"model": "itself", "num_speculative_tokens": 3}),
    ],
    ids=["data", "compiled", "compiled-speculating", "compiled-drafting"],
)
def test_compiled_programs_are_a_fixed_set_without_host_round_trips(
    model_dir, prompts, bounds, speculative, monkeypatch
):
    """warmup() compiles every program greedy traffic meets: serving compiles nothing more.
    The optimized HLO of every program: no conditional and no copy of a whole KV pool (the
    pools are updated in place); with an accelerator's attention bounds ("compiled"), no loop
    whose trip count depends on data either (on a GPU each would be a device-to-host copy and a
    wait inside the tick); on a CPU only the attention's chunk loops read theirs from the data
    (two per layer slot: decode slots and prompt groups). Speculating adds the verify twins of
    greedy and sampling and the proposing twin of each forward, and nothing else, with prompt
    lookup or a draft model (here the model itself) proposing."""
    if speculative and speculative.get("model") == "itself":
        speculative = {**speculative, "model": str(model_dir)}
    if bounds == "compiled":
        monkeypatch.setattr(jaxpp.attention, "trips_from_data", lambda: False)
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    speculative_config=speculative)  # fmt: skip
    compiled = llm.warmup()
    buckets = llm.scheduler.buckets.sizes
    # + greedy and sampling, each also in its grammar mode (structured outputs) and, when the
    # engine speculates, its verify mode (and each bucket's forward its proposing twin)
    twins = 1 + bool(speculative)
    assert compiled == llm.compiled_programs == len(buckets) * twins + 4 + 2 * bool(speculative)
    with CompileCounter() as counter:
        llm.generate(prompts, [_greedy(b) for b in BUDGETS])
    assert counter.count == 0, counter.names
    pool = "f32[{}]".format(
        ",".join(map(str, llm.ring.stages.cache.k[0].addressable_shards[0].data.shape))
    )
    for program, args in llm.programs.lowered():
        text = program.lower(*args).compile().as_text()
        assert not re.search(r"\bconditional\(", text)
        whiles = [line for line in text.splitlines() if re.search(r"\bwhile\(", line)]
        unknown = [line for line in whiles if "known_trip_count" not in line]
        forward = "forward" in text.splitlines()[0]
        allowed = 2 * llm.pipeline.slots if bounds == "data" and forward else 0
        assert len(unknown) == allowed, unknown
        assert not re.search(re.escape(pool) + r"\{[0-9,]*\} copy\(", text)


def test_page_size_and_budget_change_no_logits(model_dir, prompts):
    reference = jaxpp.LLM(str(model_dir), dtype="float32").logits(prompts)
    scale = max(float(np.abs(x).max()) for x in reference)
    for layout in (dict(block_size=1, max_num_batched_tokens=5), dict(block_size=7)):
        got = jaxpp.LLM(str(model_dir), dtype="float32", **layout).logits(prompts)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(reference, got, strict=True))
        assert worst <= 5e-6 * scale, layout


def test_dead_rows_padding_and_idle_ticks_are_inert(model_dir, prompts, alone):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", pp=2, max_num_seqs=4,
                    max_num_batched_tokens=8)  # fmt: skip
    clean = llm.logits(prompts)
    llm.pipeline.bubble_fill = float("nan")  # what no live token may ever read
    _nan_pools(llm)
    dirty = llm.logits(prompts)
    for a, b in zip(clean, dirty, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _staggered(llm, prompts, [_greedy(n) for n in BUDGETS]) == alone


def test_memory_is_pages_not_rows(model_dir, prompts, alone):
    """Rows cost no KV: max_num_seqs and max_model_len leave the pool as it is."""
    small = jaxpp.LLM(str(model_dir), dtype="float32", max_model_len=64, max_num_seqs=4)
    large = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=256)
    [a], [b] = small.device_memory(), large.device_memory()
    assert a["kv_cache"] == b["kv_cache"] == large.kv_pages * large.kv_bytes_per_page()
    params = [_greedy(n) for n in BUDGETS]
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == alone
    # A request that would run past max_model_len stops there.
    [out] = small.generate([prompts[1]], _greedy(100))
    assert len(out.outputs[0].token_ids) == 64 - len(prompts[1]) + 1
    assert out.outputs[0].finish_reason == "length"


def test_one_row_reused_after_stop_string_and_penalties(model_dir, prompts):
    """One row only: every request reuses the row (its pages and its penalty counts). All
    requests penalised, so that one sampler mode (one set of programs) serves the test."""
    one_row = dict(dtype="float32", max_num_seqs=1, max_num_batched_tokens=8)
    penalised = jaxpp.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
        frequency_penalty=0.5,
    )  # fmt: skip
    fresh = jaxpp.LLM(str(model_dir), **one_row)
    want = fresh.generate([prompts[2]], penalised)  # on the row before any other request
    fresh.reset_prefix_cache()  # the requests below find no page of it
    text = fresh.generate([prompts[1]], penalised)[0].outputs[0].text
    needle = text[4:6]
    stop = dataclasses.replace(penalised, stop=[needle])
    # The first leaves its counts (and pages) in the row; each next one must start clean.
    outs = fresh.generate([prompts[1], prompts[2], prompts[2]], [stop, penalised, penalised])
    if needle.strip():
        assert outs[0].outputs[0].finish_reason == "stop"
        assert outs[0].outputs[0].text == text[: text.index(needle)]
    assert outs[1].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_prompt_logprobs_and_streams_beside_plain_requests(model_dir, prompts, alone):
    """prompt_logprobs (scoring only with max_tokens 0, with one token, with a whole answer)
    equal log_softmax of LLM.logits on the same tokens (first token None, ranks, top-N), their
    prompts chunked over the ticks of two stages beside plain and streamed requests, which get
    the tokens they get alone; a streamed request runs in one-round calls."""
    llm = jaxpp.LLM(str(model_dir), dtype="float32", pp=2, max_num_seqs=6,
                    max_num_batched_tokens=16, block_size=4)  # fmt: skip
    logits = llm.logits(prompts[:3])
    scored = [
        jaxpp.SamplingParams(max_tokens=0, prompt_logprobs=2),
        dataclasses.replace(_greedy(1), prompt_logprobs=0),
        dataclasses.replace(_greedy(BUDGETS[2]), prompt_logprobs=3, logprobs=1),
    ]
    streamed = dataclasses.replace(_greedy(BUDGETS[6]), stream=True)
    params = [*scored, *(_greedy(n) for n in BUDGETS[3:6]), streamed]
    outs = llm.generate(prompts[:7], params)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [[], alone[1][:1], *alone[2:7]]
    for out, x, p in zip(outs[:3], logits, scored, strict=True):
        ids = out.prompt_token_ids
        lp = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for i, entry in enumerate(out.prompt_logprobs[1:], 1):
            chosen = entry[ids[i]]
            assert abs(chosen.logprob - lp[i - 1, ids[i]]) <= 5e-6 * np.abs(x).max()
            assert chosen.rank == 1 + int(np.sum(lp[i - 1] > lp[i - 1, ids[i]]))
            top = set(np.argsort(-lp[i - 1])[: p.prompt_logprobs].tolist())
            assert set(entry) == top | {ids[i]}
    # One-round calls while a request streams: a call per token instead of decode_chunk.
    calls = {}
    for stream in (False, True):
        params = dataclasses.replace(_greedy(BUDGETS[4]), stream=stream)
        [out] = llm.generate([prompts[4]], params)
        assert out.outputs[0].token_ids == alone[4]
        calls[stream] = llm.last_run_stats["calls"]
    assert calls[True] >= BUDGETS[4] > calls[False], calls


def test_streaming_api_hands_back_each_request_when_done(model_dir, prompts):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=4)
    short = llm.add_request(prompts[0], _greedy(2))
    long = llm.add_request(prompts[1], _greedy(30))
    finished = []
    while llm.has_unfinished_requests():
        finished += [o.request_id for o in llm.step()]
    assert finished == [short, long]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([10**6], _greedy(2))
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_size=0), r"block_size=0 is invalid"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens=0 is invalid"),
        (dict(decode_chunk=0), r"decode_chunk=0 is invalid"),
        (dict(max_num_seqs=0), r"max_num_seqs=0 is invalid"),
        (dict(num_microbatches=0), r"num_microbatches=0 is invalid"),
        (dict(pp=True), r"pp=True is invalid"),
        (dict(seed=-1), r"seed=-1 is invalid"),
        (dict(max_model_len=10**6), r"max_model_len=1000000 is invalid"),
        (dict(kv_cache_memory=1), r"kv_cache_memory=1 bytes per device holds no KV page"),
    ],
)
def test_bad_engine_arguments_name_the_culprit(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxpp.LLM(str(model_dir), **kwargs)


def test_bad_generate_arguments_name_the_culprit(model_dir):
    llm = jaxpp.LLM(str(model_dir), max_num_seqs=2, block_size=4)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams.*dict"):
        llm.generate([[1, 2]], {"max_tokens": 3})
    with pytest.raises(ValueError, match=r"sampling_params\[1\] must be a SamplingParams"):
        llm.generate([[1, 2], [3]], [_greedy(1), "greedy"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate([[1, 2], []], _greedy(1))
    too_many = jaxpp.SamplingParams(max_tokens=1, logprobs=10**9)
    with pytest.raises(ValueError, match=r"logprobs=1000000000 is above the vocabulary \(320\)"):
        llm.generate([[1, 2]], too_many)
    outside = jaxpp.SamplingParams(max_tokens=1, stop_token_ids=[320])
    with pytest.raises(ValueError, match=r"sampling_params\[0\]\.stop_token_ids has 320"):
        llm.generate([[1, 2]], [outside])
    assert not llm.has_unfinished_requests()  # nothing was queued by the failed calls
    tiny = jaxpp.LLM(str(model_dir), block_size=4, kv_cache_memory=3 * llm.kv_bytes_per_page())
    with pytest.raises(ValueError, match=r"10 prompt tokens \+ max_tokens=5 needs up to 14 KV "
                       r"positions but the pool holds 12 \(3 pages of 4\)"):  # fmt: skip
        tiny.generate([list(range(10))], _greedy(5))

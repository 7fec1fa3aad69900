"""Continuous batching through the ring, end to end on a tiny model: a request's answer does not
depend on its slot, micro-batch, arrival time or neighbours; slots are reused cleanly (also
after a stop string or with penalties); the set of compiled programs is fixed; the CPU's and the
accelerators' ways of reading the cache agree; dead rows and chunk padding are inert; bad input
is refused."""

import numpy as np
import pytest
from hf_fixtures import hf_greedy, random_seqs

import jaxpp
from jaxpp.bench import CompileCounter

LENGTHS = [3, 40, 9, 17, 25, 5, 33, 12, 7, 21]  # some span several chunks of 8
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


def test_alone_matches_transformers(model_dir, prompts, alone):
    assert alone == [hf_greedy(model_dir, [p], n)[0] for p, n in zip(prompts, BUDGETS, strict=True)]


@pytest.mark.parametrize(
    "layout",
    [
        dict(max_num_seqs=4, prefill_chunk=8),  # 10 requests through 4 slots: slots reused
        dict(pp=2, num_microbatches=3, max_num_seqs=6, prefill_chunk=8),
        dict(pp=2, tp=2, dp=2, max_num_seqs=4, prefill_chunk=16),
    ],
    ids=["pp1-4slots", "pp2-M3", "dp2-pp2-tp2"],
)
def test_answers_do_not_depend_on_slot_arrival_or_neighbours(model_dir, prompts, alone, layout):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", **layout)
    params = [_greedy(n) for n in BUDGETS]
    assert _staggered(llm, prompts, params) == alone
    # All at once, in another order: the same answers again.
    order = list(reversed(range(len(prompts))))
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [o.outputs[0].token_ids for o in outs] == [alone[i] for i in order]
    stats = llm.last_run_stats
    assert stats["tokens"] == sum(BUDGETS)
    assert stats["prompt_tokens"] == sum(LENGTHS)
    # The schedule is the ring's: stage s serves micro-batch (t - s) mod M whenever busy.
    M, t0 = llm.microbatches, stats["start_tick"]
    for t, row in enumerate(stats["schedule"]):
        ring = [(t0 + t - s) % M for s in range(llm.pp)]
        assert all(m in (-1, expected) for m, expected in zip(row, ring, strict=True)), row


def test_seeded_sampling_is_independent_of_slot_arrival_and_layout(model_dir, prompts):
    seeded = jaxpp.SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=77, ignore_eos=True
    )
    target = prompts[3]
    single = jaxpp.LLM(str(model_dir), dtype="float32")
    want = single.generate([target], seeded)[0].outputs[0].token_ids
    neighbours = prompts[:6]
    others = [jaxpp.SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in BUDGETS]
    for layout in (dict(max_num_seqs=3, prefill_chunk=8), dict(pp=2, num_microbatches=2)):
        llm = jaxpp.LLM(str(model_dir), dtype="float32", **layout)
        for position in (0, 6):  # first to arrive, last to arrive (after slots were reused)
            batch = neighbours[:position] + [target] + neighbours[position:]
            params = others[:position] + [seeded] + others[position:6]
            assert _staggered(llm, batch, params)[position] == want, (layout, position)


def test_compiled_programs_are_fixed(model_dir, prompts):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=4, prefill_chunk=8)
    compiled = llm.warm_up(_greedy(1))
    assert compiled == len(llm.scheduler.widths()) == 3  # widths 1, 2, 4
    with CompileCounter() as counter:
        for n in (1, 10):
            llm.generate(prompts[:n], [_greedy(b) for b in BUDGETS[:n]])
        llm.generate(prompts[::-1], [_greedy(2 * b) for b in BUDGETS])
    assert counter.count == 0, counter.names
    assert llm.compiled_programs == compiled


def test_cache_read_grouping_changes_nothing(model_dir, prompts, alone):
    """Decode rows read the cache one at a time, 8 at a time (the CPU's choice) or all at once
    (the accelerators'): the same tokens, and logits within float32 rounding."""
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=4, prefill_chunk=8)
    params = [_greedy(n) for n in BUDGETS]
    reference = llm.logits(prompts)
    scale = max(float(np.abs(x).max()) for x in reference)
    for rows_per_read in (1, llm.shape.rows):
        llm.pipeline.rows_per_read = rows_per_read
        got = llm.logits(prompts)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(reference, got, strict=True))
        assert worst <= 5e-6 * scale, rows_per_read
    assert _staggered(llm, prompts, params) == alone  # all rows at once, as on accelerators


def test_dead_rows_chunk_padding_and_idle_ticks_are_inert(model_dir, prompts, alone):
    llm = jaxpp.LLM(str(model_dir), dtype="float32", pp=2, max_num_seqs=4, prefill_chunk=8)
    clean = llm.logits(prompts)
    llm.pipeline.bubble_fill = float("nan")  # what no live row may ever read
    dirty = llm.logits(prompts)
    for a, b in zip(clean, dirty, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _staggered(llm, prompts, [_greedy(n) for n in BUDGETS]) == alone


def test_max_model_len_sets_capacity_not_answers(model_dir, prompts, alone):
    short = jaxpp.LLM(str(model_dir), dtype="float32", max_model_len=64, max_num_seqs=4)
    assert short.shape.cache_len < jaxpp.LLM(str(model_dir), dtype="float32").shape.cache_len
    params = [_greedy(n) for n in BUDGETS]
    assert [o.outputs[0].token_ids for o in short.generate(prompts, params)] == alone
    # A request that would run past max_model_len stops there.
    [out] = short.generate([prompts[1]], _greedy(100))
    assert len(out.outputs[0].token_ids) == 64 - len(prompts[1]) + 1
    assert out.outputs[0].finish_reason == "length"


def test_one_slot_reused_after_stop_string_and_penalties(model_dir, prompts):
    """One slot only: every request reuses the slot (its KV rows and its penalty counts)."""
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=1, prefill_chunk=8)
    text = llm.generate([prompts[1]], _greedy(12))[0].outputs[0].text
    needle = text[4:6]
    penalised = jaxpp.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
        frequency_penalty=0.5,
    )  # fmt: skip
    fresh = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=1, prefill_chunk=8)
    want = fresh.generate([prompts[2]], penalised)[0].outputs[0].token_ids
    stop = jaxpp.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[needle])
    outs = llm.generate([prompts[1], prompts[2], prompts[2]], [stop, penalised, penalised])
    if needle.strip():
        assert outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].token_ids == want == outs[2].outputs[0].token_ids


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
        (dict(prefill_chunk=0), r"prefill_chunk=0 is invalid"),
        (dict(decode_chunk=0), r"decode_chunk=0 is invalid"),
        (dict(max_num_seqs=0), r"max_num_seqs=0 is invalid"),
        (dict(num_microbatches=0), r"num_microbatches=0 is invalid"),
        (dict(pp=True), r"pp=True is invalid"),
        (dict(seed=-1), r"seed=-1 is invalid"),
        (dict(max_model_len=10**6), r"max_model_len=1000000 is invalid"),
        (dict(kv_cache_memory=1), r"max_model_len=256 does not fit"),
    ],
)
def test_bad_engine_arguments_name_the_culprit(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxpp.LLM(str(model_dir), **kwargs)


def test_bad_generate_arguments_name_the_culprit(model_dir):
    llm = jaxpp.LLM(str(model_dir), max_num_seqs=2)
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

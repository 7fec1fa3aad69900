"""The host scheduler on its own (no device): the token budget shared by many prompts, chunks
that continue over ticks and end in their own micro-batch, pages that grow and come back,
preemption when the pool runs out, withdrawal, the finish rules it shares with the device, the
run counters and the token buckets. Device logs are written by hand, shaped like
pipeline.StepLog."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxpp.batch import Buckets
from jaxpp.config import SamplingParams
from jaxpp.kv_pages import PagePool
from jaxpp.scheduler import Request, Scheduler, SlotLayout

EOS = (2,)


def _scheduler(replicas=1, microbatches=1, rows=4, budget=64, stages=1, pages=64, block=4,
               rounds=4, stop_check=None, max_len=256):  # fmt: skip
    layout = SlotLayout(replicas, microbatches, rows)
    pool = PagePool(replicas, pages, block, microbatches * rows, -(-max_len // block))
    return Scheduler(layout, pool, budget, stages, rounds, EOS, stop_check)


def _request(serial, length, **params):
    p = SamplingParams(**{"max_tokens": 3, "temperature": 0.0, **params})
    return Request(id=serial, prompt=list(range(10, 10 + length)), params=p, seed=0, arrival=0.0)


def _log(step, entries=(), stages=1):
    """A StepLog of the call's ticks with `entries` = [(tick, replica, row of the micro-batch,
    tag, token)]."""
    K = step.ticks
    replicas, mb = step.batches[0].sample.shape
    tags = np.full((K, replicas, mb), -1, np.int32)
    tokens = np.zeros((K, replicas, mb), np.int32)
    for t, r, c, tag, token in entries:
        tags[t, r, c], tokens[t, r, c] = tag, token
    zeros = np.zeros((K, replicas, mb), np.float32)
    return SimpleNamespace(
        tags=tags,
        tokens=tokens,
        logprob=zeros,
        top_ids=zeros[..., None][..., :0],
        top_logprobs=zeros[..., None][..., :0],
        drafts=np.zeros(tags.shape + (0,), np.int32),
        accepted=np.zeros_like(tags),
        work=np.ones((K, replicas, stages), np.int32),
        live=np.zeros((K, replicas), np.int32),
    )


def _chunks(step, replica=0):
    """[(tick, row, start, length)] of the planned prompt chunks of the call's first round."""
    out = []
    for k, batch in enumerate(step.batches[: step.ticks // step.rounds]):
        token, row, position = batch.token[replica], batch.row[replica], batch.position[replica]
        for slot in np.nonzero(token >= 0)[0]:
            r, p = int(row[slot]), int(position[slot])
            if out and out[-1][:2] == (k, r) and out[-1][2] + out[-1][3] == p:
                out[-1] = (k, r, out[-1][2], out[-1][3] + 1)
            else:
                out.append((k, r, p, 1))
    return out


def test_slot_layout_round_trips():
    lay = SlotLayout(2, 3, 4)
    assert lay.slots == 24
    for slot in range(lay.slots):
        assert lay.slot(*lay.locate(slot)) == slot
    assert lay.locate(13) == (1, 0, 1)  # replica 1, micro-batch 0, row 1


def test_short_prompts_share_a_tick_within_the_budget():
    s = _scheduler(rows=8, budget=64)
    for serial in range(6):
        s.add(_request(serial, 10))
    step = s.schedule()
    # Four prompts of 10 tokens (a query group each) take the 4 query groups of 64 slots.
    assert _chunks(step) == [(0, r, 0, 10) for r in range(4)]
    assert step.buckets == [64] and step.rounds == 1
    assert [r.id for r in s.waiting] == [4, 5]
    assert step.batches[0].token[0, :10].tolist() == list(range(10, 20))
    assert step.batches[0].sample[0, :4].tolist() == [9, 19, 29, 39]  # each prompt's last slot


def test_a_long_prompt_continues_and_ends_in_its_own_microbatch():
    s = _scheduler(microbatches=2, rows=2, budget=16, stages=2)
    s.add(_request(0, 40))
    first = s.schedule()
    # Tick 0 (micro-batch 0, where it is seated): 16 tokens; tick 1 (micro-batch 1): 16 more.
    assert _chunks(first) == [(0, 0, 0, 16), (1, 0, 16, 16)]
    assert all((b.sample == -1).all() for b in first.batches)
    s.update(first, _log(first, stages=2))
    second = s.schedule()
    assert _chunks(second) == [(0, 0, 32, 8)]  # the last 8 at micro-batch 0's tick
    assert second.batches[0].sample[0, 0] == 7
    # Its tick-1 chunk of the first call was still in the ring: the tick keeps room for it.
    assert second.buckets[0] >= 16


def test_last_token_waits_for_its_microbatch():
    s = _scheduler(microbatches=2, rows=1, budget=16, stages=2)
    s.add(_request(0, 20))
    step = s.schedule()
    # Micro-batch 0 takes 16 at tick 0; at tick 1 (micro-batch 1) 3 of the last 4 go, the
    # final token waits for micro-batch 0.
    assert _chunks(step) == [(0, 0, 0, 16), (1, 0, 16, 3)]
    s.update(step, _log(step, stages=2))
    step = s.schedule()
    assert _chunks(step) == [(0, 0, 19, 1)] and step.batches[0].sample[0, 0] == 0


def test_pages_grow_with_the_sequence_and_come_back():
    s = _scheduler(rows=2, block=4, rounds=4, pages=16)
    s.add(_request(0, 6, max_tokens=10))  # writes positions 0 .. 14 at most
    step = s.schedule()
    row = s.running[0].row
    # The prompt (6 positions) and the next long call (4 decode positions): 3 pages.
    assert s.pool.pages_of(row) == 3 and step.tables[row, :3].tolist() == [0, 1, 2]
    s.update(step, _log(step, [(0, 0, 0, 0, 5)]))
    # Long calls of 4 rounds while at least 2 are left to use, then one-round calls.
    for bound, pages, rounds in ((10, 4, 4), (14, 4, 4), (15, 4, 1)):
        step = s.schedule()
        assert step.rounds == rounds and not _chunks(step)
        assert s.running[0].bound == bound and s.pool.pages_of(row) == pages
        done = s.update(step, _log(step, [(k, 0, 0, 0, 5) for k in range(rounds)]))
    assert [r.id for r in done] == [0] and len(done[0].tokens) == 10
    assert s.pool.in_use == 0 and not s.pool.tables.any()
    assert s.schedule() is None


def test_preemption_when_the_pool_runs_out_and_recompute_later():
    s = _scheduler(rows=2, block=4, rounds=4, pages=6, budget=64)
    s.add(_request(0, 8, max_tokens=6))  # positions 0 .. 12: 3 pages, then a 4th
    s.add(_request(1, 8, max_tokens=20))  # 3 pages: the pool is full
    step = s.schedule()
    assert s.pool.in_use == 6
    s.update(step, _log(step, [(0, 0, 0, 0, 7), (0, 0, 1, 1, 7)]))
    old_tag = s.running[1].tag
    step = s.schedule()  # request 0 needs a 4th page for the next call: the newest goes
    assert s.stats.preemptions == 1
    assert [r.id for r in s.running] == [0] and [r.id for r in s.waiting] == [1]
    assert step.control["tag"][1] == -1  # withdrawn from the device in this call
    assert s.pool.in_use == 6  # its pages come back only for the next call
    assert s.waiting[0].tokens == [7] and s.waiting[0].preemptions == 1
    s.update(step, _log(step, [(k, 0, 0, 0, 7) for k in range(4)]))
    step = s.schedule()  # request 0 takes its 4th page; request 1 does not fit yet
    assert s.pool.in_use == 4 and [r.id for r in s.waiting] == [1]
    done = s.update(step, _log(step, [(0, 0, 0, 0, 7)]))
    assert [r.id for r in done] == [0] and s.pool.in_use == 0
    step = s.schedule()
    [again] = s.running
    assert again.id == 1 and again.tag != old_tag
    # It is prefilled again from its prompt and the token it had, and samples on from there.
    assert again.sequence == list(range(10, 18)) + [7]
    assert step.control["generated0"][again.row] == 1
    assert _chunks(step) == [(0, again.row, 0, 9)]


def test_stop_string_withdraws_and_frees_row_and_pages_after_the_next_call():
    s = _scheduler(rows=1, stop_check=lambda r: r.tokens[-1] == 9)
    s.add(_request(0, 2, max_tokens=10, stop=["x"]))
    first = s.schedule()
    row = s.running[0].row
    done = s.update(first, _log(first, [(0, 0, 0, 0, 9)]))
    assert [r.id for r in done] == [0] and done[0].stopped_by_string
    assert s.tags[row] == -1 and s.occupant[row] is not None and s.pool.in_use > 0
    s.add(_request(1, 2))
    carrier = s.schedule()  # carries the withdrawal; the row is still held
    assert carrier.control["tag"][row] == -1 and s.waiting
    s.update(carrier, _log(carrier))
    s.schedule()  # the next call may reuse the row and its pages
    assert [r.id for r in s.running] == [1] and s.running[0].row == row


def test_tokens_finish_requests_like_the_device_does():
    s = _scheduler(rows=4)
    s.add(_request(0, 2, max_tokens=3))
    s.add(_request(1, 2, max_tokens=5, ignore_eos=False))
    s.add(_request(2, 2, max_tokens=5, stop_token_ids=[7], min_tokens=2))
    first = s.schedule()
    columns = {r.tag: s.layout.locate(r.row)[2] for r in s.running}
    second = s.schedule()  # 4 rounds: every token left
    done = []
    for step, ticks in ((first, [(5, 6, 7)]), (second, [(5, 2, 7), (5, 9, 7)])):
        entries = []
        for k, (a, b, c) in enumerate(ticks):
            entries += [
                (k, 0, columns[0], 0, a),
                (k, 0, columns[1], 1, b),
                (k, 0, columns[2], 2, c),
            ]
        done += s.update(step, _log(step, entries))
    # 0: max_tokens 3; 1: EOS at its 2nd token; 2: stop id 7 only once more than min_tokens.
    assert sorted(r.id for r in done) == [0, 1, 2]
    got = {r.id: r.tokens for r in done}
    assert got == {0: [5, 5, 5], 1: [6, 2], 2: [7, 7, 7]}
    assert s.pool.in_use == 0


def test_no_call_once_nothing_is_left_to_write():
    s = _scheduler(rows=1, rounds=4)
    s.add(_request(0, 2, max_tokens=5))
    first = s.schedule()  # prefill: its first token
    second = s.schedule()  # 4 decode rounds: positions 2..5, its last 4 tokens
    assert second.rounds == 4
    assert s.schedule() is None  # both calls already hold every token it will get
    s.update(first, _log(first, [(0, 0, 0, 0, 5)]))
    done = s.update(second, _log(second, [(k, 0, 0, 0, 5) for k in range(4)]))
    assert [r.id for r in done] == [0] and len(done[0].tokens) == 5


def test_abort_drops_queued_and_withdraws_running():
    s = _scheduler(rows=1)
    s.add(_request(0, 2))
    s.add(_request(1, 2))
    s.schedule()
    s.abort({0, 1})
    assert not s.waiting and not s.running and not s.unfinished
    carrier = s.schedule()  # carries the withdrawal of request 0's row to the device
    assert carrier.control["tag"][0] == -1 and not _chunks(carrier)
    s.update(carrier, _log(carrier))
    assert s.schedule() is None and s.pool.in_use == 0


def test_run_counters():
    s = _scheduler(rows=2, stages=1, pages=64)
    for serial in range(3):
        s.add(_request(serial, 3, max_tokens=2))
    step = s.schedule()
    assert len(s.running) == 2 and len(s.waiting) == 1  # two rows
    log = _log(step, [(0, 0, 0, 0, 5)])
    log.live[:] = 1
    s.update(step, log)
    stats = s.stats.as_dict()
    assert stats["ticks"] == 1 and stats["tokens"] == 1 and stats["prompt_tokens"] == 6
    assert stats["occupancy"] == pytest.approx(1 / 2)  # 1 token of 2 rows
    assert stats["queued_ticks"] == 1 and stats["peak_running"] == 1
    assert stats["kv_blocks_total"] == 64 and stats["kv_blocks_peak"] == 2
    assert stats["schedule"] == [[0]]


def test_buckets_are_few_and_fill_before_they_pad():
    buckets = Buckets.of(rows=32, budget=2048)
    assert buckets.sizes == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert Buckets.of(rows=1, budget=64).sizes == (1, 16, 32, 64)
    assert Buckets.of(rows=4, budget=24).sizes == (4, 16, 32)
    assert buckets.fit(32, 0) == 32  # decode alone: the smallest that holds it
    assert buckets.fit(32, 268) == 256  # 256 now, the rest next tick: no padding
    assert buckets.fit(32, 40) == 64  # 72 in 64 would leave 8 for a tick of their own
    assert buckets.fit(20, 4) == 32  # short of every size: the smallest that holds it
    assert buckets.fit(0, 10_000) == 2048


def test_the_tick_table_of_the_pipeline_docs():
    """docs/pipeline.md and pipeline.py draw this schedule: prompts of 16, 40 and 24 tokens,
    a budget of 40, three micro-batches."""
    s = _scheduler(microbatches=3, rows=2, budget=40, stages=3)
    for serial, length in enumerate((16, 40, 24)):
        s.add(_request(serial, length))
    step = s.schedule()
    rows = {r.id: r.row for r in s.running}
    assert [s.layout.locate(rows[i])[1] for i in range(3)] == [0, 1, 2]  # a, b, c
    assert _chunks(step) == [
        (0, rows[0], 0, 16),  # a
        (0, rows[1], 0, 16),  # b1
        (1, rows[1], 16, 24),  # b2: the bucket of tick 0 still rides, so tick 1 fills it
        (2, rows[2], 0, 24),  # c
    ]
    # 1/S of the prompt work (96 slots / 3) per tick: every entry in flight holds 32 slots.
    assert [b.token.shape[1] for b in step.batches] == [32, 32, 32]
